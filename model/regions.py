"""Faster R-CNN region features: choosing a backend, extracting a set of images, reading results.

Every image becomes 36 regions (``model.detectors.base.RegionFeatures``): RoI features
[36, D], absolute and normalized boxes, object ids and probabilities, attribute ids and
probabilities (-1 and 0 where the backend predicts none), and the real region count.
Rows from ``n_regions`` on are padding: zero features and boxes, ids -1, probabilities 0.

Outputs of one dataset live under ``<dataset_root>/region_features/``::

    store/            the fast store (model.feature_store), read by training
    json/<hash>.json  the original per-image JSON layout, when requested
    extractor.json    backend, weights fingerprint and settings that made the features

:class:`RegionFeatureReader` reads them back, from the store first and then from JSON
folders (files named ``<hash>.json`` or ``<hash>.jpg`` by the original scripts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from torch.utils.data import DataLoader, Dataset

from model.detectors.base import (
    N_REGIONS,
    DecodedImage,
    RegionBackend,
    RegionFailure,
    RegionFeatures,
)
from model.feature_store import FeatureStore
from model.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image, probe_size, to_tensor_uint8
from model.region_json import RegionJsonError, find_region_json, read_region_json, write_region_json
from model.storage import atomic_write_text, remove_stale_temporaries

logger = logging.getLogger(__name__)

BACKENDS = ("torchvision", "detectron2", "precomputed")
STAGE = "region_features"
STORE_DIR = "store"
JSON_DIR = "json"
EXTRACTOR_FILE = "extractor.json"
TINY_COMPONENT = "frcnn"

__all__ = [
    "BACKENDS",
    "N_REGIONS",
    "BackendSettings",
    "ExtractorMismatchError",
    "RegionFeatureReader",
    "RegionFeatures",
    "RegionReport",
    "build_backend",
    "check_extractor",
    "extract_regions",
]


@dataclasses.dataclass
class BackendSettings:
    """Settings for ``build_backend``, filled by the asset from its Config and the pipeline settings."""

    backend: str = "torchvision"
    weights: str = ""  # torchvision: state-dict file or detector folder; detectron2: checkpoint
    architecture: str = "fasterrcnn_resnet50_fpn"  # torchvision, for a bare state-dict file
    detectron2_config: str = ""
    precomputed_dir: str = ""
    min_size: int | None = None  # shorter side of the network input, in pixels
    max_size: int | None = None  # cap on the longer side, in pixels
    score_thresh: float | None = None
    device: str = "cpu"
    profile: str = "base"
    tiny_dir: str = ""  # <data_root>/models/tiny/frcnn, used by the tiny profile


class ExtractorMismatchError(RuntimeError):
    """Existing features were made by another backend or other weights than this run's."""


def build_backend(settings: BackendSettings) -> RegionBackend:
    """Build the backend ``settings.backend``, or raise naming the setting that is missing.

    The torchvision backend without ``weights`` uses random weights only in the ``tiny``
    profile (built once under ``tiny_dir``); in any other profile that is an error.
    """
    if settings.backend not in BACKENDS:
        raise ValueError(f"unknown region backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
    if settings.backend == "precomputed":
        from model.detectors.precomputed import PrecomputedBackend

        if not settings.precomputed_dir:
            raise ValueError("the precomputed backend needs 'precomputed_dir', the folder of <hash>.json feature files")
        return PrecomputedBackend(settings.precomputed_dir)

    overrides = {"min_size": settings.min_size, "max_size": settings.max_size, "score_thresh": settings.score_thresh}
    if settings.backend == "detectron2":
        if not settings.detectron2_config or not settings.weights:
            raise ValueError("the detectron2 backend needs 'detectron2_config' (a config .yaml) and 'weights' (a checkpoint)")
        from model.detectors.detectron2_frcnn import Detectron2Backend

        kwargs = {key: value for key, value in overrides.items() if value is not None}
        return Detectron2Backend(settings.detectron2_config, settings.weights, device=settings.device, **kwargs)

    from model.detectors.torchvision_frcnn import TorchvisionBackend, build_tiny_detector

    weights = settings.weights
    if not weights:
        if settings.profile != "tiny":
            raise ValueError(
                "no Faster R-CNN weights configured: set the region_features 'weights' setting (or the "
                "NEWSLXMERT_FRCNN_WEIGHTS environment variable) to a torchvision state-dict file such as "
                "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth or a folder with config.json and model.pt; "
                "random weights are used only in the tiny profile"
            )
        if not settings.tiny_dir:
            raise ValueError("the tiny profile needs 'tiny_dir' to build its detector in")
        weights = str(build_tiny_detector(settings.tiny_dir))
    return TorchvisionBackend(weights, architecture=settings.architecture, device=settings.device, overrides=overrides)


def fingerprint_file(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extractor_identity(backend: RegionBackend) -> dict[str, Any]:
    """Return the backend's settings plus a content fingerprint of its weights.

    The fingerprint (not the path) decides whether two runs made comparable features, so
    moving a weights file does not invalidate a store.
    """
    identity = dict(backend.describe())
    weights = Path(identity.get("weights", ""))
    files = sorted(p for p in weights.iterdir() if p.is_file()) if weights.is_dir() else [weights]
    if backend.name != "precomputed" and all(p.is_file() for p in files):
        identity["weights_sha256"] = {p.name: fingerprint_file(p) for p in files}
    return identity


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    if "weights_sha256" in identity:
        return {key: value for key, value in identity.items() if key != "weights"}
    return identity


def check_extractor(stage_root: Path, identity: dict[str, Any]) -> None:
    """Record ``identity`` for a new output folder, or raise if the folder's features differ."""
    path = stage_root / EXTRACTOR_FILE
    if path.exists():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if _comparable(existing) != _comparable(identity):
            raise ExtractorMismatchError(
                f"region features in {stage_root} were made by {json.dumps(existing, sort_keys=True)}, "
                f"but this run uses {json.dumps(identity, sort_keys=True)}; features of different extractors "
                f"must not be mixed, so use the same settings or delete {stage_root} to extract everything again"
            )
        return
    atomic_write_text(path, json.dumps(identity, indent=1, sort_keys=True) + "\n")


@dataclasses.dataclass
class RegionReport:
    """Counts, failures and timing of one extraction run."""

    done: list[str] = dataclasses.field(default_factory=list)  # extracted in this run
    skipped: list[str] = dataclasses.field(default_factory=list)  # valid output already present
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # image hash -> reason
    seconds: float = 0.0  # wall time of the extraction loop
    feature_dim: int = 0

    @property
    def images_per_second(self) -> float:
        return round(len(self.done) / self.seconds, 3) if self.seconds > 0 else 0.0


class _ImageDataset(Dataset):
    """Images decoded in DataLoader workers, where a failure becomes an item instead of an exception."""

    def __init__(self, items: list[tuple[str, Path]], backend: RegionBackend, max_pixels: int):
        self.items, self.backend, self.max_pixels = items, backend, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> DecodedImage | tuple[str, str]:
        key, path = self.items[index]
        if not self.backend.needs_pixels:
            return DecodedImage(key, None, -1, -1)
        try:
            loaded = load_image(path, max_pixels=self.max_pixels)
        except ImageDecodeError as error:
            return key, str(error)
        return self.backend.prepare(DecodedImage(key, to_tensor_uint8(loaded.image), loaded.width, loaded.height))


def _keep_list(batch: list) -> list:
    return batch


def _has_valid_json(json_dir: Path, key: str, feature_dim: int) -> bool:
    path = json_dir / f"{key}.json"
    if not path.exists():
        return False
    try:
        read_region_json(path, feature_dim=feature_dim or None)
    except RegionJsonError:
        return False
    return True


def extract_regions(
    items: dict[str, Path],
    backend: RegionBackend,
    store: FeatureStore,
    json_dir: Path | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    flush_every: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    on_flush: Callable[[RegionReport], None] | None = None,
) -> RegionReport:
    """Extract regions for ``items`` (image hash -> image file) into ``store`` and optionally JSON.

    Items already in the store (and, with ``json_dir``, with a valid JSON file) are skipped
    unless ``overwrite``. Results are written every ``flush_every`` images as one store
    shard plus atomic JSON files, so a killed run loses at most that many images and
    leaves no partial file. Unreadable images and backend failures are recorded in the
    report and the run goes on. Images are decoded (and, by ``backend.prepare``, resized
    for a CPU network) in ``num_workers`` DataLoader worker processes (0: in this process),
    ordered by size so that batches share an input size.
    """
    report = RegionReport(feature_dim=backend.feature_dim)
    # Temporary files of killed runs; those of concurrent writers are locked and stay.
    remove_stale_temporaries(store.folder)
    if json_dir is not None:
        remove_stale_temporaries(json_dir)
    todo: list[tuple[str, Path]] = []
    for key in sorted(items):
        in_store = key in store
        if not overwrite and in_store and (json_dir is None or _has_valid_json(json_dir, key, backend.feature_dim)):
            report.skipped.append(key)
        elif not overwrite and in_store and json_dir is not None:
            # The store has the item but its JSON twin is missing or damaged: rewrite it.
            write_region_json(json_dir, key, RegionFeatures.from_mapping(store.get(key)))
            report.skipped.append(key)
        else:
            todo.append((key, items[key]))
    if not todo:
        return report

    if backend.needs_pixels:
        sizes = {key: probe_size(path) or (0, 0) for key, path in todo}
        todo.sort(key=lambda item: (sizes[item[0]][1], sizes[item[0]][0], item[0]))
    loader = DataLoader(
        _ImageDataset(todo, backend, max_pixels),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_list,
        pin_memory=False,
    )

    buffer: list[tuple[str, RegionFeatures]] = []

    def flush() -> None:
        if not buffer:
            return
        if json_dir is not None:
            for key, features in buffer:
                write_region_json(json_dir, key, features)
        store.write([features.to_record(key) for key, features in buffer])
        report.done.extend(key for key, _ in buffer)
        buffer.clear()
        if on_flush is not None:
            on_flush(report)

    started = time.perf_counter()
    for batch in loader:
        decoded = []
        for entry in batch:
            if isinstance(entry, tuple):
                key, reason = entry
                report.failed[key] = reason
                logger.warning("image %s: no regions: %s", key, reason)
            else:
                decoded.append(entry)
        if not decoded:
            continue
        for image, result in zip(decoded, backend.extract(decoded)):
            if isinstance(result, RegionFailure):
                report.failed[image.key] = result.reason
                logger.warning("image %s: no regions: %s", image.key, result.reason)
                continue
            if report.feature_dim and result.feature_dim != report.feature_dim:
                report.failed[image.key] = (
                    f"roi_features have {result.feature_dim} columns, the other images {report.feature_dim}"
                )
                continue
            report.feature_dim = result.feature_dim
            buffer.append((image.key, result))
        if len(buffer) >= flush_every:
            flush()
            report.seconds = time.perf_counter() - started
            logger.info(
                "%d/%d images done, %d failed, %.2f images/s",
                len(report.done),
                len(todo),
                len(report.failed),
                report.images_per_second,
            )
    flush()
    report.seconds = time.perf_counter() - started
    return report


class RegionFeatureReader:
    """Region features of one dataset by image hash, for training and evaluation.

    ``get`` looks in ``<dataset_root>/region_features/store`` first, then in JSON folders:
    ``<dataset_root>/region_features/json`` and any ``json_dirs`` given (for example features
    extracted by the original scripts, named ``<hash>.json`` or ``<hash>.jpg``). It returns
    a dict with ``roi_features`` float32 [36, D], ``boxes`` and ``normalized_boxes`` float32
    [36, 4], ``obj_ids``/``attr_ids`` int64 [36], ``obj_probs``/``attr_probs`` float32 [36],
    ``n_regions`` (real regions), ``image_width`` and ``image_height`` (-1 when unknown).
    Arrays from the store are read-only views of a memory map: copy one before changing it.
    The reader can be pickled into DataLoader workers.
    """

    def __init__(self, dataset_root: Path | str, json_dirs: Iterable[Path | str] = ()):
        self.root = Path(dataset_root) / STAGE
        self.store = FeatureStore(self.root / STORE_DIR)
        self.json_dirs = [self.root / JSON_DIR] + [Path(d) for d in json_dirs]
        self._feature_dim: int | None = None

    def _json_path(self, image_hash: str) -> Path | None:
        for folder in self.json_dirs:
            if folder.is_dir():
                path = find_region_json(folder, image_hash)
                if path is not None:
                    return path
        return None

    def __contains__(self, image_hash: object) -> bool:
        if not isinstance(image_hash, str):
            return False
        return image_hash in self.store or self._json_path(image_hash) is not None

    def keys(self) -> list[str]:
        """Return every image hash with features, from the store and the JSON folders, sorted."""
        from model.region_json import list_region_json

        found = set(self.store.keys())
        for folder in self.json_dirs:
            found.update(list_region_json(folder))
        return sorted(found)

    def _known_feature_dim(self) -> int | None:
        if self._feature_dim is None:
            schema = self.store.schema
            if "roi_features" in schema:
                self._feature_dim = int(schema["roi_features"].shape[1])
        return self._feature_dim

    @property
    def feature_dim(self) -> int:
        """Return D, the RoI feature size; raise FileNotFoundError when there are no features."""
        if self._known_feature_dim() is None:
            keys = self.keys()
            if not keys:
                raise FileNotFoundError(
                    f"no region features in {self.root} or {', '.join(map(str, self.json_dirs[1:])) or 'other folders'}; "
                    "materialize the region_features asset first"
                )
            self._feature_dim = int(self.get(keys[0])["roi_features"].shape[1])
        return self._feature_dim

    def get(self, image_hash: str) -> dict[str, Any]:
        """Return the regions of ``image_hash``, or raise KeyError naming the folders searched."""
        if image_hash in self.store:
            return self.store.get(image_hash)
        path = self._json_path(image_hash)
        if path is None:
            raise KeyError(
                f"no region features for image {image_hash!r} in {self.store.folder} or "
                f"{', '.join(str(d) for d in self.json_dirs)}"
            )
        # With D known (from the store or an earlier file), a truncated or foreign file
        # raises RegionJsonError naming it instead of giving rows of another width.
        features = read_region_json(path, feature_dim=self._known_feature_dim())
        if self._feature_dim is None:
            self._feature_dim = features.feature_dim
        return features.to_dict()


def default_num_workers() -> int:
    """Return DataLoader workers for decoding: none on one CPU, else up to 4."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 1 else min(4, cpus - 1)

