"""Fine-tune NewsLXMERT on MediaEval NewsImages: ``python -m model.train_mediaeval --help``."""

from __future__ import annotations

import sys

from model.cli import main

if __name__ == "__main__":
    sys.exit(main("newsimages", prog="python -m model.train_mediaeval"))
