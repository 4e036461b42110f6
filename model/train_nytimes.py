"""Pre-train NewsLXMERT on NYTimes800k: ``python -m model.train_nytimes --help``."""

from __future__ import annotations

import sys

from model.cli import main

if __name__ == "__main__":
    sys.exit(main("nytimes800k", prog="python -m model.train_nytimes"))
