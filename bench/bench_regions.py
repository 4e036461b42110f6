"""Benchmark: the batched region extractor against one image at a time, in one run.

All runs use the same backend object and the same photos, and write to a fresh feature
store each (the writes are inside the timing):

- one at a time: ``extract_regions`` with ``batch_size=1`` and no DataLoader workers, so
  each image is decoded, then run through the detector alone;
- batched: ``extract_regions`` with ``--batch-size`` images per forward pass and
  ``--workers`` DataLoader processes decoding ahead. Images are ordered by size, so a
  batch shares one padded input size.

It prints images/s of each and the ratio, and checks that both give the same regions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_regions.py --images 64 --threads 1

Backend: the tiny profile's detector by default; ``--weights`` for a real one; or
``--architecture fasterrcnn_resnet50_fpn --random-weights`` for the speed of a full-size
network whose outputs mean nothing (no weights can be downloaded here). Photos: the
first ``--images`` of ../shared/data/newsimages-2025/images by name, or ``--photos DIR``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.detectors.torchvision_frcnn import (  # noqa: E402
    DEFAULT_DETECTOR_CONFIG,
    CONFIG_FILE,
    WEIGHTS_FILE,
    TorchvisionBackend,
    build_architecture,
    build_tiny_detector,
)
from model.feature_store import FeatureStore  # noqa: E402
from model.regions import extract_regions  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "newsimages-2025" / "images"


def random_weights_folder(architecture: str, folder: Path) -> Path:
    """Save a randomly initialised ``architecture`` as a detector folder (for timing only)."""
    import json

    config = dict(DEFAULT_DETECTOR_CONFIG, architecture=architecture)
    torch.manual_seed(0)
    model = build_architecture(config)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def timed_run(items, backend, folder: Path, batch_size: int, workers: int) -> tuple[float, FeatureStore]:
    store = FeatureStore(folder)
    started = time.perf_counter()
    report = extract_regions(items, backend, store, batch_size=batch_size, num_workers=workers, flush_every=64)
    seconds = time.perf_counter() - started
    if report.failed:
        print(f"  {len(report.failed)} images failed, e.g. {next(iter(report.failed.items()))}")
    return len(report.done) / seconds, store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="photos to process (default 64)")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of .jpg photos")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass when batched (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decoding processes when batched (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--weights", type=Path, help="detector folder or state-dict file (default: the tiny detector)")
    parser.add_argument("--architecture", default=None, help="architecture of --weights, or of --random-weights")
    parser.add_argument("--random-weights", action="store_true", help="random weights of --architecture, for timing only")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating; the best counts (default 2)")
    parser.add_argument("--min-size", type=int, default=None, help="network input shorter side, pixels")
    parser.add_argument("--max-size", type=int, default=None, help="network input longer side cap, pixels")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    photos = sorted(args.photos.glob("*.jpg"))[: args.images]
    if not photos:
        sys.exit(f"no .jpg photos in {args.photos}; pass --photos")
    items = {path.stem: path for path in photos}

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if args.random_weights:
            weights = random_weights_folder(args.architecture or "fasterrcnn_resnet50_fpn", scratch / "random")
            label = f"{args.architecture or 'fasterrcnn_resnet50_fpn'} with random weights (speed only)"
        elif args.weights:
            weights, label = args.weights, str(args.weights)
        else:
            weights, label = build_tiny_detector(scratch / "tiny"), "tiny profile detector (random weights)"
        overrides = {"min_size": args.min_size, "max_size": args.max_size}
        backend = TorchvisionBackend(weights, architecture=args.architecture, device=args.device, overrides=overrides)

        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}")
        print(f"torch {torch.__version__}, python {platform.python_version()}")
        print(f"backend: {label}; input min_size {backend.config['min_size']} max_size {backend.config['max_size']}; D={backend.feature_dim}")
        print(f"photos: {len(items)} from {args.photos}")

        warm = dict(list(items.items())[:2])
        timed_run(warm, backend, scratch / "warm", 2, 0)  # first-call allocations outside the timing

        # Alternate the two ways and keep each one's best rate, so that load from other
        # processes on the machine penalises neither way more than the other.
        single_rate = batched_rate = 0.0
        for repeat in range(args.repeats):
            rate, single_store = timed_run(items, backend, scratch / f"single{repeat}", 1, 0)
            single_rate = max(single_rate, rate)
            rate, batched_store = timed_run(items, backend, scratch / f"batched{repeat}", args.batch_size, args.workers)
            batched_rate = max(batched_rate, rate)
        print(f"one at a time:                    {single_rate:8.2f} images/s (best of {args.repeats})")
        print(f"batched ({args.batch_size}/pass, {args.workers} workers):    {batched_rate:8.2f} images/s (best of {args.repeats})")
        print(f"ratio batched / one at a time:    {batched_rate / single_rate:8.2f}")

        worst = 0.0
        for key in single_store.keys():
            a, b = single_store.get(key)["roi_features"], batched_store.get(key)["roi_features"]
            worst = max(worst, float(np.abs(a - b).max()))
        print(f"largest roi_features difference between the two runs: {worst:.2e}")


if __name__ == "__main__":
    main()
