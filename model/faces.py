"""Faces in news photos: MTCNN finds them, FaceNet (InceptionResnetV1) embeds each to 512-d.

Per image the stage keeps up to ``max_faces`` faces, largest box first, with their
L2-normalised embeddings, MTCNN detection probabilities and boxes (absolute x1 y1 x2 y2 of
the upright image). Results go to a :class:`model.feature_store.FeatureStore` at
``<dataset_root>/face_features/store/``, one fixed-shape record per image hash::

    embeddings    float32 [max_faces, 512]  zero rows after the real faces
    detect_probs  float32 [max_faces]
    boxes         float32 [max_faces, 4]
    n_faces       int64    faces kept (<= max_faces)
    n_detected    int64    faces MTCNN found before the cut to max_faces
    width, height int64    of the upright image (0 for faces taken from a document)
    model_id      str      which detector settings and FaceNet weights made the record

Optionally each image also gets the original NewsLXMERT JSON fields in
``<dataset_root>/face_features/json/<hash>.json``: ``faces_embeddings`` (base64 of the raw
array, float64 as the original scripts wrote it), ``n_faces`` (faces detected),
``faces_detect_probs`` (base64, same dtype), ``faces_size`` (rows in ``faces_embeddings``;
the original readers reshape to ``(faces_size, -1)``), plus ``faces_boxes`` (base64 float32).

MTCNN weights ship inside facenet-pytorch 2.5.3 and are always used. FaceNet weights come
from a local file (``vggface2`` means facenet-pytorch's download cache); only the ``tiny``
profile builds random weights, once, under ``<data_root>/models/tiny/facenet/``.

Run over a folder of photos without Dagster::

    python -m model.faces IMAGES_DIR OUT_DIR [--profile tiny --data-root DATA_ROOT]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from model.feature_store import FeatureStore
from model.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from model.storage import atomic_write_bytes, check_safe_id, remove_stale_temporaries, safe_join

logger = logging.getLogger(__name__)

EMBEDDING_SIZE = 512
DEFAULT_MAX_FACES = 10
STORE_FOLDER = "store"
JSON_FOLDER = "json"
FACENET_WEIGHTS_SETTING = "facenet_weights (face_features asset config, or env NEWSLXMERT_FACENET_WEIGHTS)"
TINY_FACENET_FILE = "facenet.pt"
TINY_FACENET_SEED = 0
# File names facenet-pytorch 2.5.3 downloads into <TORCH_HOME>/checkpoints/.
PRETRAINED_FILES = {
    "vggface2": "20180402-114759-vggface2.pt",
    "casia-webface": "20180408-102900-casia-webface.pt",
}
MAX_EXAMPLES = 10


class FaceNetWeightsNotFoundError(FileNotFoundError):
    """The configured FaceNet weights are not on this machine."""


@dataclasses.dataclass(frozen=True)
class FaceConfig:
    """MTCNN and batching settings; the MTCNN defaults are facenet-pytorch's."""

    image_size: int = 160  # side of the face crop fed to FaceNet
    margin: int = 0  # pixels added around the box, in crop pixels
    min_face_size: int = 20  # smallest face MTCNN searches for, in pixels
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # P-, R-, O-net score thresholds
    factor: float = 0.709  # scale step of the image pyramid
    post_process: bool = True  # standardise crops as (x - 127.5) / 128, as FaceNet was trained
    max_faces: int = DEFAULT_MAX_FACES
    face_batch_size: int = 64  # faces per FaceNet forward pass
    images_per_write: int = 64  # images per store shard; a killed run loses at most this many
    loader_workers: int = 0  # DataLoader processes that decode images, and on the CPU also run MTCNN
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be at least 1, got {self.max_faces}")
        if len(self.thresholds) != 3:
            raise ValueError(f"thresholds must hold three values (P-, R-, O-net), got {self.thresholds!r}")
        if self.face_batch_size < 1 or self.images_per_write < 1:
            raise ValueError("face_batch_size and images_per_write must be at least 1")

    def detector_id(self) -> str:
        thresholds = "/".join(f"{value:g}" for value in self.thresholds)
        return (
            f"mtcnn(size={self.image_size},margin={self.margin},min={self.min_face_size},"
            f"thresholds={thresholds},factor={self.factor:g},post={int(self.post_process)})"
        )


# --- FaceNet weights ------------------------------------------------------------------------


def torch_home() -> Path:
    """Return the folder facenet-pytorch caches downloads in: ``$TORCH_HOME`` or ``~/.cache/torch``."""
    default = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", default)))


def tiny_facenet_path(data_root: Path | str) -> Path:
    return Path(data_root) / "models" / "tiny" / "facenet" / TINY_FACENET_FILE


def ensure_tiny_facenet(data_root: Path | str) -> Path:
    """Write seeded random InceptionResnetV1 weights for the tiny profile once; return the file."""
    from facenet_pytorch import InceptionResnetV1

    path = tiny_facenet_path(data_root)
    if path.exists():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_FACENET_SEED)
        network = InceptionResnetV1(pretrained=None, classify=False)
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("built random tiny-profile FaceNet weights at %s", path)
    return path


def resolve_facenet_weights(weights: str | None, profile: str, data_root: Path | str | None) -> Path:
    """Find the FaceNet state-dict file for setting ``weights``.

    ``None`` means the profile's default: ``vggface2`` in ``base``, the random tiny weights in
    ``tiny``. ``vggface2`` and ``casia-webface`` name facenet-pytorch's cached download;
    anything else is a state-dict file or a folder holding ``facenet.pt``.
    """
    if weights is None:
        if profile == "tiny":
            if data_root is None:
                raise ValueError("the tiny profile needs a data root to keep its FaceNet weights in")
            return ensure_tiny_facenet(data_root)
        weights = "vggface2"
    if weights in PRETRAINED_FILES:
        path = torch_home() / "checkpoints" / PRETRAINED_FILES[weights]
        if not path.is_file():
            raise FaceNetWeightsNotFoundError(
                f"FaceNet weights {weights!r} not found at {path} (facenet-pytorch's download cache; "
                f"this machine cannot download them). Copy {PRETRAINED_FILES[weights]} there, or set "
                f"{FACENET_WEIGHTS_SETTING} to a local state-dict file or a folder holding {TINY_FACENET_FILE}."
            )
        return path
    path = Path(weights).expanduser()
    if path.is_dir():
        candidates = [path / TINY_FACENET_FILE] if (path / TINY_FACENET_FILE).is_file() else sorted(path.glob("*.pt"))
        if len(candidates) != 1:
            raise FaceNetWeightsNotFoundError(
                f"FaceNet weights folder {path} contains {len(candidates)} .pt files but needs {TINY_FACENET_FILE} "
                f"or exactly one .pt file. Set {FACENET_WEIGHTS_SETTING} to the file itself."
            )
        path = candidates[0]
    if not path.is_file():
        raise FaceNetWeightsNotFoundError(
            f"FaceNet weights file {path} not found; set {FACENET_WEIGHTS_SETTING} to a local state-dict "
            f"file, a folder holding {TINY_FACENET_FILE}, or 'vggface2' with the file in {torch_home() / 'checkpoints'}."
        )
    return path


def load_facenet(path: Path | str, device: str = "cpu") -> tuple[torch.nn.Module, str]:
    """Load InceptionResnetV1 in eval mode from a state-dict file; return it and a weights id.

    The classification layer (``logits.*``, present in the published files) is dropped: only
    the 512-d embedding is used. The id is the file's SHA-256 prefix.
    """
    from facenet_pytorch import InceptionResnetV1

    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise ValueError(f"FaceNet weights file {path} is not a readable torch state dict: {error}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    state = {key: value for key, value in state.items() if not key.startswith("logits.")}
    network = InceptionResnetV1(pretrained=None, classify=False)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"FaceNet weights file {path} does not fit facenet-pytorch's InceptionResnetV1: {str(error)[:500]}"
        ) from None
    network.eval().to(device)
    return network, f"facenet:{digest}"


# --- per-image results ----------------------------------------------------------------------


@dataclasses.dataclass
class FaceResult:
    """The faces of one image, largest box first."""

    embeddings: np.ndarray  # (n, 512) float32
    detect_probs: np.ndarray  # (n,) float32
    boxes: np.ndarray  # (n, 4) float32, absolute x1 y1 x2 y2
    n_detected: int
    width: int
    height: int

    @property
    def n_faces(self) -> int:
        return int(self.embeddings.shape[0])

    def to_record(self, key: str, max_faces: int, model_id: str) -> dict[str, Any]:
        """Build a fixed-shape store record, zero-padded to ``max_faces``."""
        n = self.n_faces
        if n > max_faces:
            raise ValueError(f"image {key}: {n} faces do not fit max_faces={max_faces}")
        embeddings = np.zeros((max_faces, EMBEDDING_SIZE), np.float32)
        probs = np.zeros((max_faces,), np.float32)
        boxes = np.zeros((max_faces, 4), np.float32)
        embeddings[:n], probs[:n], boxes[:n] = self.embeddings, self.detect_probs, self.boxes
        return {
            "key": key,
            "embeddings": embeddings,
            "detect_probs": probs,
            "boxes": boxes,
            "n_faces": np.int64(n),
            "n_detected": np.int64(self.n_detected),
            "width": np.int64(self.width),
            "height": np.int64(self.height),
            "model_id": model_id,
        }


def empty_result(width: int, height: int) -> FaceResult:
    return FaceResult(
        embeddings=np.zeros((0, EMBEDDING_SIZE), np.float32),
        detect_probs=np.zeros((0,), np.float32),
        boxes=np.zeros((0, 4), np.float32),
        n_detected=0,
        width=width,
        height=height,
    )


def result_from_facenet_details(details: Mapping[str, Any], max_faces: int) -> FaceResult:
    """Convert a NYTimes800k ``facenet_details`` dict (``n_faces``, ``embeddings``, ``detect_probs``).

    Transform-and-Tell wrote at most 10 faces, largest first, without boxes; the boxes stay
    zero. Raises ValueError naming the field when the shapes do not agree.
    """
    embeddings = np.asarray(details.get("embeddings") or np.zeros((0, EMBEDDING_SIZE)), dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != EMBEDDING_SIZE:
        raise ValueError(f"facenet_details.embeddings has shape {embeddings.shape}, expected (n, {EMBEDDING_SIZE})")
    probs = np.asarray(details.get("detect_probs") or [], dtype=np.float32).reshape(-1)
    if probs.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"facenet_details has {embeddings.shape[0]} embeddings but {probs.shape[0]} detect_probs"
        )
    n_detected = int(details.get("n_faces", embeddings.shape[0]))
    keep = min(max_faces, embeddings.shape[0])
    return FaceResult(
        embeddings=embeddings[:keep],
        detect_probs=probs[:keep],
        boxes=np.zeros((keep, 4), np.float32),
        n_detected=max(n_detected, embeddings.shape[0]),
        width=0,
        height=0,
    )


# --- detection and embedding ----------------------------------------------------------------


@dataclasses.dataclass
class DetectedFaces:
    """MTCNN's output for one image and its face crops, ready for FaceNet."""

    boxes: np.ndarray  # (n, 4) float32, largest first, n <= max_faces
    probs: np.ndarray  # (n,) float32
    n_detected: int
    width: int
    height: int
    crops: torch.Tensor  # (n, 3, image_size, image_size)


class FaceDetector:
    """MTCNN with facenet-pytorch's shipped weights, run one image at a time."""

    def __init__(self, config: FaceConfig, device: str = "cpu"):
        from facenet_pytorch import MTCNN

        self.config = config
        self.device = torch.device(device)
        self.mtcnn = MTCNN(
            image_size=config.image_size,
            margin=config.margin,
            min_face_size=config.min_face_size,
            thresholds=list(config.thresholds),
            factor=config.factor,
            post_process=config.post_process,
            select_largest=True,
            keep_all=True,
            device=self.device,
        ).eval()

    def detect(self, image) -> tuple[np.ndarray, np.ndarray, int]:
        """Return boxes (n, 4) and probabilities (n,) of the largest ``max_faces`` faces, and n found.

        NOTE: detection runs one image at a time. facenet-pytorch 2.5.3 batches only images of
        equal size. In such a batch a box reaching past the image edge can suppress or move a
        box of another image: on a newsimages-2025 photo a box moved by 4 px in a batch of two.
        Batched detection would therefore not match detection of each image alone.
        """
        if min(image.width, image.height) < self.config.min_face_size:
            # No face of min_face_size fits. facenet-pytorch 2.5.3 builds an empty image
            # pyramid for such an image and fails in torch.cat, so MTCNN is not called.
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0
        boxes, probs = self.mtcnn.detect([image])  # a list gives per-image entries: None or arrays
        boxes, probs = boxes[0], probs[0]
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        probs = np.asarray(list(probs), dtype=np.float32).reshape(-1)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-areas, kind="stable")  # largest first; MTCNN already sorts so
        boxes, probs = boxes[order], probs[order]
        n_detected = len(boxes)
        return boxes[: self.config.max_faces], probs[: self.config.max_faces], n_detected

    def crop(self, image, boxes: np.ndarray) -> torch.Tensor:
        """Crop the faces to (n, 3, image_size, image_size), standardised when post_process is on."""
        from facenet_pytorch.models.mtcnn import fixed_image_standardization
        from facenet_pytorch.models.utils.detect_face import extract_face

        size = self.config.image_size
        crops = []
        for box in boxes:
            face = extract_face(image, box, size, self.config.margin)  # (3, size, size), 0..255
            crops.append(fixed_image_standardization(face) if self.config.post_process else face)
        if not crops:
            return torch.zeros((0, 3, size, size))
        return torch.stack(crops)

    def prepare(self, image) -> DetectedFaces:
        """Detect the faces of one RGB PIL image and crop them."""
        boxes, probs, n_detected = self.detect(image)
        return DetectedFaces(boxes, probs, n_detected, image.width, image.height, self.crop(image, boxes))


class FaceExtractor:
    """MTCNN detection per image and batched FaceNet embedding of every face found."""

    def __init__(self, config: FaceConfig, facenet: torch.nn.Module, facenet_id: str, device: str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.detector = FaceDetector(config, device)
        self.facenet = facenet.eval().to(self.device)
        self.model_id = f"{config.detector_id()}+{facenet_id}"

    @classmethod
    def from_settings(
        cls,
        config: FaceConfig,
        facenet_weights: str | None,
        profile: str,
        data_root: Path | str | None,
        device: str = "cpu",
    ) -> "FaceExtractor":
        path = resolve_facenet_weights(facenet_weights, profile, data_root)
        facenet, facenet_id = load_facenet(path, device)
        return cls(config, facenet, facenet_id, device)

    def detect(self, image) -> tuple[np.ndarray, np.ndarray, int]:
        return self.detector.detect(image)

    def crop(self, image, boxes: np.ndarray) -> torch.Tensor:
        return self.detector.crop(image, boxes)

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """Embed crops to (n, 512) float32 in FaceNet forward passes of ``face_batch_size`` faces."""
        if crops.shape[0] == 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        outputs = []
        for start in range(0, crops.shape[0], self.config.face_batch_size):
            chunk = crops[start : start + self.config.face_batch_size].to(self.device)
            outputs.append(self.facenet(chunk).float().cpu())  # (b, 512)
        return torch.cat(outputs).numpy()

    def finish(self, detections: Sequence[DetectedFaces]) -> list[FaceResult]:
        """Embed the faces of all ``detections`` together and return one result per image."""
        size = self.config.image_size
        crops = [detected.crops for detected in detections]
        embeddings = self.embed(torch.cat(crops) if crops else torch.zeros((0, 3, size, size)))  # (total faces, 512)
        results, cursor = [], 0
        for detected in detections:
            n = len(detected.boxes)
            results.append(
                FaceResult(
                    embeddings=embeddings[cursor : cursor + n],
                    detect_probs=detected.probs,
                    boxes=detected.boxes,
                    n_detected=detected.n_detected,
                    width=detected.width,
                    height=detected.height,
                )
            )
            cursor += n
        return results

    def process(self, images: Sequence) -> list[FaceResult]:
        """Find and embed the faces of each RGB PIL image, embedding the faces of all images together."""
        return self.finish([self.detector.prepare(image) for image in images])


# --- the stage over many images -------------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    """Decoding, and with a CPU ``detector`` also face detection, for a DataLoader.

    Each item is ``(key, image or DetectedFaces, None)``, or ``(key, None, reason)`` for an
    image that failed, so that one bad file does not stop the loader. With loader workers,
    CPU detection of later images overlaps FaceNet on earlier ones.
    """

    def __init__(self, items: Sequence[tuple[str, Path]], max_pixels: int, detector: FaceDetector | None):
        self.items = list(items)
        self.max_pixels = max_pixels
        self.detector = detector

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        key, path = self.items[index]
        try:
            image = load_image(path, max_pixels=self.max_pixels).image
        except ImageDecodeError as error:
            return key, None, str(error)
        if self.detector is None:
            return key, image, None
        try:
            return key, self.detector.prepare(image), None
        except (RuntimeError, ValueError, IndexError) as error:
            return key, None, f"face detection failed: {type(error).__name__}: {error}"


def _keep_as_list(batch):
    return batch


@dataclasses.dataclass
class FaceReport:
    """Counts and timings of one run of the face stage, for logs and asset metadata."""

    done: list[str] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (image hash, reason)
    computed: int = 0
    from_documents: int = 0
    resumed: int = 0
    invalid_document_faces: list[str] = dataclasses.field(default_factory=list)
    faces_per_image: Counter = dataclasses.field(default_factory=Counter)  # n_faces -> images, over done
    truncated: int = 0  # images with more than max_faces faces
    model_id: str | None = None
    seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def with_faces(self) -> int:
        return sum(count for n, count in self.faces_per_image.items() if n > 0)

    @property
    def faces(self) -> int:
        return sum(n * count for n, count in self.faces_per_image.items())

    @property
    def images_per_second(self) -> float:
        return self.computed / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "images": len(self.done),
            "computed": self.computed,
            "from_documents": self.from_documents,
            "resumed": self.resumed,
            "failed": len(self.failures),
            "failed_examples": [f"{key}: {reason}" for key, reason in self.failures[:MAX_EXAMPLES]],
            "invalid_document_faces": len(self.invalid_document_faces),
            "invalid_document_face_examples": self.invalid_document_faces[:MAX_EXAMPLES],
            "images_with_faces": self.with_faces,
            "faces": self.faces,
            "faces_per_image": {str(n): self.faces_per_image[n] for n in sorted(self.faces_per_image)},
            "images_over_max_faces": self.truncated,
            "model_id": self.model_id,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
        }


def face_store(face_root: Path | str) -> FeatureStore:
    return FeatureStore(Path(face_root) / STORE_FOLDER)


def extract_face_features(
    items: Sequence[tuple[str, Path]],
    face_root: Path | str,
    config: FaceConfig,
    extractor: FaceExtractor | Callable[[], FaceExtractor],
    document_faces: Mapping[str, Mapping[str, Any]] | None = None,
    write_json: bool = False,
    json_dtype: str = "float64",
    progress: Callable[[int, int], None] | None = None,
) -> FaceReport:
    """Detect and embed the faces of every ``(image hash, path)`` of ``items`` into the store.

    ``extractor`` may be a factory, called only when some image needs computing.
    ``document_faces`` maps image hashes to NYTimes800k ``facenet_details``, used instead of
    computing. Resumable: a hash already stored by the same detector settings and FaceNet
    weights (or taken from a document) is skipped, and the store gets one shard per
    ``images_per_write`` images. An image that cannot be decoded or processed is a per-item
    failure; the others go on. ``progress(done, total)`` is called after each shard.
    """
    if write_json and json_dtype not in ("float32", "float64"):
        raise ValueError(f"json_dtype must be float32 or float64, got {json_dtype!r}")
    started = time.perf_counter()
    face_root = Path(face_root)
    # Temporary files of killed runs go; those that another partition's run is writing
    # right now are locked and stay (model.storage.remove_stale_temporaries).
    remove_stale_temporaries(face_root)
    store = face_store(face_root)
    document_faces = document_faces or {}
    report = FaceReport()
    unique = list(dict.fromkeys((key, Path(path)) for key, path in items))
    for key, _ in unique:
        check_safe_id(key)

    built: list[FaceExtractor] = []

    def get_extractor() -> FaceExtractor:
        if not built:
            built.append(extractor() if callable(extractor) and not isinstance(extractor, FaceExtractor) else extractor)
            report.model_id = built[0].model_id
        return built[0]

    if isinstance(extractor, FaceExtractor):
        report.model_id = extractor.model_id

    # Records taken from documents.
    document_records = []
    to_compute: list[tuple[str, Path]] = []
    for key, path in unique:
        details = document_faces.get(key)
        if details is not None:
            if _stored_model_id(store, key) == "document":
                report.resumed += 1
                continue
            try:
                result = result_from_facenet_details(details, config.max_faces)
            except (ValueError, TypeError) as error:
                report.invalid_document_faces.append(f"{key}: {error}")
                logger.warning("image %s: facenet_details unusable (%s); computing its faces instead", key, error)
                to_compute.append((key, path))
                continue
            document_records.append((key, result))
            continue
        to_compute.append((key, path))
    for start in range(0, len(document_records), config.images_per_write):
        chunk = document_records[start : start + config.images_per_write]
        _write(store, face_root, chunk, config.max_faces, "document", write_json, json_dtype)
        report.from_documents += len(chunk)

    # Images to compute: skip those this model already stored.
    pending = []
    if to_compute:
        current_id = None
        stored_ids = {key: _stored_model_id(store, key) for key, _ in to_compute}
        if any(value is not None for value in stored_ids.values()):
            current_id = get_extractor().model_id
        for key, path in to_compute:
            if stored_ids[key] is not None and stored_ids[key] == current_id:
                report.resumed += 1
            else:
                pending.append((key, path))

    if pending:
        face_extractor = get_extractor()
        # On a GPU, MTCNN runs in this process; on the CPU, detection runs in the loader.
        loader_detector = face_extractor.detector if face_extractor.device.type == "cpu" else None
        loader = torch.utils.data.DataLoader(
            _ImageDataset(pending, config.max_pixels, loader_detector),
            batch_size=config.images_per_write,
            shuffle=False,
            num_workers=config.loader_workers,
            collate_fn=_keep_as_list,
        )
        compute_started = time.perf_counter()
        finished = 0
        for batch in loader:
            results = _process_batch(face_extractor, batch, report)
            _write(store, face_root, results, config.max_faces, face_extractor.model_id, write_json, json_dtype)
            report.computed += len(results)
            finished += len(batch)
            if progress is not None:
                progress(finished, len(pending))
        report.compute_seconds = time.perf_counter() - compute_started

    failed = {key for key, _ in report.failures}
    store.refresh()
    for key, _ in unique:
        if key in failed or key not in store:
            continue
        record = store.get(key)
        report.done.append(key)
        report.faces_per_image[int(record["n_faces"])] += 1
        report.truncated += int(record["n_detected"]) > int(record["n_faces"])
    report.seconds = time.perf_counter() - started
    return report


def _stored_model_id(store: FeatureStore, key: str) -> str | None:
    if key not in store:
        return None
    return str(store.get(key).get("model_id"))


def _process_batch(extractor: FaceExtractor, batch, report: FaceReport) -> list[tuple[str, FaceResult]]:
    """Process the loaded items of ``batch`` and record the failures in ``report``.

    Items are decoded images, or ``DetectedFaces`` when the loader ran detection.
    """
    keys, loaded = [], []
    for key, item, error in batch:
        if error is not None:
            report.failures.append((key, error))
            logger.warning("image %s not processed: %s", key, error)
            continue
        keys.append(key)
        loaded.append(item)

    def run(items: list) -> list[FaceResult]:
        detections = [item if isinstance(item, DetectedFaces) else extractor.detector.prepare(item) for item in items]
        return extractor.finish(detections)

    try:
        return list(zip(keys, run(loaded)))
    except (RuntimeError, ValueError, IndexError) as error:
        logger.warning("face batch failed (%s); processing its %d images one at a time", error, len(loaded))
    results = []
    for key, item in zip(keys, loaded):
        try:
            results.append((key, run([item])[0]))
        except (RuntimeError, ValueError, IndexError) as error:
            report.failures.append((key, f"face extraction failed: {type(error).__name__}: {error}"))
            logger.warning("image %s: face extraction failed: %s", key, error)
    return results


def _write(store, face_root, results, max_faces, model_id, write_json, json_dtype) -> None:
    if write_json:
        for key, result in results:
            atomic_write_bytes(json_path(face_root, key), json.dumps(original_json(result, json_dtype)).encode())
    store.write([result.to_record(key, max_faces, model_id) for key, result in results])


# --- the original per-image JSON ------------------------------------------------------------


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def json_path(face_root: Path | str, key: str) -> Path:
    check_safe_id(key)
    return safe_join(face_root, JSON_FOLDER, f"{key}.json")


def original_json(result: FaceResult, dtype: str = "float64") -> dict[str, Any]:
    """Build the fields the original NewsLXMERT scripts wrote per image (see the module docstring)."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"json dtype must be float32 or float64, got {dtype!r}")
    little = np.dtype(dtype).newbyteorder("<")
    return {
        "faces_embeddings": _b64(result.embeddings.astype(little)),
        "n_faces": int(result.n_detected),
        "faces_detect_probs": _b64(result.detect_probs.astype(little)),
        "faces_size": int(result.n_faces),
        "faces_boxes": _b64(result.boxes.astype("<f4")),
    }


def read_original_json(value: Mapping[str, Any]) -> FaceResult:
    """Parse the original per-image fields, detecting float32 or float64 from the byte count."""
    rows = int(value.get("faces_size", 0))
    if rows == 0:
        return empty_result(0, 0)
    raw = _b64decode(value["faces_embeddings"], "faces_embeddings")
    itemsize = len(raw) // (rows * EMBEDDING_SIZE)
    if itemsize not in (4, 8) or itemsize * rows * EMBEDDING_SIZE != len(raw):
        raise ValueError(f"faces_embeddings contains {len(raw)} bytes, which is not {rows} x {EMBEDDING_SIZE} float32 or float64")
    float_type = np.dtype("<f4") if itemsize == 4 else np.dtype("<f8")
    embeddings = np.frombuffer(raw, float_type).reshape(rows, EMBEDDING_SIZE).astype(np.float32)
    if not np.isfinite(embeddings).all():
        raise ValueError("faces_embeddings contains NaN or infinite values")
    probs = np.zeros((rows,), np.float32)
    if value.get("faces_detect_probs"):
        raw_probs = _b64decode(value["faces_detect_probs"], "faces_detect_probs")
        probs = np.frombuffer(raw_probs, np.dtype("<f4") if len(raw_probs) == 4 * rows else np.dtype("<f8"))
        probs = probs.astype(np.float32)[:rows]
    boxes = np.zeros((rows, 4), np.float32)
    if value.get("faces_boxes"):
        boxes = np.frombuffer(_b64decode(value["faces_boxes"], "faces_boxes"), "<f4").reshape(-1, 4)[:rows].astype(np.float32)
    return FaceResult(embeddings, probs, boxes, int(value.get("n_faces", rows)), 0, 0)


def _b64decode(text: Any, field: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a base64 string, found {type(text).__name__}")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError as error:  # binascii.Error
        raise ValueError(f"{field} is not valid base64 ({error})") from None


# --- reading for training -------------------------------------------------------------------


class FaceFeatureReader:
    """Faces per image hash for training: the feature store, else the original JSON files.

    ``get(hash)`` returns ``embeddings`` float32 (max_faces, 512) zero-padded, ``mask`` bool
    (max_faces,) true for real faces, ``n_faces``, ``detect_probs`` float32 (max_faces,) and
    ``boxes`` float32 (max_faces, 4). Stored faces beyond ``max_faces`` are cut off.
    """

    def __init__(self, dataset_root: Path | str, max_faces: int = DEFAULT_MAX_FACES):
        self.face_root = Path(dataset_root) / "face_features"
        self.max_faces = max_faces
        self.store = face_store(self.face_root)

    def __contains__(self, image_hash: object) -> bool:
        if not isinstance(image_hash, str):
            return False
        if image_hash in self.store:
            return True
        try:
            return json_path(self.face_root, image_hash).exists()
        except ValueError:
            return False

    def get(self, image_hash: str) -> dict[str, Any]:
        if image_hash in self.store:
            record = self.store.get(image_hash)
            n = int(record["n_faces"])
            embeddings, probs, boxes = record["embeddings"][:n], record["detect_probs"][:n], record["boxes"][:n]
        else:
            path = json_path(self.face_root, image_hash)
            if not path.exists():
                raise KeyError(
                    f"no faces for image {image_hash} in {self.store.folder} or {path.parent}; "
                    "materialize the face_features asset for its partition first"
                )
            try:
                result = read_original_json(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}: unreadable face features ({type(error).__name__}: {error}); the file is damaged or not "
                    "in the original layout, so replace it or materialize the face_features asset for its partition"
                ) from None
            embeddings, probs, boxes = result.embeddings, result.detect_probs, result.boxes
        n = min(len(embeddings), self.max_faces)
        padded = np.zeros((self.max_faces, EMBEDDING_SIZE), np.float32)
        padded_probs = np.zeros((self.max_faces,), np.float32)
        padded_boxes = np.zeros((self.max_faces, 4), np.float32)
        padded[:n], padded_probs[:n], padded_boxes[:n] = embeddings[:n], probs[:n], boxes[:n]
        mask = np.zeros((self.max_faces,), bool)
        mask[:n] = True
        return {"embeddings": padded, "mask": mask, "n_faces": n, "detect_probs": padded_probs, "boxes": padded_boxes}


# --- command line ---------------------------------------------------------------------------


def image_items(images_dir: Path, limit: int | None = None) -> list[tuple[str, Path]]:
    """Return ``(stem, path)`` of every .jpg/.jpeg/.png file in ``images_dir``, sorted by name."""
    suffixes = {".jpg", ".jpeg", ".png"}
    paths = sorted(path for path in images_dir.iterdir() if path.suffix.lower() in suffixes and path.is_file())
    return [(path.stem, path) for path in paths[:limit]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Detect and embed the faces in a folder of photos.")
    parser.add_argument("images_dir", type=Path, help="folder of .jpg/.jpeg/.png photos; the file stem is the key")
    parser.add_argument("out_dir", type=Path, help="face_features folder to write store/ (and json/) into")
    parser.add_argument("--profile", default=os.environ.get("NEWSLXMERT_PROFILE", "base"), help="base or tiny")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data root whose models/tiny/facenet/ contains the tiny-profile weights "
                        "(default: NEWSLXMERT_DATA_ROOT or ./data)")
    parser.add_argument("--facenet-weights", default=os.environ.get("NEWSLXMERT_FACENET_WEIGHTS") or None,
                        help="vggface2, casia-webface, a state-dict file or a folder (default: by profile)")
    parser.add_argument("--device", default="cpu", help="torch device for both networks, e.g. cpu or cuda:0")
    parser.add_argument("--min-face-size", type=int, default=FaceConfig.min_face_size, help="pixels (default 20)")
    parser.add_argument("--max-faces", type=int, default=DEFAULT_MAX_FACES, help="faces kept per image (default 10)")
    parser.add_argument("--images-per-write", type=int, default=FaceConfig.images_per_write,
                        help="images per store shard (default 64)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader processes decoding images and, on the CPU, running MTCNN (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="process only the first N photos by name")
    parser.add_argument("--json", action="store_true", help="also write the original per-image JSON files")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    config = FaceConfig(
        min_face_size=args.min_face_size,
        max_faces=args.max_faces,
        images_per_write=args.images_per_write,
        loader_workers=args.loader_workers,
    )
    items = image_items(args.images_dir, args.limit)
    data_root = args.data_root or Path(os.environ.get("NEWSLXMERT_DATA_ROOT", "data"))

    def progress(done: int, total: int) -> None:
        print(f"progress {done}/{total}", flush=True)

    report = extract_face_features(
        items,
        args.out_dir,
        config,
        lambda: FaceExtractor.from_settings(config, args.facenet_weights, args.profile, data_root, args.device),
        write_json=args.json,
        progress=progress,
    )
    summary = report.summary()
    summary["settings"] = dataclasses.asdict(config) | {"device": args.device, "profile": args.profile}
    print(json.dumps(summary, indent=1, default=str))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
