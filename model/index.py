"""The pair index: per split, which (article, image) pairs have everything training needs.

``<dataset_root>/index/<split>.pickle`` contains ``{i: (aid, iid)}`` as the original NewsLXMERT
expects, ``<split>.parquet`` the same rows with the image hash, and ``<split>.pickle.sha256``
the SHA-256 of both files. ``load_index`` reads a pickle only when that fingerprint shows
that this pipeline wrote it (and then reads the Parquet twin); a pickle from elsewhere is
rejected unless the caller opts in, and even then it is read with an unpickler that
resolves no classes or functions, so it cannot run code.

Pairs are ordered by (aid, iid), so the order does not depend on how the articles were
partitioned. A pair is dropped, and counted by reason, when its image has no region
features, failed extraction, or (with faces required) has no face features.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from model.documents import TEXT_STAGE, article_images, iter_articles
from model.manifest import list_manifests
from model.storage import atomic_write_bytes, canonical_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
INDEX_STAGE = "index"
MAX_EXAMPLES = 10
FINGERPRINT_WRITER = "newslxmert index"

NO_REGION_FEATURES = "no_region_features"
REGION_FEATURES_FAILED = "region_features_failed"
NO_FACE_FEATURES = "no_face_features"
FACE_FEATURES_FAILED = "face_features_failed"
MALFORMED_ARTICLE = "malformed_article"
DROP_REASONS = (NO_REGION_FEATURES, REGION_FEATURES_FAILED, NO_FACE_FEATURES, FACE_FEATURES_FAILED, MALFORMED_ARTICLE)


class UntrustedIndexError(ValueError):
    """A pickle index has no matching fingerprint from this pipeline."""


@dataclasses.dataclass(frozen=True)
class IndexedPair:
    aid: str
    iid: int
    image_hash: str


@dataclasses.dataclass
class FeatureAvailability:
    """The image hashes a feature stage finished or failed, over all its partitions."""

    done: set[str] = dataclasses.field(default_factory=set)
    failed: set[str] = dataclasses.field(default_factory=set)

    @classmethod
    def from_manifests(cls, manifests: Mapping[str, Mapping[str, Any]]) -> "FeatureAvailability":
        availability = cls()
        for manifest in manifests.values():
            availability.done.update(str(item) for item in manifest.get("done", []))
            for item in manifest.get("failed", []):
                # Failure records may be bare hashes or {"hash"/"image_hash"/"id": ..., "reason": ...}.
                if isinstance(item, Mapping):
                    item = item.get("image_hash") or item.get("hash") or item.get("id")
                availability.failed.add(str(item))
        availability.failed -= availability.done  # a later partition run may have fixed it
        return availability


@dataclasses.dataclass
class IndexReport:
    """Counts and examples of one index build, for logs and asset metadata."""

    per_split: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    leaked_hashes: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # hash -> splits
    duplicate_images: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> pairs sharing an image
    articles: int = 0
    paths: dict[str, str] = dataclasses.field(default_factory=dict)
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def kept(self) -> int:
        return sum(self.per_split.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def dropped_share(self) -> float:
        seen = self.kept + self.dropped_total
        return self.dropped_total / seen if seen else 0.0

    def drop(self, reason: str, aid: str, iid: int | None) -> None:
        self.dropped[reason] += 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(aid if iid is None else f"{aid}/{iid}")

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": self.kept,
            "per_split": dict(self.per_split),
            "articles": self.articles,
            "dropped": self.dropped_total,
            "dropped_share": round(self.dropped_share, 6),
            "dropped_by_reason": {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS},
            "dropped_examples": self.dropped_examples,
            "leaked_images": len(self.leaked_hashes),
            "leaked_examples": dict(list(sorted(self.leaked_hashes.items()))[:MAX_EXAMPLES]),
            "duplicate_images": self.duplicate_images,
            "paths": self.paths,
            "fingerprints": self.fingerprints,
            "seconds": round(self.seconds, 3),
        }


def collect_pairs(
    documents: Iterable[tuple[str, Mapping[str, Any]]],
    regions: FeatureAvailability,
    faces: FeatureAvailability | None,
    report: IndexReport,
) -> dict[str, list[IndexedPair]]:
    """Keep the pairs whose image has region features (and face features when ``faces`` is given)."""
    pairs: dict[str, list[IndexedPair]] = collections.defaultdict(list)
    for split, document in documents:
        report.articles += 1
        aid = str(document.get("_id", ""))
        try:
            images = article_images(document)
        except ValueError as error:
            logger.warning("article %s left out of the index: %s", aid, error)
            report.drop(MALFORMED_ARTICLE, aid, None)
            continue
        for ref in images:
            if ref.image_hash in regions.failed:
                report.drop(REGION_FEATURES_FAILED, aid, ref.iid)
            elif ref.image_hash not in regions.done:
                report.drop(NO_REGION_FEATURES, aid, ref.iid)
            elif faces is not None and ref.image_hash in faces.failed:
                report.drop(FACE_FEATURES_FAILED, aid, ref.iid)
            elif faces is not None and ref.image_hash not in faces.done:
                report.drop(NO_FACE_FEATURES, aid, ref.iid)
            else:
                pairs[split].append(IndexedPair(aid=aid, iid=ref.iid, image_hash=ref.image_hash))
    for split in pairs:
        pairs[split].sort(key=lambda pair: (pair.aid, pair.iid))
    return pairs


def find_leakage(pairs: Mapping[str, list[IndexedPair]]) -> dict[str, list[str]]:
    """Image hashes that occur in more than one split, with those splits."""
    splits_of: dict[str, set[str]] = collections.defaultdict(set)
    for split, split_pairs in pairs.items():
        for pair in split_pairs:
            splits_of[pair.image_hash].add(split)
    return {image_hash: sorted(splits) for image_hash, splits in splits_of.items() if len(splits) > 1}


def index_folder(dataset_root: str | Path) -> Path:
    return Path(dataset_root) / INDEX_STAGE


def index_path(dataset_root: str | Path, split: str) -> Path:
    return index_folder(dataset_root) / f"{split}.pickle"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_split_index(folder: Path, split: str, pairs: list[IndexedPair]) -> str:
    """Write ``<split>.pickle``, ``<split>.parquet`` and the fingerprint; returns the pickle's SHA-256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mapping = {i: (pair.aid, pair.iid) for i, pair in enumerate(pairs)}
    pickle_bytes = pickle.dumps(mapping, protocol=4)
    table = pa.table(
        {
            "i": pa.array(range(len(pairs)), type=pa.int64()),
            "aid": pa.array([pair.aid for pair in pairs], type=pa.string()),
            "iid": pa.array([pair.iid for pair in pairs], type=pa.int64()),
            "image_hash": pa.array([pair.image_hash for pair in pairs], type=pa.string()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    parquet_bytes = buffer.getvalue()

    atomic_write_bytes(folder / f"{split}.parquet", parquet_bytes)
    atomic_write_bytes(folder / f"{split}.pickle", pickle_bytes)
    fingerprint = {
        "writer": FINGERPRINT_WRITER,
        "pairs": len(pairs),
        "pickle_sha256": _sha256(pickle_bytes),
        "parquet_sha256": _sha256(parquet_bytes),
    }
    atomic_write_bytes(folder / f"{split}.pickle.sha256", canonical_json(fingerprint).encode("utf-8"))
    return fingerprint["pickle_sha256"]


def build_index(
    dataset_root: str | Path,
    dataset: str,
    require_faces: bool = True,
    splits: Iterable[str] = SPLITS,
) -> IndexReport:
    """Build the index of every split from all partitions' manifests; returns the report.

    Reads the article manifests of the dataset's text stage (``articles``, or
    ``translated_articles`` for NewsImages) and the ``region_features`` and
    ``face_features`` manifests.
    """
    started = time.perf_counter()
    dataset_root = Path(dataset_root)
    article_stage = TEXT_STAGE[dataset]
    article_manifests = list_manifests(dataset_root, article_stage)
    if not article_manifests:
        raise FileNotFoundError(
            f"no {article_stage} manifests under {dataset_root / article_stage}; materialize {dataset}/{article_stage} first"
        )
    items = sorted({(str(split), str(aid)) for manifest in article_manifests.values() for split, aid in manifest.get("articles", [])})
    regions = FeatureAvailability.from_manifests(list_manifests(dataset_root, "region_features"))
    faces = FeatureAvailability.from_manifests(list_manifests(dataset_root, "face_features")) if require_faces else None

    report = IndexReport()
    pairs = collect_pairs(iter_articles(dataset_root / article_stage, items), regions, faces, report)
    report.leaked_hashes = find_leakage(pairs)

    folder = index_folder(dataset_root)
    all_splits = list(dict.fromkeys([*splits, *sorted(pairs)]))
    for split in all_splits:
        split_pairs = pairs.get(split, [])
        report.per_split[split] = len(split_pairs)
        report.duplicate_images[split] = len(split_pairs) - len({pair.image_hash for pair in split_pairs})
        report.fingerprints[split] = write_split_index(folder, split, split_pairs)
        report.paths[split] = str(folder / f"{split}.pickle")
    report.seconds = time.perf_counter() - started
    atomic_write_bytes(folder / "_report.json", canonical_json(report.summary()).encode("utf-8"))
    return report


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: every class or function lookup fails."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the index refers to {module}.{name}, but an index may contain only dicts, tuples, strings and ints")


def _pairs_from_mapping(mapping: Any, path: Path) -> list[tuple[str, int]]:
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} contains a {type(mapping).__name__}, not a dict {{i: (aid, iid)}}")
    pairs = []
    for key in sorted(mapping):
        value = mapping[key]
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"{path}: entry {key!r} is {value!r}, not an (aid, iid) pair")
        pairs.append((str(value[0]), int(value[1])))
    return pairs


def _read_parquet_pairs(path: Path) -> list[tuple[str, int]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["i", "aid", "iid"]).sort_by("i")
    return list(zip(table.column("aid").to_pylist(), [int(value) for value in table.column("iid").to_pylist()]))


def load_index(path: str | Path, allow_foreign_pickle: bool = False) -> list[tuple[str, int]]:
    """Read an index as a list of (aid, iid) in ``i`` order, from a ``.parquet`` or ``.pickle`` path.

    A pickle must have a matching ``<name>.sha256`` fingerprint written by ``build_index``;
    then its Parquet twin is read. Without one, UntrustedIndexError is raised unless
    ``allow_foreign_pickle`` is set, in which case the pickle is read without resolving any
    class or function.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index {path} not found; materialize the index asset or pass an existing file")
    if path.suffix == ".parquet":
        return _read_parquet_pairs(path)

    data = path.read_bytes()
    sidecar = path.with_name(path.name + ".sha256")
    fingerprint: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            fingerprint = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            fingerprint = {}
    trusted = fingerprint.get("writer") == FINGERPRINT_WRITER and fingerprint.get("pickle_sha256") == _sha256(data)
    if trusted:
        twin = path.with_suffix(".parquet")
        if twin.is_file() and _sha256(twin.read_bytes()) == fingerprint.get("parquet_sha256"):
            return _read_parquet_pairs(twin)
    elif not allow_foreign_pickle:
        raise UntrustedIndexError(
            f"{path} was not written by this pipeline (no matching fingerprint in {sidecar.name}), so it is not "
            "unpickled; rebuild it with the index asset, or allow foreign indexes (--trustIndex True) to read it "
            "with an unpickler that loads only dicts, tuples, strings and ints"
        )
    try:
        mapping = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a plain {{i: (aid, iid)}} pickle: {error}") from error
    return _pairs_from_mapping(mapping, path)


def index_fingerprint(path: str | Path) -> str:
    """SHA-256 of an index file, to record which data a model was trained on."""
    return _sha256(Path(path).read_bytes())
