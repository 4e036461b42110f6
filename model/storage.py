"""File-system helpers shared by every stage: safe paths, atomic writes, canonical JSON."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_UNSAFE_ID_PARTS = ("/", "\\", "\x00")


class UnsafePathError(ValueError):
    """An id or relative path would place a file outside its data root."""


def check_safe_id(item_id: str) -> str:
    """Return ``item_id`` if it can be used as a file name, else raise UnsafePathError.

    Rejected: empty ids, ``.`` and ``..``, ids containing ``/``, ``\\``, ``..`` or NUL.
    """
    if not isinstance(item_id, str):
        raise UnsafePathError(f"id {item_id!r} is not a string")
    if item_id.strip() == "" or item_id in (".", ".."):
        raise UnsafePathError(f"id {item_id!r} is empty or a directory name; give each document a non-empty id")
    if ".." in item_id or any(part in item_id for part in _UNSAFE_ID_PARTS):
        raise UnsafePathError(
            f"id {item_id!r} contains a path separator, '..' or NUL; such ids could write outside the data root"
        )
    return item_id


def safe_join(root: Path | str, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and raise UnsafePathError if the result leaves ``root``."""
    root_path = Path(root).resolve()
    candidate = root_path.joinpath(*parts).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise UnsafePathError(f"path {'/'.join(parts)!r} resolves outside the data root {root_path}")
    return candidate


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader sees either the old file or the complete new one, never a partial write,
    even when the process is killed halfway. The temporary file is locked (``flock``)
    until it is renamed, so :func:`remove_stale_temporaries` in another process skips it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                os.replace(tmp_name, path)
            return
        except FileNotFoundError:
            # A cleaner removed the temporary file in the instant between its creation and
            # the lock; write it once more.
            if attempt == 1:
                raise
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete temporary files left by writes that were killed; return how many were removed.

    A temporary file that another process is still writing holds a lock (see
    :func:`atomic_write_bytes`) and is left alone, so stages that share a folder can clean
    it while another partition's run writes there.
    """
    folder = Path(folder)
    if not folder.exists():
        return 0
    removed = 0
    for tmp in folder.rglob(".*.tmp"):
        try:
            handle = open(tmp, "rb")
        except (FileNotFoundError, IsADirectoryError):
            continue  # renamed into place or removed since the listing
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: a live writer holds it; others: locks unsupported here
                continue
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
        removed += 1
    return removed


def to_json_compatible(value: Any) -> Any:
    """Convert BSON and Python values to plain JSON values, deterministically.

    ObjectId becomes its hex string, datetimes ISO-8601 in UTC (naive ones are taken as UTC,
    which is how pymongo returns them), Decimal128 its string, binary data base64.
    """
    import base64

    from bson import Binary, Decimal128, ObjectId

    if isinstance(value, dict):
        return {str(key): to_json_compatible(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_compatible(item) for item in value]
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal128):
        return str(value.to_decimal())
    if isinstance(value, (bytes, Binary)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


def canonical_json(value: Any) -> str:
    """Serialise ``value`` with sorted keys and fixed separators, so equal data gives equal bytes."""
    return json.dumps(to_json_compatible(value), sort_keys=True, ensure_ascii=False, indent=1) + "\n"


def write_json_if_changed(path: Path, value: Any) -> bool:
    """Write canonical JSON atomically unless the file already holds exactly those bytes.

    Returns True when the file was written.
    """
    text = canonical_json(value)
    data = text.encode("utf-8")
    if path.exists():
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass
    atomic_write_bytes(path, data)
    return True
