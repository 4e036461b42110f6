"""Faster R-CNN backends that turn decoded images into 36 region vectors each.

``base`` defines the record every backend returns and the backend interface;
``torchvision_frcnn``, ``detectron2_frcnn`` and ``precomputed`` implement it.
``model.regions.build_backend`` picks one by name.
"""
