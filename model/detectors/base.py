"""The region record every backend returns, and the backend interface."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import torch

N_REGIONS = 36  # visual tokens per image in LXMERT

# Store dtypes are explicit and little-endian, as the original JSON layout is.
ARRAY_FIELDS: dict[str, str] = {
    "roi_features": "<f4",  # [N_REGIONS, D]
    "boxes": "<f4",  # [N_REGIONS, 4] absolute x1 y1 x2 y2 in the upright image
    "normalized_boxes": "<f4",  # [N_REGIONS, 4] boxes divided by width and height
    "obj_ids": "<i8",  # [N_REGIONS]; -1 in padding rows
    "obj_probs": "<f4",  # [N_REGIONS]; 0 in padding rows
    "attr_ids": "<i8",  # [N_REGIONS]; -1 where the backend predicts no attributes
    "attr_probs": "<f4",  # [N_REGIONS]; 0 where the backend predicts no attributes
}
SCALAR_FIELDS = ("n_regions", "image_width", "image_height")
PAD_ID = -1


@dataclasses.dataclass
class RegionFeatures:
    """36 regions of one image; rows at and after ``n_regions`` are padding."""

    roi_features: np.ndarray  # (36, D) float32
    boxes: np.ndarray  # (36, 4) float32
    normalized_boxes: np.ndarray  # (36, 4) float32
    obj_ids: np.ndarray  # (36,) int64
    obj_probs: np.ndarray  # (36,) float32
    attr_ids: np.ndarray  # (36,) int64
    attr_probs: np.ndarray  # (36,) float32
    n_regions: int  # real regions before padding, 0..36
    image_width: int  # upright image size the boxes refer to; -1 when unknown
    image_height: int

    @property
    def feature_dim(self) -> int:
        return int(self.roi_features.shape[1])

    def to_record(self, key: str) -> dict[str, Any]:
        """Return the fields as a feature-store record with explicit little-endian dtypes."""
        record: dict[str, Any] = {"key": key}
        for name, dtype in ARRAY_FIELDS.items():
            record[name] = np.ascontiguousarray(getattr(self, name), dtype=dtype)
        for name in SCALAR_FIELDS:
            record[name] = np.int64(getattr(self, name))
        return record

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in list(ARRAY_FIELDS) + list(SCALAR_FIELDS)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RegionFeatures":
        arrays = {name: np.asarray(values[name], dtype=dtype) for name, dtype in ARRAY_FIELDS.items()}
        scalars = {name: int(values[name]) for name in SCALAR_FIELDS}
        return cls(**arrays, **scalars)


def pad_regions(
    roi_features: np.ndarray,
    boxes: np.ndarray,
    obj_ids: np.ndarray,
    obj_probs: np.ndarray,
    width: int,
    height: int,
    attr_ids: np.ndarray | None = None,
    attr_probs: np.ndarray | None = None,
    n_regions: int = N_REGIONS,
) -> RegionFeatures:
    """Pad (or check) ``k <= n_regions`` detected regions to exactly ``n_regions`` rows.

    ``boxes`` are absolute x1 y1 x2 y2 in the upright image of ``width`` x ``height``.
    More than ``n_regions`` rows raise ValueError: callers choose which regions to keep.
    """
    count, dim = roi_features.shape
    if count > n_regions:
        raise ValueError(f"{count} regions given, at most {n_regions} fit; select the top {n_regions} first")
    if boxes.shape != (count, 4) or obj_ids.shape != (count,) or obj_probs.shape != (count,):
        raise ValueError(
            f"region arrays disagree: roi_features {roi_features.shape}, boxes {boxes.shape}, "
            f"obj_ids {obj_ids.shape}, obj_probs {obj_probs.shape}"
        )

    def padded(values: np.ndarray | None, shape: tuple[int, ...], dtype: str, fill: float) -> np.ndarray:
        out = np.full(shape, fill, dtype=dtype)
        if values is not None and count:
            out[:count] = values
        return out

    boxes_out = padded(boxes, (n_regions, 4), "<f4", 0.0)
    scale = np.array([width, height, width, height], dtype=np.float32)
    normalized = np.zeros((n_regions, 4), dtype="<f4")
    normalized[:count] = boxes_out[:count] / scale
    return RegionFeatures(
        roi_features=padded(roi_features, (n_regions, dim), "<f4", 0.0),
        boxes=boxes_out,
        normalized_boxes=normalized,
        obj_ids=padded(obj_ids, (n_regions,), "<i8", PAD_ID),
        obj_probs=padded(obj_probs, (n_regions,), "<f4", 0.0),
        attr_ids=padded(attr_ids, (n_regions,), "<i8", PAD_ID),
        attr_probs=padded(attr_probs, (n_regions,), "<f4", 0.0),
        n_regions=count,
        image_width=int(width),
        image_height=int(height),
    )


@dataclasses.dataclass
class DecodedImage:
    """One image ready for a backend: upright RGB pixels, or only the key for backends that need none."""

    key: str  # image hash
    pixels: torch.Tensor | None  # (3, H, W) uint8, RGB
    width: int
    height: int
    network_input: torch.Tensor | None = None  # set by RegionBackend.prepare; backend-specific


@dataclasses.dataclass
class RegionFailure:
    """One image a backend could not handle, with the reason; the run goes on."""

    reason: str


class RegionBackend:
    """A Faster R-CNN (or a reader of precomputed features) producing RegionFeatures.

    Subclasses set ``name``, ``feature_dim``, ``has_attributes`` and ``needs_pixels`` and
    implement ``extract``.
    """

    name: str = "abstract"
    feature_dim: int = 0
    has_attributes: bool = False
    needs_pixels: bool = True

    def prepare(self, image: DecodedImage) -> DecodedImage:
        """Preprocess one image where it was decoded (a DataLoader worker); by default nothing."""
        return image

    def extract(self, images: list[DecodedImage]) -> list[RegionFeatures | RegionFailure]:
        """Return one result per image, in order; raise only for errors of the whole batch."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Return the settings that determine the output (backend, weights, sizes, thresholds)."""
        raise NotImplementedError

    def signature(self) -> str:
        """Return a stable text of ``describe()``: features from different signatures must not be mixed."""
        import json

        return json.dumps(self.describe(), sort_keys=True)


def choose_regions(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    nms_thresh: float,
    score_thresh: float,
    min_regions: int,
    max_regions: int,
) -> torch.Tensor:
    """Return indexes of the regions to keep, by decreasing score, as bottom-up attention selects them.

    Each candidate RoI comes with its best class (``labels``), that class's probability
    (``scores``) and box. Per-class NMS at ``nms_thresh`` removes duplicates. Candidates
    scoring above ``score_thresh`` are kept up to ``max_regions``; when fewer than
    ``min_regions`` pass, the ``min_regions`` best are kept regardless of score.
    """
    from torchvision.ops import batched_nms, remove_small_boxes

    candidates = remove_small_boxes(boxes, min_size=1e-2)
    keep = batched_nms(boxes[candidates], scores[candidates], labels[candidates], nms_thresh)
    candidates = candidates[keep]  # sorted by decreasing score
    above = candidates[scores[candidates] > score_thresh]
    minimum = min(min_regions, max_regions)
    return above[:max_regions] if len(above) >= minimum else candidates[:minimum]


def padded_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """Return the (H, W) a detector pads an input of this size to."""
    if divisor <= 1:
        return height, width
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor
