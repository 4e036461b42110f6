"""The original NewsLXMERT per-image region-feature JSON layout, and converters to the fast store.

One JSON object per image, arrays as base64 of their raw little-endian bytes::

    {"roi_features": "<base64 float32 [n, D]>", "boxes": "<base64 float32 [n, 4]>",
     "normalized_boxes": "<base64 float32 [n, 4]>", "obj_ids": "<base64 int64 [n]>",
     "obj_probs": "<base64 float32 [n]>", "attr_ids": "<base64 int64 [n]>",
     "attr_probs": "<base64 float32 [n]>", "n_regions": n}

The original training code reshapes every array by ``n_regions`` rows, so ``n_regions``
is the row count. Files written here always have 36 rows (padded). They add
``n_real_regions`` (the detector's real count), ``feature_dim`` (D, so that a truncated
``roi_features`` is detected), ``image_width`` and ``image_height``, keys that the
original code ignores. Files from the original scripts lack
them: their real count is taken as ``n_regions`` and the image size as -1 (unknown).

The original README names the files ``<hash>.jpg`` while its code reads ``<hash>.json``;
:func:`find_region_json` accepts both, and this module writes ``.json``.

Command line::

    python -m model.region_json to-store JSON_DIR STORE_DIR
    python -m model.region_json to-json STORE_DIR JSON_DIR
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from model.detectors.base import ARRAY_FIELDS, N_REGIONS, RegionFeatures, pad_regions
from model.storage import atomic_write_bytes, check_safe_id, safe_join

JSON_SUFFIXES = (".json", ".jpg")
ROW_WIDTH = {"roi_features": None, "boxes": 4, "normalized_boxes": 4}  # None: inferred (D)
REQUIRED_FIELDS = ("roi_features", "boxes", "normalized_boxes", "obj_ids", "obj_probs", "n_regions")
OPTIONAL_ARRAYS = ("attr_ids", "attr_probs")  # absent in files of backends without attributes


class RegionJsonError(ValueError):
    """A region-feature JSON file that cannot be read; the message names the file and field."""


def encode_array(array: np.ndarray, dtype: str) -> str:
    """Return base64 of ``array`` cast to the explicit little-endian ``dtype`` (e.g. "<f4")."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes()).decode("ascii")


def decode_array(text: Any, dtype: str, rows: int, width: int | None, name: str, field: str) -> np.ndarray:
    """Decode one base64 field into an array of ``rows`` rows (1-D when ``width`` is 0).

    ``width`` None infers the row width from the byte count. Raises RegionJsonError naming
    ``name`` (the file) and ``field`` for a non-string, invalid base64 or a byte count that
    does not fit the shape (a truncated or mis-typed field).
    """
    if not isinstance(text, str):
        raise RegionJsonError(f"{name}: field {field!r} must be a base64 string, found {type(text).__name__}")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RegionJsonError(f"{name}: field {field!r} is not valid base64 ({error}); the file is truncated or damaged") from None
    item = np.dtype(dtype).itemsize
    if width is None:
        if rows == 0 or len(raw) % (rows * item) != 0 or len(raw) == 0:
            raise RegionJsonError(
                f"{name}: field {field!r} contains {len(raw)} bytes, not a whole number of {rows} rows of {dtype} values; "
                "the file is truncated or was written with another dtype"
            )
        width = len(raw) // (rows * item)
    expected = rows * max(width, 1) * item
    if len(raw) != expected:
        shape = f"[{rows}, {width}]" if width else f"[{rows}]"
        raise RegionJsonError(
            f"{name}: field {field!r} contains {len(raw)} bytes, expected {expected} for {dtype} {shape}; "
            "the file is truncated or was written with another dtype"
        )
    array = np.frombuffer(raw, dtype=np.dtype(dtype))
    return array.reshape(rows, width) if width else array


def _read_count(value: Any, name: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip().isdigit()):
        raise RegionJsonError(f"{name}: field {field!r} must be a non-negative integer, found {value!r}")
    return int(value)


def parse_region_json(content: Any, name: str, n_regions: int = N_REGIONS, feature_dim: int | None = None) -> RegionFeatures:
    """Validate one decoded JSON object and return its regions padded to ``n_regions`` rows.

    The RoI feature width D comes from ``feature_dim``, else from the file's ``feature_dim``
    key, else from the byte count. Only the first two catch a ``roi_features`` field cut
    to a whole number of shorter rows.
    """
    if not isinstance(content, dict):
        raise RegionJsonError(f"{name}: expected a JSON object, found {type(content).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in content:
            raise RegionJsonError(f"{name}: required field {field!r} is missing")
    rows = _read_count(content["n_regions"], name, "n_regions")
    if rows == 0:
        raise RegionJsonError(f"{name}: field 'n_regions' is 0; a region file needs at least one region")
    if rows > n_regions:
        raise RegionJsonError(
            f"{name}: {rows} regions stored, more than the {n_regions} the model takes; re-extract with at most {n_regions} boxes"
        )
    real = _read_count(content.get("n_real_regions", rows), name, "n_real_regions")
    if real > rows:
        raise RegionJsonError(f"{name}: n_real_regions {real} exceeds n_regions {rows}")

    stored_dim = content.get("feature_dim")
    if stored_dim is not None:
        stored_dim = _read_count(stored_dim, name, "feature_dim")
        if feature_dim is not None and stored_dim != feature_dim:
            raise RegionJsonError(f"{name}: feature_dim is {stored_dim}, expected {feature_dim} like the other images")
    expected_dim = feature_dim if feature_dim is not None else stored_dim

    arrays: dict[str, np.ndarray] = {}
    for field, dtype in ARRAY_FIELDS.items():
        if field not in content and field in OPTIONAL_ARRAYS:
            continue
        width = expected_dim if field == "roi_features" else ROW_WIDTH.get(field, 0)
        arrays[field] = decode_array(content[field], dtype, rows, width, name, field)
        if arrays[field].dtype.kind == "f" and not np.isfinite(arrays[field]).all():
            raise RegionJsonError(f"{name}: field {field!r} contains NaN or infinite values; extract the features of this image again")

    width_px = _read_signed(content.get("image_width", -1), name, "image_width")
    height_px = _read_signed(content.get("image_height", -1), name, "image_height")
    features = pad_regions(
        roi_features=arrays["roi_features"][:real],
        boxes=arrays["boxes"][:real],
        obj_ids=arrays["obj_ids"][:real],
        obj_probs=arrays["obj_probs"][:real],
        attr_ids=arrays["attr_ids"][:real] if "attr_ids" in arrays else None,
        attr_probs=arrays["attr_probs"][:real] if "attr_probs" in arrays else None,
        width=max(width_px, 1),
        height=max(height_px, 1),
        n_regions=n_regions,
    )
    # Keep the stored normalized boxes: without the image size they cannot be recomputed.
    features.normalized_boxes[:real] = arrays["normalized_boxes"][:real]
    features.image_width, features.image_height = width_px, height_px
    return features


def _read_signed(value: Any, name: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RegionJsonError(f"{name}: field {field!r} must be an integer, found {value!r}")
    return value


def read_region_json(path: Path | str, n_regions: int = N_REGIONS, feature_dim: int | None = None) -> RegionFeatures:
    """Read and validate one region-feature file (named ``.json`` or ``.jpg``); see parse_region_json."""
    path = Path(path)
    try:
        content = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as error:
        raise RegionJsonError(f"{path}: not valid JSON ({error}); the file is truncated or not a region-feature file") from None
    return parse_region_json(content, str(path), n_regions, feature_dim)


def region_json_bytes(features: RegionFeatures) -> bytes:
    """Serialise ``features`` in the original layout (36 rows) with the extra keys described above."""
    content: dict[str, Any] = {field: encode_array(getattr(features, field), dtype) for field, dtype in ARRAY_FIELDS.items()}
    content["n_regions"] = int(features.roi_features.shape[0])
    content["feature_dim"] = int(features.feature_dim)
    content["n_real_regions"] = int(features.n_regions)
    content["image_width"] = int(features.image_width)
    content["image_height"] = int(features.image_height)
    return (json.dumps(content, sort_keys=True) + "\n").encode("ascii")


def write_region_json(folder: Path | str, image_hash: str, features: RegionFeatures) -> Path:
    """Write ``<folder>/<image_hash>.json`` atomically and return its path."""
    check_safe_id(image_hash)
    path = safe_join(folder, f"{image_hash}.json")
    atomic_write_bytes(path, region_json_bytes(features))
    return path


def find_region_json(folder: Path | str, image_hash: str) -> Path | None:
    """Return ``<folder>/<hash>.json`` or ``<folder>/<hash>.jpg`` (in that order), or None."""
    check_safe_id(image_hash)
    for suffix in JSON_SUFFIXES:
        path = Path(folder) / f"{image_hash}{suffix}"
        if path.is_file():
            return path
    return None


def list_region_json(folder: Path | str) -> dict[str, Path]:
    """Return image hash -> file for every region-feature file in ``folder`` (.json wins over .jpg)."""
    found: dict[str, Path] = {}
    folder = Path(folder)
    if not folder.exists():
        return found
    for suffix in reversed(JSON_SUFFIXES):
        for path in sorted(folder.glob(f"*{suffix}")):
            if not path.name.startswith("."):
                found[path.stem] = path
    return found


def json_folder_to_store(json_dir: Path | str, store, keys: Iterable[str] | None = None, chunk: int = 512) -> dict[str, Any]:
    """Copy region-feature files into a FeatureStore; return counts and failures by hash.

    Unreadable files are reported, not raised, so one damaged file does not stop the copy.
    """
    files = list_region_json(json_dir)
    wanted = sorted(files) if keys is None else sorted(keys)
    copied, failures, buffer = 0, {}, []
    schema = store.schema
    feature_dim = int(schema["roi_features"].shape[1]) if "roi_features" in schema else None
    for image_hash in wanted:
        path = files.get(image_hash)
        if path is None:
            failures[image_hash] = f"no {image_hash}.json or {image_hash}.jpg in {json_dir}"
            continue
        try:
            features = read_region_json(path, feature_dim=feature_dim)
        except RegionJsonError as error:
            failures[image_hash] = str(error)
            continue
        feature_dim = features.feature_dim
        buffer.append(features.to_record(image_hash))
        if len(buffer) >= chunk:
            store.write(buffer)
            copied += len(buffer)
            buffer = []
    if buffer:
        store.write(buffer)
        copied += len(buffer)
    return {"copied": copied, "failed": failures}


def store_to_json_folder(store, json_dir: Path | str, keys: Iterable[str] | None = None) -> int:
    """Write every (or each of ``keys``) store item as ``<json_dir>/<hash>.json``; return the count."""
    written = 0
    for image_hash in sorted(keys) if keys is not None else store.keys():
        write_region_json(json_dir, image_hash, RegionFeatures.from_mapping(store.get(image_hash)))
        written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    from model.feature_store import FeatureStore

    parser = argparse.ArgumentParser(description="Convert region features between the JSON layout and the fast store.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_store = sub.add_parser("to-store", help="read <hash>.json/.jpg files into a feature store")
    to_store.add_argument("json_dir", type=Path)
    to_store.add_argument("store_dir", type=Path)
    to_json = sub.add_parser("to-json", help="write every store item as <hash>.json")
    to_json.add_argument("store_dir", type=Path)
    to_json.add_argument("json_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "to-store":
        report = json_folder_to_store(args.json_dir, FeatureStore(args.store_dir))
        print(f"copied {report['copied']} files into {args.store_dir}; {len(report['failed'])} failed")
        for image_hash, reason in sorted(report["failed"].items())[:20]:
            print(f"  {image_hash}: {reason}")
    else:
        count = store_to_json_folder(FeatureStore(args.store_dir), args.json_dir)
        print(f"wrote {count} files to {args.json_dir}")


if __name__ == "__main__":
    main()
