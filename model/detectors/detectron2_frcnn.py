"""detectron2's Faster R-CNN as a region-feature backend.

The model comes from a detectron2 config file (for example
``COCO-Detection/faster_rcnn_R_101_C4_3x.yaml`` from detectron2's ``configs/`` folder, or a
Visual Genome config) and a checkpoint. Regions are chosen by the rule of
``model.detectors.base.choose_regions``. A region's feature is the box head output of its
proposal: the flattened FC head output for FPN models (``StandardROIHeads``), or the
res5 block's output averaged over the pooled grid for C4 models (``Res5ROIHeads``, 2048-d).
detectron2 numbers the background class last (index K), so object ids are 0..K-1.
Standard detectron2 has no attribute head, so ``attr_ids`` are -1 and ``attr_probs`` 0.

Images are grouped by padded input size for a batched backbone pass; the RPN and box
heads then run per image. detectron2's CPU convolutions round differently for different
batch sizes, so batched regions equal single-image ones only up to that rounding (checked
in the tests with detectron2 0.6 built from source at commit 02b5c4e2).

detectron2 is not on PyPI; it installs from its own source. Importing this module without
it raises ImportError with that hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.detectors.base import (
    N_REGIONS,
    DecodedImage,
    RegionBackend,
    RegionFeatures,
    choose_regions,
    pad_regions,
    padded_size,
)
from model.image_io import CHANNEL_ORDERS

try:
    import detectron2  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the detectron2 backend needs detectron2, which is not on PyPI; install it from its source "
        "(pip install 'git+https://github.com/facebookresearch/detectron2.git', needs setuptools<81) "
        "or choose the torchvision backend"
    ) from error


class Detectron2Backend(RegionBackend):
    """Regions from a detectron2 GeneralizedRCNN built from a config file and checkpoint."""

    name = "detectron2"
    has_attributes = False
    needs_pixels = True

    def __init__(
        self,
        config_file: str | Path,
        weights: str | Path,
        device: str = "cpu",
        score_thresh: float = 0.2,
        nms_thresh: float = 0.3,
        min_regions: int = 10,
        min_size: int | None = None,
        max_size: int | None = None,
    ):
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        config_file, weights = Path(config_file), Path(weights)
        if not config_file.is_file():
            raise FileNotFoundError(f"detectron2 config file {config_file} not found; set 'detectron2_config'")
        if not weights.is_file():
            raise FileNotFoundError(f"detectron2 checkpoint {weights} not found; set 'weights' to a .pth or .pkl file")
        cfg = get_cfg()
        cfg.merge_from_file(str(config_file))
        cfg.MODEL.WEIGHTS = str(weights)
        cfg.MODEL.DEVICE = device
        if min_size:
            cfg.INPUT.MIN_SIZE_TEST = int(min_size)
        if max_size:
            cfg.INPUT.MAX_SIZE_TEST = int(max_size)
        cfg.freeze()
        if cfg.INPUT.FORMAT not in CHANNEL_ORDERS:
            raise ValueError(f"{config_file}: INPUT.FORMAT {cfg.INPUT.FORMAT!r} is not supported; use RGB or BGR")

        self.cfg = cfg
        self.config_file, self.weights = str(config_file), str(weights)
        self.device = torch.device(device)
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(str(weights))
        self.score_thresh, self.nms_thresh, self.min_regions = score_thresh, nms_thresh, min_regions
        self.c4 = not hasattr(self.model.roi_heads, "box_head")
        self.feature_dim = self._probe_feature_dim()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "weights": self.weights,
            "config_file": self.config_file,
            "feature_dim": self.feature_dim,
            "min_size": int(self.cfg.INPUT.MIN_SIZE_TEST),
            "max_size": int(self.cfg.INPUT.MAX_SIZE_TEST),
            "score_thresh": self.score_thresh,
            "nms_thresh": self.nms_thresh,
            "min_regions": self.min_regions,
        }

    def _probe_feature_dim(self) -> int:
        pixels = torch.zeros((3, 64, 64), dtype=torch.uint8)
        features = self._forward([DecodedImage("probe", pixels, 64, 64)], probe=True)
        return int(features[0])

    @torch.inference_mode()
    def extract(self, images: list[DecodedImage]) -> list[RegionFeatures]:
        return self._forward(images)

    def _resize(self, image: DecodedImage) -> dict[str, Any]:
        import detectron2.data.transforms as T

        if image.pixels is None:
            raise ValueError(f"image {image.key}: the detectron2 backend needs pixels")
        array = image.pixels.permute(1, 2, 0).numpy()  # (H, W, 3) RGB uint8
        if self.cfg.INPUT.FORMAT == "BGR":
            array = np.ascontiguousarray(array[:, :, ::-1])
        resize = T.ResizeShortestEdge([self.cfg.INPUT.MIN_SIZE_TEST] * 2, self.cfg.INPUT.MAX_SIZE_TEST)
        resized = resize.get_transform(array).apply_image(array)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))  # (3, h, w)
        return {"image": tensor, "height": image.height, "width": image.width}

    @torch.inference_mode()
    def _forward(self, images: list[DecodedImage], probe: bool = False) -> list[Any]:
        inputs = [self._resize(image) for image in images]
        divisor = int(self.model.backbone.size_divisibility or 1)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(inputs):
            height, width = item["image"].shape[-2:]
            groups.setdefault(padded_size(height, width, divisor), []).append(index)
        results: list[Any] = [None] * len(images)
        for indexes in groups.values():
            outputs = self._forward_group([inputs[i] for i in indexes], [images[i] for i in indexes], probe)
            for index, output in zip(indexes, outputs):
                results[index] = output
        return results

    def _forward_group(self, inputs: list[dict[str, Any]], images: list[DecodedImage], probe: bool) -> list[Any]:
        from detectron2.structures import ImageList

        model = self.model
        batch = model.preprocess_image(inputs)  # normalised, padded ImageList
        features = model.backbone(batch.tensor)  # the costly part, batched
        outputs = []
        # As in the torchvision backend, the RPN and box heads run per image so that an
        # image's regions do not depend on its batch mates.
        for index, image in enumerate(images):
            size = batch.image_sizes[index]
            maps = {name: level[index : index + 1] for name, level in features.items()}
            single = ImageList(batch.tensor[index : index + 1], [size])
            proposals, _ = model.proposal_generator(single, maps, None)
            representation = self._box_representation(maps, [p.proposal_boxes for p in proposals])  # (R, D)
            if probe:
                return [representation.shape[1]] * len(images)
            outputs.append(self._select(image, size, proposals, representation))
        return outputs

    def _box_representation(self, maps: dict[str, torch.Tensor], proposal_boxes: list) -> torch.Tensor:
        heads = self.model.roi_heads
        if self.c4:
            pooled = heads._shared_roi_transform([maps[f] for f in heads.in_features], proposal_boxes)
            return pooled.mean(dim=[2, 3])  # (R, 2048)
        pooled = heads.box_pooler([maps[f] for f in heads.box_in_features], proposal_boxes)
        return heads.box_head(pooled).flatten(1)  # (R, D)

    def _select(self, image: DecodedImage, size: tuple[int, int], proposals: list, representation: torch.Tensor) -> RegionFeatures:
        predictor = self.model.roi_heads.box_predictor
        predictions = predictor(representation)
        boxes = predictor.predict_boxes(predictions, proposals)[0]  # (R, K*4), or (R, 4) class-agnostic
        probs = predictor.predict_probs(predictions, proposals)[0]  # (R, K+1)
        scores, labels = probs[:, :-1].max(dim=1)  # background is the last class in detectron2
        if boxes.shape[1] == 4:
            chosen_boxes = boxes
        else:
            chosen_boxes = boxes.view(len(boxes), -1, 4)[torch.arange(len(labels)), labels]
        height, width = size
        chosen_boxes[:, 0::2] = chosen_boxes[:, 0::2].clamp(0, width)
        chosen_boxes[:, 1::2] = chosen_boxes[:, 1::2].clamp(0, height)
        chosen = choose_regions(chosen_boxes, scores, labels, self.nms_thresh, self.score_thresh, self.min_regions, N_REGIONS)
        scale = torch.tensor(
            [image.width / width, image.height / height, image.width / width, image.height / height],
            device=chosen_boxes.device,
        )
        return pad_regions(
            roi_features=representation[chosen].float().cpu().numpy(),
            boxes=(chosen_boxes[chosen] * scale).float().cpu().numpy(),
            obj_ids=labels[chosen].cpu().numpy().astype(np.int64),
            obj_probs=scores[chosen].float().cpu().numpy(),
            width=image.width,
            height=image.height,
        )
