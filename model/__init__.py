"""NewsLXMERT: the network, its data formats and the extraction stages.

Everything in this package is plain Python and PyTorch. It knows nothing of
Dagster, so a notebook or the training command line can import it alone.
"""
