"""Data-quality measurements over the stages' outputs, for the pipeline's asset checks.

Each function reads what a stage wrote (its partition manifest, its feature store, the
index files) and returns plain numbers and example ids. The caller decides pass or fail. Manifest fields read here:

- ``images``: ``{"images": [hash, ...], "failed": [{"image_hash", "aid", "reason"}, ...]}``
- ``region_features``, ``face_features``: ``{"done": [hash, ...], "failed": [{"image_hash", "reason"}, ...]}``
- ``entities``: ``{"articles": [[split, aid], ...], "failed": [{"aid", "reason"}, ...]}``
- ``articles``, ``translated_articles``: ``{"articles": [[split, aid], ...]}``
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from model.documents import load_article
from model.feature_store import FeatureStore

MAX_EXAMPLES = 10

# The list of a stage's manifest that names the items it finished.
DONE_FIELD = {
    "images": "images",
    "region_features": "done",
    "face_features": "done",
    "entities": "articles",
}


@dataclasses.dataclass
class FailureShare:
    """Items a stage finished and failed in one partition."""

    done: int
    failed: int
    examples: list[str]

    @property
    def total(self) -> int:
        return self.done + self.failed

    @property
    def share(self) -> float:
        return self.failed / self.total if self.total else 0.0


def _failure_label(failure: Any) -> str:
    if isinstance(failure, Mapping):
        item = failure.get("image_hash") or failure.get("aid") or "?"
        return f"{item}: {failure.get('reason', 'no reason given')}"
    return str(failure)


def failure_share(manifests: Iterable[Mapping[str, Any]], stage: str) -> FailureShare:
    """Finished and failed items over ``manifests`` of ``stage``, with example failures."""
    done_field = DONE_FIELD[stage]
    done = failed = 0
    examples: list[str] = []
    for manifest in manifests:
        if done_field not in manifest or "failed" not in manifest:
            raise ValueError(
                f"{stage} manifest has no {done_field!r} or 'failed' list (keys: {sorted(manifest)}); "
                "re-materialize the stage with the current code"
            )
        done += len(manifest[done_field])
        failed += len(manifest["failed"])
        for failure in manifest["failed"]:
            if len(examples) < MAX_EXAMPLES:
                examples.append(_failure_label(failure))
    return FailureShare(done=done, failed=failed, examples=examples)


@dataclasses.dataclass
class FiniteScan:
    """Float fields of feature-store items checked for NaN and infinity."""

    checked: int
    missing: list[str]  # keys listed as done but absent from the store
    nonfinite: list[str]  # "key: field" for every item and field holding NaN or inf

    @property
    def passed(self) -> bool:
        return not self.nonfinite and not self.missing


def scan_nonfinite(store_folder: Path | str, keys: Sequence[str], batch_size: int = 256) -> FiniteScan:
    """Check every float field of ``keys`` in the store for NaN and infinity."""
    store = FeatureStore(store_folder)
    present = [key for key in keys if key in store]
    missing = [key for key in keys if key not in store]
    float_fields = [name for name, spec in store.schema.items() if spec.dtype != "str" and np.dtype(spec.dtype).kind == "f"]
    nonfinite: list[str] = []
    for start in range(0, len(present), batch_size):
        chunk = present[start : start + batch_size]
        batch = store.get_batch(chunk)
        for name in float_fields:
            values = batch[name].reshape(len(chunk), -1)
            bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
            nonfinite.extend(f"{chunk[row]}: {name}" for row in bad_rows)
    return FiniteScan(checked=len(present), missing=missing, nonfinite=nonfinite)


@dataclasses.dataclass
class FaceCounts:
    """Faces per image over a set of images."""

    images: int
    histogram: dict[int, int]  # faces -> images
    out_of_range: list[str]  # "key: n" where n is negative or above max_faces

    @property
    def mean(self) -> float:
        faces = sum(count * images for count, images in self.histogram.items())
        return faces / self.images if self.images else 0.0


def count_faces(store_folder: Path | str, keys: Sequence[str], max_faces: int, field: str = "n_faces") -> FaceCounts:
    """Histogram of the stored face count per image, and the images whose count breaks [0, max_faces]."""
    store = FeatureStore(store_folder)
    histogram: collections.Counter = collections.Counter()
    out_of_range: list[str] = []
    images = 0
    for key in keys:
        if key not in store:
            continue
        n = int(store.get(key)[field])
        images += 1
        histogram[n] += 1
        if n < 0 or n > max_faces:
            out_of_range.append(f"{key}: {n}")
    return FaceCounts(images=images, histogram=dict(sorted(histogram.items())), out_of_range=out_of_range)


def images_in_several_splits(index_dir: Path | str) -> dict[str, list[str]]:
    """Image hashes that the index puts in more than one split, with those splits.

    Reads the Parquet twins ``<split>.parquet`` (columns ``aid``, ``iid``, ``image_hash``).
    """
    import pyarrow.parquet as pq

    splits_of: dict[str, set[str]] = collections.defaultdict(set)
    paths = sorted(Path(index_dir).glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no <split>.parquet files in {index_dir}; materialize the index first")
    for path in paths:
        for image_hash in pq.read_table(path, columns=["image_hash"]).column("image_hash").to_pylist():
            splits_of[image_hash].add(path.stem)
    return {image_hash: sorted(splits) for image_hash, splits in sorted(splits_of.items()) if len(splits) > 1}


@dataclasses.dataclass
class TranslationCoverage:
    """Articles of a partition and how many have an English version."""

    articles: int
    translated: int
    untranslated_examples: list[str]
    without_english: list[str]  # translated documents that lack title_en or text_en

    @property
    def share(self) -> float:
        return self.translated / self.articles if self.articles else 1.0


def translation_coverage(
    source_items: Iterable[Sequence[str]],
    translated_items: Iterable[Sequence[str]],
    translated_root: Path | str,
    english_fields: Sequence[str] = ("title_en", "text_en"),
) -> TranslationCoverage:
    """Compare the articles of a partition with their translated documents.

    Every translated document is opened to check that each English field is present.
    """
    source = {tuple(item) for item in source_items}
    translated = {tuple(item) for item in translated_items}
    untranslated = sorted(source - translated)
    without_english = []
    for split, aid in sorted(translated):
        document = load_article(translated_root, split, aid)
        absent = [name for name in english_fields if not isinstance(document.get(name), str)]
        if absent:
            without_english.append(f"{aid}: no {', '.join(absent)}")
    return TranslationCoverage(
        articles=len(source),
        translated=len(source & translated),
        untranslated_examples=[aid for _, aid in untranslated[:MAX_EXAMPLES]],
        without_english=without_english,
    )
