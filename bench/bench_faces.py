"""Benchmark: the batched face pipeline against one image at a time, in one run.

Both ways decode the same photos with ``model.image_io`` and run MTCNN on each image, then:

- one at a time: FaceNet embeds the faces of each image in its own forward pass, and each
  image is decoded just before it is processed;
- batched: ``model.faces.extract_face_features`` decodes through a DataLoader, embeds the
  faces of ``--images-per-write`` images together in passes of ``--face-batch-size`` faces,
  and writes each batch to a feature store (the write is inside the timing). It runs once
  per value of ``--loader-workers``: with workers on the CPU, MTCNN runs in them and overlaps
  FaceNet in the main process.

It prints images/s of both and their ratio. It also times MTCNN alone and FaceNet alone
(one pass per image against one batched pass), because batching speeds up only FaceNet. Weights are the tiny
profile's random FaceNet weights: the architecture, and so the time, is that of vggface2.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_faces.py --images 96 --threads 1

Photos: the first ``--images`` of ../shared/data/newsimages-2025/images by name, or
``--photos DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.faces import FaceConfig, FaceExtractor, extract_face_features, image_items, load_facenet  # noqa: E402
from model.faces import ensure_tiny_facenet  # noqa: E402
from model.image_io import load_image  # noqa: E402

DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "newsimages-2025" / "images"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def one_at_a_time(extractor: FaceExtractor, items) -> tuple[float, int]:
    started = time.perf_counter()
    faces = 0
    for _, path in items:
        image = load_image(path).image
        faces += extractor.process([image])[0].n_faces
    return time.perf_counter() - started, faces


def batched(extractor: FaceExtractor, items, config: FaceConfig) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        report = extract_face_features(items, Path(folder) / "face_features", config, extractor)
        seconds = time.perf_counter() - started
    return seconds, report.faces


def stage_times(extractor: FaceExtractor, items) -> dict[str, float]:
    """Time MTCNN alone, FaceNet with one pass per image, and FaceNet batched over all faces."""
    images = [load_image(path).image for _, path in items]
    started = time.perf_counter()
    detections = [extractor.detect(image)[0] for image in images]
    detect_seconds = time.perf_counter() - started
    crops_per_image = [extractor.crop(image, boxes) for image, boxes in zip(images, detections)]

    started = time.perf_counter()
    for crops in crops_per_image:
        extractor.embed(crops)
    per_image_seconds = time.perf_counter() - started

    started = time.perf_counter()
    extractor.embed(torch.cat(crops_per_image))
    batched_seconds = time.perf_counter() - started
    return {
        "mtcnn": detect_seconds,
        "facenet_per_image": per_image_seconds,
        "facenet_batched": batched_seconds,
        "faces": sum(int(crops.shape[0]) for crops in crops_per_image),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos")
    parser.add_argument("--images", type=int, default=96, help="photos to process (default 96)")
    parser.add_argument("--images-per-write", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--face-batch-size", type=int, default=64, help="faces per FaceNet pass (default 64)")
    parser.add_argument("--loader-workers", default="0,1",
                        help="comma-separated DataLoader process counts to run the batched pipeline with (default 0,1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        sys.exit(f"photo folder {args.photos} not found; pass --photos DIR")
    torch.set_num_threads(args.threads)

    config = FaceConfig(images_per_write=args.images_per_write, face_batch_size=args.face_batch_size)
    worker_counts = [int(value) for value in args.loader_workers.split(",")]
    with tempfile.TemporaryDirectory() as weights_root:
        facenet, facenet_id = load_facenet(ensure_tiny_facenet(weights_root), args.device)
    extractor = FaceExtractor(config, facenet, facenet_id, args.device)
    items = image_items(args.photos, args.images)
    one_at_a_time(extractor, items[:2])  # warm-up: first calls allocate and pick kernels

    single_seconds, single_faces = one_at_a_time(extractor, items)
    batched_runs = {
        workers: batched(extractor, items, dataclasses.replace(config, loader_workers=workers)) for workers in worker_counts
    }
    stages = stage_times(extractor, items)

    print(f"machine: {cpu_name()}, {args.threads} torch thread(s), device {args.device}, torch {torch.__version__}")
    print(
        f"settings: {len(items)} photos from {args.photos.name}, images_per_write={config.images_per_write}, "
        f"face_batch_size={config.face_batch_size}, "
        f"MTCNN defaults (min face 20, thresholds 0.6/0.7/0.7, factor 0.709)"
    )
    print(f"one at a time: {len(items) / single_seconds:.2f} images/s ({single_seconds:.1f} s, {single_faces} faces)")
    for workers, (seconds, faces) in batched_runs.items():
        print(
            f"batched, {workers} loader worker(s): {len(items) / seconds:.2f} images/s ({seconds:.1f} s, {faces} faces), "
            f"ratio to one at a time {single_seconds / seconds:.2f}x"
        )
    print(f"MTCNN alone: {stages['mtcnn']:.1f} s")
    print(
        f"FaceNet over {stages['faces']} faces: {stages['facenet_per_image']:.1f} s in one pass per image, "
        f"{stages['facenet_batched']:.1f} s batched, ratio {stages['facenet_per_image'] / stages['facenet_batched']:.2f}x"
    )


if __name__ == "__main__":
    main()
