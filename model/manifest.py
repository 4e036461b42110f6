"""Partition manifests: which items a stage handled for one partition.

A partitioned stage writes ``<dataset_root>/<stage>/_manifests/<partition>.json`` listing
the items it produced for that partition, so that the next stage processes exactly those
items and a split-level stage can gather every partition. Unpartitioned runs use the
partition name ``all``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.storage import check_safe_id, remove_stale_temporaries, safe_join, write_json_if_changed

UNPARTITIONED = "all"


def manifest_path(dataset_root: Path | str, stage: str, partition: str | None) -> Path:
    partition = partition or UNPARTITIONED
    check_safe_id(partition)
    return safe_join(dataset_root, stage, "_manifests", f"{partition}.json")


def write_manifest(dataset_root: Path | str, stage: str, partition: str | None, content: dict[str, Any]) -> Path:
    """Write the manifest atomically (unchanged content is not rewritten) and return its path."""
    path = manifest_path(dataset_root, stage, partition)
    remove_stale_temporaries(path.parent)
    write_json_if_changed(path, content)
    return path


def read_manifest(dataset_root: Path | str, stage: str, partition: str | None) -> dict[str, Any]:
    """Read a manifest, or raise FileNotFoundError that names the stage to materialize first."""
    path = manifest_path(dataset_root, stage, partition)
    if not path.exists():
        raise FileNotFoundError(
            f"no {stage} manifest for partition {partition or UNPARTITIONED!r} at {path}; "
            f"materialize the {stage} asset for that partition first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def list_manifests(dataset_root: Path | str, stage: str) -> dict[str, dict[str, Any]]:
    """All manifests of ``stage`` by partition name, sorted by name."""
    folder = Path(dataset_root) / stage / "_manifests"
    if not folder.exists():
        return {}
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))}
