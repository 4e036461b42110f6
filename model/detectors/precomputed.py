"""A backend that reads features extracted earlier by the original NewsLXMERT scripts.

The folder contains one file per image in the original JSON layout, named ``<hash>.json`` or
``<hash>.jpg`` (see ``model.region_json``). No pixels are needed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from model.detectors.base import DecodedImage, RegionBackend, RegionFailure, RegionFeatures
from model.region_json import RegionJsonError, find_region_json, list_region_json, read_region_json


SIZING_SAMPLE = 16  # readable files whose feature size decides the folder's


class PrecomputedBackend(RegionBackend):
    """Region features read from ``folder``; the feature dimension is that of its files."""

    name = "precomputed"
    needs_pixels = False

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"precomputed feature folder {self.folder} not found; set 'precomputed_dir' to the folder "
                "holding <hash>.json (or <hash>.jpg) files from the original extraction"
            )
        self.feature_dim = self._common_feature_dim()
        self.has_attributes = True

    def _common_feature_dim(self, sample: int = SIZING_SAMPLE) -> int:
        """Return the most common feature size among the first ``sample`` readable files, 0 for none.

        A damaged file fails for its own image in extract(). A vote keeps one file whose
        roi_features were cut to a whole number of shorter rows from setting the size.
        """
        sizes: Counter = Counter()
        for path in list_region_json(self.folder).values():
            try:
                sizes[read_region_json(path).feature_dim] += 1
            except RegionJsonError:
                continue
            if sum(sizes.values()) >= sample:
                break
        return sizes.most_common(1)[0][0] if sizes else 0

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "weights": str(self.folder), "feature_dim": self.feature_dim}

    def extract(self, images: list[DecodedImage]) -> list[RegionFeatures | RegionFailure]:
        results: list[RegionFeatures | RegionFailure] = []
        for image in images:
            path = find_region_json(self.folder, image.key)
            if path is None:
                results.append(RegionFailure(f"no {image.key}.json or {image.key}.jpg in {self.folder}"))
                continue
            try:
                features = read_region_json(path, feature_dim=self.feature_dim or None)
            except RegionJsonError as error:
                results.append(RegionFailure(str(error)))
                continue
            if self.feature_dim and features.feature_dim != self.feature_dim:
                results.append(
                    RegionFailure(f"{path}: roi_features have {features.feature_dim} columns, the folder's other files {self.feature_dim}")
                )
                continue
            if features.image_width < 0 and image.width > 0:
                features.image_width, features.image_height = image.width, image.height
            results.append(features)
        return results
