"""Gathering images: downloads from a real HTTP server on 127.0.0.1, local copies, resumption."""

from __future__ import annotations

import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.download import STATUS_COLUMNS, FetchSettings, ImageTask, fetch_images, write_status_table


def jpeg(seed: int, size=(64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


GOOD = {f"good{i}": jpeg(i) for i in range(3)}
BIG = jpeg(99, size=(400, 300))  # larger than the tests' max_bytes
TRUNCATED = jpeg(7, size=(200, 150))[:1500]
HTML = b"<!DOCTYPE html><html><head><title>Moved</title></head><body>The photo moved.</body></html>"


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 with one route per case; counts requests per path."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def send_body(self, status: int, body: bytes, content_type: str = "image/jpeg", length: bool = True):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client gave up (the timeout cases)
                    pass

            def do_GET(self):
                path = self.path.split("?")[0]
                with server.lock:
                    server.requests[path] = server.requests.get(path, 0) + 1
                    count = server.requests[path]
                name = path.strip("/").removesuffix(".jpg")
                if name in GOOD:
                    self.send_body(200, GOOD[name])
                elif name == "slow":
                    time.sleep(1.5)
                    self.send_body(200, GOOD["good0"])
                elif name == "drip":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    body = GOOD["good2"]  # within max_bytes, sent too slowly for total_timeout_s
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for start in range(0, len(body), 300):
                        try:
                            self.wfile.write(body[start : start + 300])
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.1)
                elif name == "truncated":
                    self.send_body(200, TRUNCATED)
                elif name == "page":
                    self.send_body(200, HTML, content_type="text/html; charset=utf-8")
                elif name == "huge":
                    self.send_body(200, BIG)
                elif name == "huge-unannounced":
                    self.send_body(200, BIG, length=False)
                    self.close_connection = True
                elif name == "flaky":
                    if count == 1:
                        self.send_body(503, b"busy", content_type="text/plain")
                    else:
                        self.send_body(200, GOOD["good1"])
                elif name == "moved":
                    self.send_response(302)
                    self.send_header("Location", "/good2.jpg")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_body(404, b"not found", content_type="text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}.jpg"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    image_server = ImageServer()
    yield image_server
    image_server.close()


def fast_settings(**overrides) -> FetchSettings:
    values = dict(
        max_workers=4,
        connect_timeout_s=2.0,
        read_timeout_s=0.5,
        total_timeout_s=1.0,
        retries=1,
        backoff_s=0.01,
        max_bytes=60_000,
    )
    values.update(overrides)
    return FetchSettings(**values)


def rows_by_hash(report) -> dict[str, dict]:
    return {row["image_hash"]: row for row in report.rows}


CASES = ["good0", "good1", "missing", "slow", "drip", "truncated", "page", "huge", "huge-unannounced", "flaky", "moved"]


def test_download_cases(tmp_path, server):
    tasks = [ImageTask(image_hash=name, aid=f"article-{name}", url=server.url(name)) for name in CASES]
    report = fetch_images(tasks, tmp_path / "images", fast_settings())
    rows = rows_by_hash(report)

    for name in ("good0", "good1", "flaky", "moved"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["source"] == "download"
    assert (tmp_path / "images" / "good0.jpg").read_bytes() == GOOD["good0"]
    assert (tmp_path / "images" / "moved.jpg").read_bytes() == GOOD["good2"]
    assert rows["flaky"]["attempts"] == 2
    assert rows["good0"]["attempts"] == 1
    assert rows["good0"]["bytes"] == len(GOOD["good0"])

    expected_errors = {
        "missing": "HTTP 404",
        "slow": "timed out",
        "drip": "timed out: body not complete after 1.0s",
        "truncated": "not a usable image: truncated image data",
        "page": "not a usable image: not an image: the content is an HTML page (served as text/html",
        "huge": f"body of {len(BIG)} bytes exceeds max_bytes=60000",
        "huge-unannounced": "body exceeds max_bytes=60000",
    }
    for name, message in expected_errors.items():
        assert rows[name]["status"] == "failed", rows[name]
        assert message in rows[name]["error"], (name, rows[name]["error"])
        assert not (tmp_path / "images" / f"{name}.jpg").exists()
    assert rows["missing"]["attempts"] == 1  # a 404 is not retried
    assert rows["slow"]["attempts"] == 2  # a timeout is retried once (retries=1)

    assert report.ok_hashes == sorted(["flaky", "good0", "good1", "moved"])
    failures = {failure["image_hash"]: failure for failure in report.failures}
    assert failures["page"]["aid"] == "article-page"
    assert set(failures) == set(expected_errors)
    leftovers = [p.name for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_resume_skips_finished(tmp_path, server):
    tasks = [ImageTask(image_hash=name, aid="a", url=server.url(name)) for name in ("good0", "good1", "missing")]
    fetch_images(tasks, tmp_path / "images", fast_settings())
    before = dict(server.requests)
    report = fetch_images(tasks, tmp_path / "images", fast_settings())
    rows = rows_by_hash(report)
    assert rows["good0"]["status"] == "skipped"
    assert rows["good0"]["source"] == "existing"
    assert rows["good1"]["status"] == "skipped"
    assert rows["missing"]["status"] == "failed"  # failures are tried again
    assert server.requests["/good0.jpg"] == before["/good0.jpg"]
    assert server.requests["/missing.jpg"] == before["/missing.jpg"] + 1
    assert report.ok_hashes == ["good0", "good1"]


def test_only_http_schemes(tmp_path, server):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(GOOD["good0"])
    tasks = [
        ImageTask(image_hash="file", aid="a", url=f"file://{secret}"),
        ImageTask(image_hash="ftp", aid="a", url="ftp://127.0.0.1/x.jpg"),
        ImageTask(image_hash="none", aid="a", url=None),
    ]
    report = fetch_images(tasks, tmp_path / "images", fast_settings())
    rows = rows_by_hash(report)
    assert "unsupported URL scheme 'file'" in rows["file"]["error"]
    assert "unsupported URL scheme 'ftp'" in rows["ftp"]["error"]
    assert "no image URL" in rows["none"]["error"]
    assert not (tmp_path / "images" / "file.jpg").exists()


def test_local_source_linked(tmp_path, server):
    source = tmp_path / "source"
    source.mkdir()
    (source / "h1.jpg").write_bytes(GOOD["good0"])
    (source / "custom-name.jpg").write_bytes(GOOD["good1"])
    (source / "h3.jpg").write_bytes(b"")  # unusable locally, so it is downloaded
    tasks = [
        ImageTask(image_hash="h1", aid="a", url=None),
        ImageTask(image_hash="h2", aid="b", url=None, local_name="custom-name.jpg"),
        ImageTask(image_hash="h3", aid="c", url=server.url("good2")),
        ImageTask(image_hash="h4", aid="d", url=None),
    ]
    report = fetch_images(tasks, tmp_path / "images", fast_settings(source_dir=source))
    rows = rows_by_hash(report)
    assert rows["h1"]["source"] == "local"
    assert rows["h1"]["status"] == "ok"
    assert os.path.samefile(source / "h1.jpg", tmp_path / "images" / "h1.jpg")  # hard link
    assert (tmp_path / "images" / "h2.jpg").read_bytes() == GOOD["good1"]
    assert rows["h3"]["source"] == "download"
    assert rows["h3"]["status"] == "ok"
    assert rows["h4"]["status"] == "failed"
    assert "not in source folder" in rows["h4"]["error"]
    assert "no image URL" in rows["h4"]["error"]
    assert server.requests == {"/good2.jpg": 1}


def test_local_source_copied(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "h1.jpg").write_bytes(GOOD["good0"])
    report = fetch_images([ImageTask("h1", "a", None)], tmp_path / "images", fast_settings(source_dir=source, link=False))
    assert report.rows[0]["status"] == "ok"
    assert not os.path.samefile(source / "h1.jpg", tmp_path / "images" / "h1.jpg")
    assert (tmp_path / "images" / "h1.jpg").read_bytes() == GOOD["good0"]


def test_downloads_off(tmp_path, server):
    report = fetch_images([ImageTask("h", "a", server.url("good0"))], tmp_path / "images", fast_settings(download=False))
    assert report.rows[0]["status"] == "failed"
    assert "downloads are off" in report.rows[0]["error"]
    assert server.requests == {}


def test_unsafe_hash_rejected(tmp_path):
    report = fetch_images([ImageTask("../escape", "a", None)], tmp_path / "images", fast_settings())
    assert report.rows[0]["status"] == "failed"
    assert "path separator" in report.rows[0]["error"]
    assert not (tmp_path / "escape.jpg").exists()


def test_duplicate_hashes_fetched_once(tmp_path, server):
    tasks = [ImageTask("same", "a1", server.url("good0")), ImageTask("same", "a2", server.url("good0"))]
    report = fetch_images(tasks, tmp_path / "images", fast_settings())
    assert len(report.rows) == 1
    assert report.rows[0]["aid"] == "a1"
    assert server.requests["/good0.jpg"] == 1


def test_status_table_columns(tmp_path, server):
    tasks = [ImageTask(name, "a", server.url(name)) for name in ("good0", "missing")]
    report = fetch_images(tasks, tmp_path / "images", fast_settings())
    path = write_status_table(tmp_path / "images" / "_status" / "p.parquet", report.rows)
    table = pq.read_table(path)
    assert tuple(table.column_names) == STATUS_COLUMNS
    rows = {row["image_hash"]: row for row in table.to_pylist()}
    assert rows["good0"]["status"] == "ok"
    assert rows["good0"]["bytes"] == len(GOOD["good0"])
    assert rows["missing"]["error"].startswith("download failed after 1 attempt(s): HTTP 404")
    assert rows["missing"]["seconds"] >= 0
