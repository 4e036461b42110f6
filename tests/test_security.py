"""Credentials, deserialization and downloads: what an operator must be able to rely on.

- A MongoDB password in ``NEWSLXMERT_MONGO_URI`` appears nowhere: not in asset metadata,
  the run's event log, the instance's files, Python logs, sensor results or errors.
- Every ``torch.load`` in the repository passes ``weights_only=True``, and nothing is
  unpickled with a general unpickler (checked on the source with ``ast``).
- Image downloads accept only http and https, also after redirects, and stop at
  ``max_bytes`` whatever the server declares.
"""

from __future__ import annotations

import ast
import gzip
import itertools
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote_plus

import pytest
import torch
from bad_inputs import (
    MARKER_NAME,
    WritesMarker,
    encode_image,
    gradient_photo,
    png_header_only,
)

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("model", "assets", "pipelines", "tests", "bench")

PASSWORD = "Zq7-s3cretPass"
ESCAPED_PASSWORD = "p@ss/w:rd Zq9"  # needs percent-escaping in a URI


# --------------------------------------------------------------------------- MongoDB credentials


@pytest.fixture
def secured_mongo(tmp_path):
    """A SecantusDB server that needs no login but has users alice and bob, with one day of demo articles."""
    from pymongo import MongoClient

    from model.demo_corpus import generate_demo_corpus, insert_demo_documents
    from model.mongo import EmbeddedMongo

    with EmbeddedMongo(tmp_path / "mongo") as server:
        client = MongoClient(server.uri)
        client.admin.command("createUser", "alice", pwd=PASSWORD, roles=["root"])
        client.admin.command("createUser", "bob", pwd=ESCAPED_PASSWORD, roles=["root"])
        corpus = generate_demo_corpus(n_articles=6, seed=21, n_days=1)
        insert_demo_documents(client.nytimes.articles, corpus.documents)
        host = server.uri.split("://", 1)[1].split("/", 1)[0]
        yield host
        client.close()


def _files_containing(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(secret.encode() in data for secret in secrets):
                found.append(str(path))
    return found


def _secret_forms(password: str) -> list[str]:
    return sorted({password, quote_plus(password), quote_plus(password).replace("+", "%20")})


def _event_texts(instance, run_id: str) -> list[str]:
    texts = []
    for record in instance.all_logs(run_id):
        texts.append(record.user_message or "")
        texts.append(repr(record.dagster_event))
        texts.append(repr(record.error_info))
    return texts


def _materialize_articles(data_root: Path, instance):
    from dagster import materialize

    from assets.nytimes_articles import nytimes800k_articles
    from pipelines.resources import MongoResource, PipelineSettings

    return materialize(
        [nytimes800k_articles],
        partition_key="2024-01-01",
        resources={"settings": PipelineSettings(data_root=str(data_root)), "nytimes_mongo": MongoResource(data_root=str(data_root))},
        instance=instance,
        raise_on_error=False,
    )


@pytest.mark.parametrize(
    "user, password, succeeds",
    [("alice", PASSWORD, True), ("bob", ESCAPED_PASSWORD, True), ("alice", "Wr0ng-" + PASSWORD, False)],
    ids=["right_password", "escaped_password", "wrong_password"],
)
def test_password_never_recorded(secured_mongo, tmp_path, monkeypatch, caplog, isolated_dagster_home, user, password, succeeds):
    from dagster import DagsterInstance, build_sensor_context

    from pipelines.resources import MongoResource
    from pipelines.sensors import nytimes_new_article_requests

    monkeypatch.setenv("NEWSLXMERT_MONGO_URI", f"mongodb://{user}:{quote_plus(password)}@{secured_mongo}/?authSource=admin")
    caplog.set_level(logging.DEBUG)
    secrets = _secret_forms(password)
    data_root = tmp_path / "data"

    with DagsterInstance.get() as instance:
        result = _materialize_articles(data_root, instance)
        texts = _event_texts(instance, result.run_id)
        materializations = result.asset_materializations_for_node("nytimes800k__articles")
        metadata = {key: value.value for event in materializations for key, value in event.metadata.items()}
        try:
            sensor_result = nytimes_new_article_requests(build_sensor_context(instance=instance), MongoResource(data_root=str(data_root)))
            sensor_text = repr(sensor_result)
        except RuntimeError as error:
            sensor_text = str(error)
    resource = MongoResource(data_root=str(data_root))

    assert result.success is succeeds
    if succeeds:
        assert metadata["exported"] == 6
        assert metadata["source"].startswith(f"mongodb://{user}:***@")
    else:
        failure = "\n".join(texts)
        assert "authentication failed" in failure.lower()
        assert f"mongodb://{user}:***@" in failure
    for secret in secrets:
        assert secret not in repr(metadata)
        assert all(secret not in text for text in texts), f"the event log contains the password ({secret!r})"
        assert secret not in sensor_text
        assert secret not in caplog.text
        assert secret not in resource.describe()
    assert _files_containing(isolated_dagster_home, secrets) == []
    assert _files_containing(data_root, secrets) == []


@pytest.mark.parametrize(
    "uri",
    [
        f"mongodb://alice:{PASSWORD}@127.0.0.1:abc/",  # port not a number
        f"mongodb://alice:{PASSWORD}@[::1/",  # unclosed IPv6 literal
        f"mongodb://alice:pa/ss{PASSWORD}@127.0.0.1:1/",  # unescaped "/" in the password
        f"mongodb://alice:pa@ss{PASSWORD}@127.0.0.1:1/",  # unescaped "@" in the password
    ],
    ids=["bad_port", "bad_ipv6", "unescaped_slash", "unescaped_at"],
)
def test_malformed_uri_errors_hide_password(tmp_path, monkeypatch, uri):
    from pipelines.resources import MongoResource

    monkeypatch.setenv("NEWSLXMERT_MONGO_URI", uri)
    resource = MongoResource(data_root=str(tmp_path))

    with pytest.raises((ValueError, RuntimeError)) as raised:
        with resource.open_collection() as collection:
            collection.find_one({})

    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in resource.describe()
    assert "mongodb://alice:***@" in resource.describe()


# --------------------------------------------------------------------------- deserialization


def _python_files() -> list[Path]:
    files = []
    for folder in SOURCE_FOLDERS:
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def _call_name(node: ast.Call, aliases: dict[str, str]) -> str:
    """The dotted name a call refers to, with import aliases resolved (``t.load`` -> ``torch.load``)."""
    parts = []
    target = node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if not isinstance(target, ast.Name):
        return ""
    parts.append(aliases.get(target.id, target.id))
    return ".".join(reversed(parts))


def _import_aliases(tree: ast.Module) -> dict[str, str]:
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _calls(name_filter) -> list[tuple[Path, ast.Call, str]]:
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases = _import_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _call_name(node, aliases)
                if name_filter(name):
                    found.append((path, node, name))
    return found


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_every_torch_load_is_weights_only():
    calls = _calls(lambda name: name == "torch.load")
    unsafe = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path, node, _ in calls
        if not (isinstance(_keyword(node, "weights_only"), ast.Constant) and _keyword(node, "weights_only").value is True)
    ]

    files = {str(path.relative_to(REPO)) for path, _, _ in calls}
    assert "model/checkpoints.py" in files  # the original NewsLXMERT .pth loader
    assert len(calls) >= 4
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


UNPICKLING_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load", "cPickle.loads",
    "pandas.read_pickle", "pd.read_pickle", "joblib.load", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "shelve.open", "torch.jit.load", "numpy.load", "np.load",
}


# Calls by which a test writes the pickle it then reads back: the pipeline's index writer or
# its own pickle.dumps.
PICKLE_WRITERS = {"build_index", "write_split_index", "pickle.dumps"}


def _unpickling_calls(tree: ast.AST, aliases: dict[str, str]) -> list[tuple[ast.Call, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node, aliases)
            if name in UNPICKLING_CALLS or name.endswith(".read_pickle"):
                found.append((node, name))
    return found


def test_no_general_unpickling():
    """Nothing unpickles with globals, except tests reading back a pickle they wrote themselves."""
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases = _import_aliases(tree)
        in_tests = path.parent.name == "tests"
        writers_by_function = {}
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef):
                called = {_call_name(node, aliases).split(".")[-1] for node in ast.walk(function) if isinstance(node, ast.Call)}
                called |= {_call_name(node, aliases) for node in ast.walk(function) if isinstance(node, ast.Call)}
                for node, _ in _unpickling_calls(function, aliases):
                    writers_by_function[id(node)] = bool(called & PICKLE_WRITERS)
        for node, name in _unpickling_calls(tree, aliases):
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            if name in ("numpy.load", "np.load"):
                allow = _keyword(node, "allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    offenders.append(where + " without allow_pickle=False")
                continue
            if not (in_tests and writers_by_function.get(id(node), False)):
                offenders.append(where)

    assert offenders == [], f"general unpickling found: {offenders}"


def test_custom_unpicklers_resolve_no_globals():
    """Every pickle.Unpickler subclass raises in find_class, so a pickle cannot name a callable."""
    subclasses = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(base) in ("pickle.Unpickler", "Unpickler") for base in node.bases):
                methods = {item.name: item for item in node.body if isinstance(item, ast.FunctionDef)}
                find_class = methods.get("find_class")
                body = [statement for statement in (find_class.body if find_class else []) if not isinstance(statement, ast.Expr)]
                subclasses.append((f"{path.relative_to(REPO)}:{node.name}", bool(body) and all(isinstance(s, ast.Raise) for s in body)))

    assert subclasses, "expected the index's restricted unpickler"
    assert [name for name, raises in subclasses if not raises] == []


def test_original_checkpoint_with_code_is_rejected(tmp_path):
    """An original-style .pth whose pickle runs code is refused by torch.load(weights_only=True)."""
    from model.checkpoints import load_original_checkpoint, read_original_state_dict

    marker = tmp_path / MARKER_NAME
    path = tmp_path / "newslxmert.pth"
    torch.save({"lxrt_encoder.model.bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "payload": WritesMarker(marker)}, path)

    with pytest.raises(ValueError, match="cannot read .*newslxmert.pth as a PyTorch state dict"):
        read_original_state_dict(path)
    with pytest.raises(ValueError):
        load_original_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- downloads

MAX_BYTES = 200_000
STREAM_BLOCK = b"\xff" * 65536


class HostileServer:
    """HTTP on 127.0.0.1 whose routes lie about their size or redirect to other schemes."""

    def __init__(self, secret_file: Path):
        self.secret_file = secret_file
        self.sent: dict[str, int] = {}
        gzip_bomb = gzip.compress(b"\x00" * (20 * MAX_BYTES), compresslevel=9)
        bomb_png = png_header_only(30_000, 30_000)
        small_jpeg = encode_image(gradient_photo(), "JPEG")
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _count(self, size: int) -> None:
                server.sent[self.path] = server.sent.get(self.path, 0) + size

            def _write(self, data: bytes) -> bool:
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:  # the client stopped reading
                    return False
                self._count(len(data))
                return True

            def _headers(self, status: int = 200, **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg")
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()

            def do_GET(self):
                route = self.path.strip("/")
                if route == "ok.jpg":
                    self._headers(Content_Length=str(len(small_jpeg)))
                    self._write(small_jpeg)
                elif route == "endless-chunked.jpg":
                    self._headers(Transfer_Encoding="chunked")
                    for _ in itertools.count():
                        if not self._write(b"%x\r\n%s\r\n" % (len(STREAM_BLOCK), STREAM_BLOCK)):
                            return
                elif route == "endless-unannounced.jpg":
                    self.close_connection = True
                    self._headers(Connection="close")
                    while self._write(STREAM_BLOCK):
                        pass
                elif route == "short-length-endless.jpg":
                    # Claims 1,000 bytes, then keeps sending.
                    self.close_connection = True
                    self._headers(Content_Length="1000")
                    while self._write(STREAM_BLOCK):
                        pass
                elif route == "long-length-short-body.jpg":
                    # Claims a size within the limit and sends less, then closes.
                    self.close_connection = True
                    self._headers(Content_Length=str(MAX_BYTES - 1))
                    self._write(small_jpeg)
                elif route == "huge-declared.jpg":
                    self.close_connection = True
                    self._headers(Content_Length=str(10 * MAX_BYTES))
                    while self._write(STREAM_BLOCK):
                        pass
                elif route == "gzip-bomb.jpg":
                    self._headers(Content_Length=str(len(gzip_bomb)), Content_Encoding="gzip")
                    self._write(gzip_bomb)
                elif route == "pixel-bomb.jpg":
                    self._headers(Content_Length=str(len(bomb_png)))
                    self._write(bomb_png)
                elif route.startswith("redirect-"):
                    targets = {"redirect-file": f"file://{server.secret_file}", "redirect-ftp": "ftp://127.0.0.1/x.jpg",
                               "redirect-data": "data:image/jpeg;base64,/9j/4AAQ", "redirect-gopher": "gopher://127.0.0.1/x"}
                    self._headers(302, Location=targets[route.removesuffix(".jpg")], Content_Length="0")
                else:
                    self._headers(404, Content_Length="0")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{route}.jpg"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile_server(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(encode_image(gradient_photo(), "JPEG"))
    server = HostileServer(secret)
    yield server
    server.close()


def _settings(**overrides):
    from model.download import FetchSettings

    values = dict(max_workers=4, connect_timeout_s=2.0, read_timeout_s=2.0, total_timeout_s=10.0, retries=0, backoff_s=0.0, max_bytes=MAX_BYTES)
    return FetchSettings(**{**values, **overrides})


@pytest.mark.parametrize(
    "url, scheme",
    [
        ("file:///etc/hostname", "file"),
        ("ftp://127.0.0.1/x.jpg", "ftp"),
        ("data:image/jpeg;base64,/9j/4AAQSkZJRg==", "data"),
        ("gopher://127.0.0.1:70/1", "gopher"),
        ("FILE:///etc/hostname", "file"),
        ("//127.0.0.1/x.jpg", ""),
    ],
    ids=["file", "ftp", "data", "gopher", "upper_case_file", "no_scheme"],
)
def test_only_http_and_https_fetched(tmp_path, url, scheme):
    from model.download import DownloadError, ImageTask, download_once, fetch_images

    with pytest.raises(DownloadError) as raised:
        download_once(url, _settings())
    report = fetch_images([ImageTask(image_hash="h", aid="a", url=url)], tmp_path / "images", _settings())

    assert f"unsupported URL scheme {scheme!r}" in raised.value.reason
    assert not raised.value.retryable
    assert report.rows[0]["status"] == "failed"
    assert "only http and https" in report.rows[0]["error"]
    assert list((tmp_path / "images").iterdir()) == []


@pytest.mark.parametrize("route", ["redirect-file", "redirect-ftp", "redirect-data", "redirect-gopher"])
def test_redirect_to_other_scheme_rejected(hostile_server, tmp_path, route):
    from model.download import ImageTask, fetch_images

    report = fetch_images([ImageTask(image_hash="h", aid="a", url=hostile_server.url(route))], tmp_path / "images", _settings())

    assert report.rows[0]["status"] == "failed"
    assert "invalid URL" in report.rows[0]["error"] or "unsupported URL scheme" in report.rows[0]["error"]
    assert not (tmp_path / "images" / "h.jpg").exists()


@pytest.mark.parametrize(
    "route, message",
    [
        ("endless-chunked", f"body exceeds max_bytes={MAX_BYTES}"),
        ("endless-unannounced", f"body exceeds max_bytes={MAX_BYTES}"),
        ("gzip-bomb", f"body exceeds max_bytes={MAX_BYTES}"),
        ("huge-declared", f"body of {10 * MAX_BYTES} bytes exceeds max_bytes={MAX_BYTES}"),
        ("short-length-endless", "not a usable image"),
        ("long-length-short-body", "connection broke while reading the body"),
        ("pixel-bomb", "decompression bomb"),
    ],
)
def test_download_size_limit_holds(hostile_server, tmp_path, route, message):
    """Whatever the server declares, no more than max_bytes (plus one network read) is taken in."""
    from model.download import ImageTask, fetch_images

    started = time.monotonic()
    report = fetch_images([ImageTask(image_hash="h", aid="a", url=hostile_server.url(route))], tmp_path / "images", _settings())
    seconds = time.monotonic() - started

    row = report.rows[0]
    assert row["status"] == "failed"
    assert message in row["error"]
    assert row["bytes"] == 0
    assert seconds < 10, "the download did not stop at the size limit"
    assert not (tmp_path / "images" / "h.jpg").exists()
    assert [path.name for path in (tmp_path / "images").iterdir()] == []


def test_honest_download_within_limit(hostile_server, tmp_path):
    from model.download import ImageTask, fetch_images

    report = fetch_images([ImageTask(image_hash="h", aid="a", url=hostile_server.url("ok"))], tmp_path / "images", _settings())

    assert report.rows[0]["status"] == "ok"
    assert 0 < report.rows[0]["bytes"] <= MAX_BYTES


def test_unreachable_port_fails_fast(tmp_path):
    """A port with nothing listening is a connection error, retried and then recorded."""
    from model.download import ImageTask, fetch_images

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = fetch_images([ImageTask(image_hash="h", aid="a", url=f"http://127.0.0.1:{port}/x.jpg")], tmp_path / "images", _settings(retries=1))

    assert report.rows[0]["status"] == "failed"
    assert "connection failed" in report.rows[0]["error"]
    assert report.rows[0]["attempts"] == 2
