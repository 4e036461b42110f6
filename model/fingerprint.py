"""Content fingerprints of stage outputs, for asset metadata and Dagster data versions.

A fingerprint is the SHA-256 (hex, first 32 digits) of what a stage produced, computed so
that equal content gives an equal fingerprint whatever the order of listing. An asset
that returns one as its data version, for example

    MaterializeResult(data_version=DataVersion(fp), metadata={"data_fingerprint": fp, ...})

lets the Dagster UI keep downstream assets up to date after a re-run that changed
nothing, and mark them stale after one that changed data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

from model.manifest import manifest_path
from model.storage import canonical_json, safe_join

FINGERPRINT_DIGITS = 32
_CHUNK = 1 << 20


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

    Raises FileNotFoundError naming the first missing file, and UnsafePathError for a
    path that leaves ``root``.
    """
    digest = hashlib.sha256()
    for relative in sorted(set(relative_paths)):
        path = safe_join(root, relative)
        if not path.is_file():
            raise FileNotFoundError(f"cannot fingerprint {relative}: no such file under {root}")
        digest.update(f"{relative}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def fingerprint_manifests(dataset_root: Path | str, stage: str, partitions: Iterable[str | None]) -> str:
    """Fingerprint of a stage's manifests for ``partitions`` (None is the unpartitioned ``all``).

    A manifest lists what the stage produced for a partition; stages whose manifests name
    items by content (image hashes) are covered by this alone. Raises FileNotFoundError
    naming a missing manifest.
    """
    digest = hashlib.sha256()
    for partition in sorted(set(partitions), key=lambda p: p or ""):
        path = manifest_path(dataset_root, stage, partition)
        if not path.is_file():
            raise FileNotFoundError(f"cannot fingerprint {stage} partition {partition or 'all'}: no manifest at {path}")
        digest.update(f"{partition or ''}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()[:FINGERPRINT_DIGITS]
