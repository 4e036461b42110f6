"""Content fingerprints of stage outputs, for asset metadata and Dagster data versions.

A fingerprint is the SHA-256 (hex, first 32 digits) of what a stage produced, computed so
that equal content gives an equal fingerprint whatever the order of listing. Every asset
returns the fingerprint of what it wrote as its data version,

    MaterializeResult(data_version=DataVersion(fp), metadata={"data_fingerprint": fp, ...})

so the Dagster UI keeps downstream assets up to date after a re-run that changed nothing,
and marks them stale after one that changed data.

Each stage's version reads only what is cheap to read:

- article, translated-article and entity files, image files, index sidecars, checkpoint
  folders and evaluation reports: the SHA-256 of their bytes;
- feature-store rows (region and face features): where each row is stored, see
  :func:`store_rows_fingerprint`, because rereading them would cost gigabytes per run;
- MongoDB documents: their canonical JSON.

A partitioned stage computes one fingerprint per partition, and
:func:`combine_partition_fingerprints` turns those of a run into its version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from model.manifest import UNPARTITIONED, manifest_path
from model.storage import canonical_json, check_safe_id

FINGERPRINT_DIGITS = 32
_CHUNK = 1 << 20

# Files of the evaluation report that the metrics come from; metrics.md and the histogram
# are drawn from the same numbers.
EVALUATION_FILES = ("metrics.json", "ranks.parquet")


def fingerprint_value(value: Any) -> str:
    """Fingerprint of a JSON-compatible value (manifests, settings), through canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:FINGERPRINT_DIGITS]


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_files(root: Path | str, relative_paths: Iterable[str]) -> str:
    """Fingerprint of the named files under ``root``: their paths and bytes.

    Paths are ``/``-separated. A file may be a symbolic link to a file elsewhere (the
    images stage links files of a local source folder), and is read through the link.
    Raises FileNotFoundError naming the first missing file, and UnsafePathError for a
    path with an empty, ``.`` or ``..`` component.
    """
    digest = hashlib.sha256()
    for relative in sorted(set(relative_paths)):
        path = Path(root).joinpath(*(check_safe_id(part) for part in relative.split("/")))
        if not path.is_file():
            raise FileNotFoundError(f"cannot fingerprint {relative}: no such file under {root}")
        digest.update(f"{relative}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def fingerprint_manifests(dataset_root: Path | str, stage: str, partitions: Iterable[str | None]) -> str:
    """Fingerprint of a stage's manifests for ``partitions`` (None is the unpartitioned ``all``).

    Raises FileNotFoundError naming a missing manifest.
    """
    digest = hashlib.sha256()
    for partition in sorted(set(partitions), key=lambda p: p or ""):
        path = manifest_path(dataset_root, stage, partition)
        if not path.is_file():
            raise FileNotFoundError(f"cannot fingerprint {stage} partition {partition or 'all'}: no manifest at {path}")
        digest.update(f"{partition or ''}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def combine_partition_fingerprints(fingerprints: Mapping[str | None, str]) -> str:
    """Return the data version of a run from the fingerprints of its partitions.

    A run of one partition (or an unpartitioned run) gets that fingerprint itself. A run of
    several gets the fingerprint of the whole mapping, because Dagster 1.13 records one
    data version for every partition of a multi-partition run.
    """
    if not fingerprints:
        raise ValueError("a run covers at least one partition; got no fingerprints")
    if len(fingerprints) == 1:
        return next(iter(fingerprints.values()))
    return fingerprint_value({partition or UNPARTITIONED: value for partition, value in fingerprints.items()})


# --------------------------------------------------------------------------- manifests and files


def _read_manifest(dataset_root: Path | str, stage: str, partition: str | None) -> tuple[str, dict[str, Any]]:
    """Return the SHA-256 of a manifest file and its content, both from one read."""
    path = manifest_path(dataset_root, stage, partition)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"cannot fingerprint {stage} partition {partition or UNPARTITIONED}: no manifest at {path}"
        ) from None
    return hashlib.sha256(data).hexdigest(), json.loads(data)


def _manifest_and_files(dataset_root: Path | str, stage: str, manifest_sha256: str, relative_paths: Iterable[str]) -> str:
    files = fingerprint_files(Path(dataset_root) / stage, relative_paths)
    return fingerprint_value({"manifest": manifest_sha256, "files": files})


def article_files_fingerprint(dataset_root: Path | str, stage: str, partition: str | None) -> str:
    """Fingerprint the article files a stage listed for ``partition``: ``<stage>/<split>/<aid>.json``.

    For the ``articles`` stage of both datasets and for ``translated_articles``.
    """
    manifest_sha256, manifest = _read_manifest(dataset_root, stage, partition)
    paths = [f"{split}/{check_safe_id(aid)}.json" for split, aid in manifest["articles"]]
    return _manifest_and_files(dataset_root, stage, manifest_sha256, paths)


def entity_files_fingerprint(dataset_root: Path | str, partition: str | None, stage: str = "entities") -> str:
    """Fingerprint the entity files the entities stage listed for ``partition``: ``<stage>/<aid>.json``."""
    manifest_sha256, manifest = _read_manifest(dataset_root, stage, partition)
    paths = [f"{check_safe_id(aid)}.json" for _, aid in manifest["articles"]]
    return _manifest_and_files(dataset_root, stage, manifest_sha256, paths)


def image_files_fingerprint(dataset_root: Path | str, partition: str | None, stage: str = "images") -> str:
    """Fingerprint the image files the images stage listed for ``partition``: ``<stage>/<hash>.jpg``.

    The bytes are hashed because an image hash need not name the content: the demo corpus
    and NewsImages derive it from the URL or the source's id.
    """
    manifest_sha256, manifest = _read_manifest(dataset_root, stage, partition)
    paths = [f"{check_safe_id(image_hash)}.jpg" for image_hash in manifest["images"]]
    return _manifest_and_files(dataset_root, stage, manifest_sha256, paths)


def folder_fingerprint(folder: Path | str) -> str:
    """Fingerprint every file under ``folder`` (paths and bytes), such as a checkpoint folder.

    Hidden files (a name starting with a dot, such as the temporary files of atomic
    writes) are left out. Raises FileNotFoundError when ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {folder}: not a folder")
    paths = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            paths.append(relative.as_posix())
    return fingerprint_files(folder, paths)


def index_files_fingerprint(index_folder: Path | str, splits: Iterable[str]) -> str:
    """Fingerprint the pair index of ``splits``, through their ``<split>.pickle.sha256`` files.

    Each of those files contains the SHA-256 of the split's pickle and Parquet twin, written
    by ``model.index.build_index`` together with them, so the index is not read again.
    """
    return fingerprint_files(index_folder, [f"{check_safe_id(split)}.pickle.sha256" for split in splits])


def evaluation_fingerprint(output_dir: Path | str) -> str:
    """Fingerprint an evaluation report: ``metrics.json`` and ``ranks.parquet``."""
    return fingerprint_files(output_dir, EVALUATION_FILES)


# --------------------------------------------------------------------------- feature stores


@contextlib.contextmanager
def _shared_store_lock(store_folder: Path) -> Iterator[None]:
    """Hold a shared lock on the store's writer lock file, so that no shard is written or deleted meanwhile."""
    with open(store_folder / ".lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def store_row_locations(store_folder: Path | str, keys: Iterable[str]) -> tuple[dict[str, tuple[str, int]], dict[str, list[int]]]:
    """Find where a feature store keeps ``keys``.

    Returns the shard file name and row of each stored key (keys not stored are left out),
    and the size in bytes and modification time in nanoseconds of each shard named. The
    store's rule applies: the last row of a key in the last shard wins.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    from model.feature_store import KEY_FIELD, SHARD_DIR, SHARD_PATTERN

    store_folder = Path(store_folder)
    requested = pa.array(sorted(set(keys)), type=pa.string())
    shard_dir = store_folder / SHARD_DIR
    if not shard_dir.is_dir() or len(requested) == 0:
        return {}, {}

    locations: dict[str, tuple[str, int]] = {}
    with _shared_store_lock(store_folder):
        numbered = sorted((int(match.group(1)), path) for path in shard_dir.iterdir() if (match := SHARD_PATTERN.match(path.name)))
        for _, path in numbered:
            with pa.memory_map(str(path), "r") as source:
                column = ipc.open_file(source).read_all().column(KEY_FIELD)
                rows = pc.indices_nonzero(pc.is_in(column, value_set=requested))
                found = column.take(rows).to_pylist()
            for key, row in zip(found, rows.to_pylist()):
                locations[key] = (path.name, row)
        used = sorted({name for name, _ in locations.values()})
        shards = {}
        for name in used:
            stat = (shard_dir / name).stat()
            shards[name] = [stat.st_size, stat.st_mtime_ns]
    return locations, shards


def store_rows_fingerprint(store_folder: Path | str, keys: Iterable[str]) -> str:
    """Fingerprint the feature-store rows of ``keys`` by where they are stored.

    A row is named by its shard file (name, size and modification time) and its row
    number. Shards are written once and never changed, so any rewrite of a key moves it to
    a new shard and changes the fingerprint, while a run that skips stored keys leaves it
    as it was. Keys not in the store count as missing.

    NOTE: rewriting equal features (the ``overwrite`` setting, merging shards, copying the
    data root without keeping modification times) also changes the fingerprint, which
    marks downstream assets stale without need.
    """
    keys = sorted(set(keys))
    locations, shards = store_row_locations(store_folder, keys)
    return fingerprint_value(
        {
            "rows": {key: list(locations[key]) for key in keys if key in locations},
            "missing": [key for key in keys if key not in locations],
            "shards": shards,
        }
    )


def feature_stage_fingerprint(
    dataset_root: Path | str,
    stage: str,
    partition: str | None,
    store_folder: Path | str,
    identity_files: Iterable[str] = (),
) -> str:
    """Fingerprint a feature stage for ``partition``: its manifest, the store rows of the
    images it lists as ``done``, and ``identity_files`` under the stage folder (such as
    ``extractor.json``, the settings and weights that made the features).
    """
    manifest_sha256, manifest = _read_manifest(dataset_root, stage, partition)
    return fingerprint_value(
        {
            "manifest": manifest_sha256,
            "rows": store_rows_fingerprint(store_folder, manifest["done"]),
            "identity": fingerprint_files(Path(dataset_root) / stage, identity_files),
        }
    )


# --------------------------------------------------------------------------- MongoDB documents


def documents_fingerprint(documents: Iterable[Mapping[str, Any]]) -> str:
    """Fingerprint documents in the given order, through their canonical JSON."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(canonical_json(document).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def collection_fingerprint(collection, query: Mapping[str, Any], page_size: int = 500) -> str:
    """Fingerprint the documents of a pymongo ``collection`` that match ``query``, in ``_id`` order.

    Reads page by page with short queries (``model.export.iter_documents_by_id_range``), so
    no cursor stays open while the pages are hashed.
    """
    from model.export import iter_documents_by_id_range

    pages = iter_documents_by_id_range(collection, query, page_size=page_size)
    return documents_fingerprint(document for page in pages for document in page)
