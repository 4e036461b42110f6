"""Gathering article images into ``<dataset_root>/images/<hash>.jpg``: local copies or downloads.

For each image, in this order:

1. ``images/<hash>.jpg`` already exists: skipped. Only verified files are ever written there
   (atomically), so an existing file is a finished item.
2. A local source folder is configured and contains the file (the document's ``image_file``
   name, else ``<hash>.jpg``): it is decoded to check it, then hard-linked (or copied when
   linking is off or not possible) into place.
3. Else the URL is downloaded, if downloads are on: http and https only, a bounded number
   of concurrent requests, connect/read timeouts plus a total deadline per attempt, retries
   with exponential backoff on timeouts, connection errors, HTTP 429 and 5xx, a maximum body
   size, and a check that the body decodes as an image.

The bytes are stored as they came, so a PNG served for a ``.jpg`` name stays a PNG under a
``.jpg`` name; ``model.image_io`` reads the format from the content. Every item gets a
status row (see ``STATUS_COLUMNS``); failures carry the reason and the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import requests

from model.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image_bytes, load_image
from model.storage import UnsafePathError, atomic_write_bytes, check_safe_id, remove_stale_temporaries, safe_join

logger = logging.getLogger(__name__)

STATUS_COLUMNS = ("image_hash", "aid", "url", "source", "status", "error", "bytes", "seconds", "attempts")
ALLOWED_SCHEMES = ("http", "https")
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """One image to gather, named by its hash."""

    image_hash: str
    aid: str  # first article that shows it, for failure reports
    url: str | None
    local_name: str | None = None  # file name in the source folder when it is not <hash>.jpg


@dataclasses.dataclass
class FetchSettings:
    source_dir: Path | None = None  # local folder with the image files
    download: bool = True
    max_workers: int = 8  # concurrent downloads
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # maximum wait for the next bytes
    total_timeout_s: float = 120.0  # deadline for one attempt, headers to last byte
    retries: int = 3  # extra attempts after the first, for transient errors only
    backoff_s: float = 1.0  # wait before retry k is backoff_s * 2**k
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    link: bool = True  # hard-link local files instead of copying them
    user_agent: str = "newslxmert-image-fetch/0.1"


@dataclasses.dataclass
class FetchReport:
    rows: list[dict]  # one per distinct image, columns STATUS_COLUMNS
    seconds: float

    def by_status(self, status: str) -> list[dict]:
        return [row for row in self.rows if row["status"] == status]

    @property
    def ok_hashes(self) -> list[str]:
        """Return every hash whose file is in place (fetched now or earlier), sorted."""
        return sorted(row["image_hash"] for row in self.rows if row["status"] in ("ok", "skipped"))

    @property
    def failures(self) -> list[dict]:
        return [
            {"image_hash": row["image_hash"], "aid": row["aid"], "reason": row["error"]}
            for row in sorted(self.rows, key=lambda r: r["image_hash"])
            if row["status"] == "failed"
        ]

    def summary(self) -> dict:
        downloaded = [row for row in self.rows if row["status"] == "ok" and row["source"] == "download"]
        total_bytes = sum(row["bytes"] for row in downloaded)
        return {
            "images": len(self.rows),
            "ok": len(self.by_status("ok")),
            "skipped": len(self.by_status("skipped")),
            "failed": len(self.by_status("failed")),
            "copied_local": sum(1 for row in self.rows if row["status"] == "ok" and row["source"] == "local"),
            "downloaded": len(downloaded),
            "downloaded_bytes": total_bytes,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(len(self.by_status("ok")) / self.seconds, 3) if self.seconds > 0 else 0.0,
        }


class DownloadError(Exception):
    """A failed download attempt; ``retryable`` marks errors that may pass on another try."""

    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


_thread_state = threading.local()


def _session(settings: FetchSettings) -> requests.Session:
    session = getattr(_thread_state, "session", None)
    if session is None:
        session = requests.Session()
        session.headers["User-Agent"] = settings.user_agent
        _thread_state.session = session
    return session


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value and value.strip().isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    return None


def download_once(url: str, settings: FetchSettings) -> bytes:
    """Fetch ``url`` once and return the body, or raise DownloadError with the reason."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise DownloadError(f"unsupported URL scheme {scheme!r}; only http and https URLs are fetched", retryable=False)
    started = time.monotonic()
    try:
        response = _session(settings).get(
            url, stream=True, timeout=(settings.connect_timeout_s, settings.read_timeout_s), allow_redirects=True
        )
    except requests.Timeout:
        raise DownloadError(f"timed out (connect {settings.connect_timeout_s}s, read {settings.read_timeout_s}s)", retryable=True) from None
    except requests.ConnectionError as error:
        raise DownloadError(f"connection failed: {type(error).__name__}", retryable=True) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as error:
        raise DownloadError(f"invalid URL: {error}", retryable=False) from None
    except requests.RequestException as error:
        raise DownloadError(f"request failed: {type(error).__name__}: {error}", retryable=True) from None

    with response:
        if response.status_code >= 400:
            reason = f"HTTP {response.status_code} {response.reason or ''}".strip()
            raise DownloadError(reason, retryable=response.status_code in RETRY_STATUS, retry_after=_retry_after(response))
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > settings.max_bytes:
            raise DownloadError(f"body of {declared} bytes exceeds max_bytes={settings.max_bytes}", retryable=False)
        body = io.BytesIO()
        try:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                body.write(chunk)
                if body.tell() > settings.max_bytes:
                    raise DownloadError(f"body exceeds max_bytes={settings.max_bytes}", retryable=False)
                if time.monotonic() - started > settings.total_timeout_s:
                    raise DownloadError(f"timed out: body not complete after {settings.total_timeout_s}s", retryable=True)
        except requests.Timeout:
            raise DownloadError(f"timed out reading the body (read {settings.read_timeout_s}s)", retryable=True) from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
            raise DownloadError(f"connection broke while reading the body: {type(error).__name__}", retryable=True) from None
        content_type = response.headers.get("Content-Type", "")
    data = body.getvalue()
    try:
        decode_image_bytes(data, name=url, max_pixels=settings.max_pixels)
    except ImageDecodeError as error:
        served = f" (served as {content_type})" if content_type else ""
        raise DownloadError(f"downloaded body is not a usable image: {error.reason}{served}", retryable=False) from None
    return data


def download_with_retries(url: str, settings: FetchSettings) -> tuple[bytes, int]:
    """Return (body, attempts); raise the last DownloadError when every attempt failed."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return download_once(url, settings), attempt
        except DownloadError as error:
            if not error.retryable or attempt > settings.retries:
                error.attempts = attempt  # type: ignore[attr-defined]
                raise
            wait = settings.backoff_s * 2 ** (attempt - 1)
            if error.retry_after is not None:
                wait = max(wait, error.retry_after)
            logger.info("retrying %s in %.2fs after attempt %d: %s", url, wait, attempt, error.reason)
            time.sleep(wait)


def _place_local(source: Path, target: Path, link: bool) -> None:
    """Put ``source`` at ``target`` atomically, by hard link when allowed and possible.

    The temporary file is locked until renamed, so that ``remove_stale_temporaries`` in a
    concurrent run skips it. A hard link cannot be locked before it exists: when a cleaner
    removes it in that instant, the file is copied instead.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        link_name = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.link(source, link_name)
        except OSError:  # another file system, links not permitted or a name clash: copy instead
            pass
        else:
            try:
                with open(link_name, "rb") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                    os.replace(link_name, target)
                    # When target already was a link to source (a concurrent run placed the
                    # same image), rename(2) does nothing and leaves link_name behind.
                    link_name.unlink(missing_ok=True)
                return
            except FileNotFoundError:
                pass  # removed by a cleaner before the lock: copy instead
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link_name)
                raise
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        shutil.copyfile(source, tmp_name)
        os.fsync(fd)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    finally:
        os.close(fd)


def _local_source(task: ImageTask, source_dir: Path) -> Path | None:
    names = [task.local_name] if task.local_name else []
    names.append(f"{task.image_hash}.jpg")
    for name in names:
        try:
            check_safe_id(name)  # a plain file name, so the path stays in source_dir
        except UnsafePathError:
            continue
        # Not resolved: a source folder of symbolic links to the real files is fine.
        path = source_dir / name
        if path.is_file():
            return path
    return None


def fetch_one(task: ImageTask, images_dir: Path, settings: FetchSettings) -> dict:
    """Gather one image and return its status row.

    A missing or unusable local file, an unsafe hash and a failed download become a failed
    row; only errors of the output folder itself (such as a full disk) raise.
    """
    row = {
        "image_hash": task.image_hash,
        "aid": task.aid,
        "url": task.url or "",
        "source": "",
        "status": "failed",
        "error": "",
        "bytes": 0,
        "seconds": 0.0,
        "attempts": 0,
    }
    started = time.perf_counter()
    try:
        check_safe_id(task.image_hash)
        target = safe_join(images_dir, f"{task.image_hash}.jpg")
    except UnsafePathError as error:
        row["error"] = str(error)
        return row
    if target.is_file() and target.stat().st_size > 0:
        row.update(source="existing", status="skipped", bytes=target.stat().st_size)
        return row

    errors = []
    if settings.source_dir is not None:
        source = _local_source(task, settings.source_dir)
        if source is None:
            errors.append(f"not in source folder {settings.source_dir}")
        else:
            try:
                load_image(source, max_pixels=settings.max_pixels)
            except ImageDecodeError as error:
                errors.append(f"local file unusable: {error}")
            else:
                _place_local(source, target, settings.link)
                row.update(source="local", status="ok", bytes=target.stat().st_size)
                row["seconds"] = round(time.perf_counter() - started, 4)
                return row

    if not settings.download:
        errors.append("downloads are off")
    elif not task.url:
        errors.append("the document has no image URL")
    else:
        row["source"] = "download"
        try:
            data, attempts = download_with_retries(task.url, settings)
        except DownloadError as error:
            row["attempts"] = getattr(error, "attempts", 1)
            errors.append(f"download failed after {row['attempts']} attempt(s): {error.reason}")
        else:
            atomic_write_bytes(target, data)
            row.update(status="ok", bytes=len(data), attempts=attempts)
    if row["status"] != "ok":
        row["error"] = "; ".join(errors)
    row["seconds"] = round(time.perf_counter() - started, 4)
    return row


def fetch_images(tasks: Iterable[ImageTask], images_dir: Path | str, settings: FetchSettings) -> FetchReport:
    """Gather every distinct image of ``tasks`` into ``images_dir`` concurrently; see the module docstring."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(images_dir)
    if removed:
        logger.info("removed %d temporary files that interrupted runs left in %s", removed, images_dir)
    unique: dict[str, ImageTask] = {}
    for task in tasks:
        unique.setdefault(task.image_hash, task)
    started = time.perf_counter()
    ordered = [unique[key] for key in sorted(unique)]
    with ThreadPoolExecutor(max_workers=max(1, settings.max_workers), thread_name_prefix="image-fetch") as pool:
        rows = list(pool.map(lambda task: fetch_one(task, images_dir, settings), ordered))
    for row in rows:
        if row["status"] == "failed":
            logger.warning("image %s of article %s failed: %s", row["image_hash"], row["aid"], row["error"])
    return FetchReport(rows=rows, seconds=time.perf_counter() - started)


def status_table_bytes(rows: list[dict]) -> bytes:
    """Serialise status rows as a Parquet file with fixed column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("image_hash", pa.string()),
            ("aid", pa.string()),
            ("url", pa.string()),
            ("source", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("bytes", pa.int64()),
            ("seconds", pa.float64()),
            ("attempts", pa.int32()),
        ]
    )
    table = pa.Table.from_pylist([{name: row[name] for name in STATUS_COLUMNS} for row in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_status_table(path: Path | str, rows: list[dict]) -> Path:
    """Write the status rows to ``path`` atomically and return it."""
    path = Path(path)
    atomic_write_bytes(path, status_table_bytes(rows))
    return path
