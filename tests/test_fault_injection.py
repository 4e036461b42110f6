"""SIGKILL at random points, then a rerun: nothing is lost, nothing is left half-written, nothing redone.

For each stage a worker process runs the stage's real code (its command line where it has
one) on a small input. The worker is killed with SIGKILL once a seeded random number of
items is finished, after a further seeded random delay. Every rename of the worker is slowed down
(``SLOW_RENAMES``), so the kill lands inside an atomic write (temporary file complete, not
yet renamed) about as often as between writes. The stage then runs again, and the test
checks that:

- the final outputs equal those of an uninterrupted run,
- no temporary file or staging folder is left (``*.tmp``, hidden ``.<name>.*`` folders),
- no item finished before the kill is done again (the rerun's own counts say so).

The stage owners' single-kill tests (test_export, test_regions, test_faces,
test_translate) stay where they are; docs/reliability.md lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from model.demo_corpus import generate_demo_corpus, insert_demo_documents
from model.feature_store import FeatureStore
from model.storage import atomic_write_bytes, canonical_json, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]

# Prepended to every worker script. The random delay before each rename keeps a complete
# temporary file on disk for a while, so that some kills land inside a write.
SLOW_RENAMES = textwrap.dedent(
    """
    import os, random, sys, time
    _rng = random.Random(int(os.environ["FAULT_SEED"]))
    _delay = float(os.environ["FAULT_RENAME_DELAY_S"])
    _replace = os.replace
    def _slow_replace(source, target, *args, **kwargs):
        time.sleep(_delay * _rng.uniform(0.5, 1.5))
        return _replace(source, target, *args, **kwargs)
    os.replace = _slow_replace
    """
)


def worker_environment(seed: int, delay_s: float) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "FAULT_SEED": str(seed),
        "FAULT_RENAME_DELAY_S": str(delay_s),
    }


def kill_at_random_point(
    script: str,
    args: list[str],
    finished: Callable[[], int],
    total: int,
    seed: int,
    delay_s: float,
    log_path: Path,
    timeout_s: float = 300.0,
    environment: dict[str, str] | None = None,
) -> int:
    """Run ``script`` in a new process group, SIGKILL it at a seeded point; return the items finished then.

    The kill comes once ``finished()`` reaches a seeded count between 1 and ``total - 2``,
    after a further seeded delay of up to one rename delay. The whole process group is
    killed, child processes (Dagster's step processes) included.
    """
    rng = random.Random(seed)
    kill_after = rng.randint(1, total - 2)
    extra_wait = rng.uniform(0.0, delay_s)
    script_path = log_path.with_suffix(".py")
    script_path.write_text(SLOW_RENAMES + textwrap.dedent(script), encoding="utf-8")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script_path), *args],
            cwd=REPO,
            env=environment or worker_environment(seed, delay_s),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while finished() < kill_after:
            if process.poll() is not None:
                raise AssertionError(
                    f"the worker exited ({process.returncode}) before {kill_after} of {total} items were finished:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker finished fewer than {kill_after} items in {timeout_s} s")
            time.sleep(0.02)
        time.sleep(extra_wait)
        assert process.poll() is None, f"the worker finished all {total} items before the kill; slow it down"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return finished()


def leftovers(root: Path) -> list[str]:
    """Temporary files and hidden staging folders under ``root``: what a killed write leaves."""
    found = []
    for path in root.rglob("*"):
        if path.name.endswith(".tmp") or (path.is_dir() and path.name.startswith(".")):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def visible_files(root: Path, pattern: str) -> list[Path]:
    if not root.exists():
        return []
    return sorted(path for path in root.rglob(pattern) if not path.name.startswith("."))


def tree_bytes(root: Path, pattern: str = "*.json") -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in visible_files(root, pattern)}


def store_size(folder: Path) -> int:
    if not (folder / "schema.json").exists():
        return 0
    return len(FeatureStore(folder))


def assert_stores_equal(got: FeatureStore, expected: FeatureStore, atol: float = 0.0) -> None:
    assert got.keys() == expected.keys()
    for key in expected.keys():
        left, right = got.get(key), expected.get(key)
        assert sorted(left) == sorted(right), key
        for field, value in right.items():
            if isinstance(value, str):
                assert left[field] == value, f"{key} {field}"
            else:
                np.testing.assert_allclose(np.asarray(left[field]), np.asarray(value), atol=atol, err_msg=f"{key} {field}")


# --------------------------------------------------------------------------- cleanup of temporaries

HOLD_A_WRITE = """
import sys, threading
from pathlib import Path
folder, kind = Path(sys.argv[1]), sys.argv[2]
release = folder.parent / "release"
_real_replace = os.replace
def _held_replace(source, target, *args, **kwargs):
    # Announce the temporary file, then wait for the test to allow the rename.
    (folder.parent / "holding").write_text(str(source))
    while not release.exists():
        time.sleep(0.02)
    return _real_replace(source, target, *args, **kwargs)
os.replace = _held_replace
if kind == "atomic_write":
    from model.storage import atomic_write_bytes
    atomic_write_bytes(folder / "result.json", b'{"complete": true}\\n')
elif kind == "feature_store":
    import numpy as np
    from model.feature_store import FeatureStore
    FeatureStore(folder / "store").write([{"key": "a", "x": np.arange(4, dtype="<f4")}])
elif kind in ("link_image", "copy_image"):
    from model.download import _place_local
    _place_local(folder.parent / "source.jpg", folder / "result.jpg", link=kind == "link_image")
"""


@pytest.mark.parametrize("kind", ["atomic_write", "feature_store", "link_image", "copy_image"])
def test_cleanup_spares_live_writes(tmp_path, kind):
    """A concurrent run's cleanup removes dead temporaries but not one that a live writer holds."""
    folder = tmp_path / "stage"
    folder.mkdir()
    (tmp_path / "source.jpg").write_bytes(b"\xff\xd8\xff image bytes")
    stale = folder / ".left-by-a-killed-run.json.x1y2.tmp"
    stale.write_bytes(b'{"half": ')
    script = tmp_path / "hold.py"
    script.write_text("import os, time\n" + HOLD_A_WRITE, encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, str(script), str(folder), kind], cwd=REPO, env=worker_environment(0, 0.0), stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "holding").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never reached its rename"
            time.sleep(0.02)
        live = Path((tmp_path / "holding").read_text())

        removed = remove_stale_temporaries(folder)

        assert removed == 1
        assert not stale.exists()
        assert live.exists(), f"the cleanup removed {live.name}, which a live writer held"
        (tmp_path / "release").touch()
        assert process.wait(timeout=60) == 0, process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert leftovers(folder) == []
    if kind == "feature_store":
        assert FeatureStore(folder / "store").keys() == ["a"]
    elif kind == "atomic_write":
        assert json.loads((folder / "result.json").read_text()) == {"complete": True}
    else:
        assert (folder / "result.jpg").read_bytes() == (tmp_path / "source.jpg").read_bytes()


def test_write_retried_after_early_cleanup(tmp_path, monkeypatch):
    """A cleaner that deletes a temporary file before its writer locks it costs one retry, not the write."""
    import model.storage as storage

    real_mkstemp = storage.tempfile.mkstemp
    calls = []

    def mkstemp_then_cleanup(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        calls.append(name)
        if len(calls) == 1:
            remove_stale_temporaries(tmp_path)  # runs before the writer's lock
        return fd, name

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp_then_cleanup)
    atomic_write_bytes(tmp_path / "out.json", b"{}\n")

    assert len(calls) == 2
    assert (tmp_path / "out.json").read_bytes() == b"{}\n"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- export

EXPORT_WORKER = """
from pymongo import MongoClient
from model.export import export_documents
export_documents(MongoClient(sys.argv[1]).test.articles, sys.argv[2], page_size=7)
"""


@pytest.fixture(scope="module")
def export_source(tmp_path_factory):
    """A SecantusDB collection of 30 demo articles and its uninterrupted export."""
    from pymongo import MongoClient

    from model.export import export_documents
    from model.mongo import EmbeddedMongo

    folder = tmp_path_factory.mktemp("export_source")
    corpus = generate_demo_corpus(n_articles=30, seed=11)
    with EmbeddedMongo(folder / "db") as server:
        client = MongoClient(server.uri)
        insert_demo_documents(client.test.articles, corpus.documents)
        export_documents(client.test.articles, folder / "reference")
        yield server.uri, client.test.articles, folder / "reference", len(corpus.documents)
        client.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_export_killed_at_random_point(export_source, tmp_path, seed):
    from model.export import export_documents

    uri, collection, reference, total = export_source
    out = tmp_path / "articles"

    finished = kill_at_random_point(
        EXPORT_WORKER, [uri, str(out)], lambda: len(visible_files(out, "*.json")), total, seed, 0.08, tmp_path / "worker.log"
    )
    for path in visible_files(out, "*.json"):
        json.loads(path.read_text(encoding="utf-8"))  # every visible file is complete
    temporaries = [name for name in leftovers(out) if name.endswith(".tmp")]

    rerun = export_documents(collection, out)

    assert 1 <= finished < total
    assert rerun.unchanged == finished
    assert rerun.written == total - finished
    assert rerun.stale_temporaries_removed == len(temporaries)
    assert tree_bytes(out) == tree_bytes(reference)
    assert leftovers(out) == []


# --------------------------------------------------------------------------- export as a Dagster run

# Dagster's step processes import this script as their main module (multiprocessing
# spawn), so the slowed renames apply there too. The guard keeps them from starting the
# command again.
DAGSTER_WORKER = """
if __name__ == "__main__":
    from dagster._cli import main
    sys.argv = ["dagster", *sys.argv[1:]]
    main()
"""


def test_export_run_killed_with_embedded_server(tmp_path, isolated_dagster_home):
    """A Dagster run of the export is killed (run process, step process and the embedded
    SecantusDB inside it) and materialized again: the server's files recover, the lock is
    free, and the rerun writes only what was missing.
    """
    from dagster import DagsterInstance, materialize

    from assets.nytimes_articles import nytimes800k_articles
    from model.manifest import read_manifest
    from pipelines.resources import MongoResource, PipelineSettings

    seed, total = 0, 40
    data_root = tmp_path / "data"
    corpus = generate_demo_corpus(n_articles=total, seed=17, n_days=1)
    with MongoResource(data_root=str(data_root)).open_collection() as collection:
        insert_demo_documents(collection, corpus.documents)
    environment = worker_environment(seed, 0.1)
    environment.update(
        NEWSLXMERT_DATA_ROOT=str(data_root),
        NEWSLXMERT_EXECUTOR="multiprocess",
        DAGSTER_HOME=str(isolated_dagster_home),
    )
    environment.pop("NEWSLXMERT_MONGO_URI", None)
    out = data_root / "nytimes800k" / "articles"
    args = ["asset", "materialize", "-m", "pipelines.definitions", "--select", "nytimes800k/articles", "--partition", "2024-01-01"]

    def exported() -> int:
        return len([path for path in visible_files(out, "*.json") if "_manifests" not in path.parts])

    finished = kill_at_random_point(DAGSTER_WORKER, args, exported, total, seed, 0.1, tmp_path / "worker.log", environment=environment)
    result = materialize(
        [nytimes800k_articles],
        partition_key="2024-01-01",
        resources={"settings": PipelineSettings(data_root=str(data_root)), "nytimes_mongo": MongoResource(data_root=str(data_root))},
        instance=DagsterInstance.ephemeral(),
    )

    metadata = {key: value.value for key, value in result.asset_materializations_for_node("nytimes800k__articles")[0].metadata.items()}
    assert result.success
    assert metadata["unchanged"] == finished
    assert metadata["written"] == total - finished
    assert len(read_manifest(data_root / "nytimes800k", "articles", "2024-01-01")["articles"]) == total
    assert exported() == total
    assert leftovers(out) == []


# --------------------------------------------------------------------------- image download


class ImageServer:
    """HTTP on 127.0.0.1 serving ``images`` at ``/<hash>.jpg``; counts requests per hash."""

    def __init__(self, images: dict[str, bytes]):
        self.images = images
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.strip("/").removesuffix(".jpg")
                with server.lock:
                    server.requests[name] = server.requests.get(name, 0) + 1
                body = server.images.get(name)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}.jpg"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


DOWNLOAD_WORKER = """
import json
from model.download import FetchSettings, ImageTask, fetch_images
tasks = [ImageTask(**task) for task in json.loads(open(sys.argv[1]).read())]
fetch_images(tasks, sys.argv[2], FetchSettings(max_workers=2, retries=0, connect_timeout_s=5, read_timeout_s=5))
"""


@pytest.fixture(scope="module")
def image_server():
    corpus = generate_demo_corpus(n_articles=8, seed=12)
    images = dict(sorted(corpus.images.items())[:12])
    server = ImageServer(images)
    yield server
    server.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_image_download_killed_at_random_point(image_server, tmp_path, seed):
    from model.download import FetchSettings, ImageTask, fetch_images

    tasks = [{"image_hash": name, "aid": f"article-{index}", "url": image_server.url(name)} for index, name in enumerate(image_server.images)]
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps(tasks), encoding="utf-8")
    images_dir = tmp_path / "images"

    finished = kill_at_random_point(
        DOWNLOAD_WORKER, [str(tasks_file), str(images_dir)], lambda: len(visible_files(images_dir, "*.jpg")),
        len(tasks), seed, 0.15, tmp_path / "worker.log",
    )
    done_before = {path.stem for path in visible_files(images_dir, "*.jpg")}
    for name in done_before:
        assert (images_dir / f"{name}.jpg").read_bytes() == image_server.images[name]
    time.sleep(0.3)  # let the server count any request the worker sent just before it died
    with image_server.lock:
        image_server.requests.clear()

    report = fetch_images([ImageTask(**task) for task in tasks], images_dir, FetchSettings(max_workers=2, retries=0))

    statuses = {row["image_hash"]: row["status"] for row in report.rows}
    assert len(done_before) == finished
    assert {name for name, status in statuses.items() if status == "skipped"} == done_before
    assert {name for name, status in statuses.items() if status == "ok"} == set(image_server.images) - done_before
    assert image_server.requests == {name: 1 for name in set(image_server.images) - done_before}
    assert tree_bytes(images_dir, "*.jpg") == {f"{name}.jpg": data for name, data in image_server.images.items()}
    assert leftovers(images_dir) == []


# --------------------------------------------------------------------------- region features

REGIONS_WORKER = """
import torch
torch.set_num_threads(1)
from pathlib import Path
from model.detectors.torchvision_frcnn import TorchvisionBackend
from model.feature_store import FeatureStore
from model.regions import extract_regions
tiny, images, out = map(Path, sys.argv[1:4])
items = {path.stem: path for path in sorted(images.glob("*.jpg"))}
extract_regions(items, TorchvisionBackend(tiny), FeatureStore(out / "store"), json_dir=out / "json", batch_size=1, flush_every=1)
"""


@pytest.fixture(scope="module")
def region_setup(tmp_path_factory):
    """A tiny detector, eight demo images and their uninterrupted extraction."""
    from model.detectors.torchvision_frcnn import (
        TorchvisionBackend,
        build_tiny_detector,
    )
    from model.regions import extract_regions

    folder = tmp_path_factory.mktemp("regions")
    tiny = build_tiny_detector(folder / "frcnn")
    images = folder / "images"
    images.mkdir()
    for name, data in sorted(generate_demo_corpus(n_articles=5, seed=13).images.items())[:8]:
        (images / f"{name}.jpg").write_bytes(data)
    backend = TorchvisionBackend(tiny)
    items = {path.stem: path for path in sorted(images.glob("*.jpg"))}
    reference = folder / "reference"
    extract_regions(items, backend, FeatureStore(reference / "store"), json_dir=reference / "json")
    return tiny, images, items, backend, reference


@pytest.mark.parametrize("seed", SEEDS)
def test_region_features_killed_at_random_point(region_setup, tmp_path, seed):
    from model.region_json import read_region_json
    from model.regions import extract_regions

    tiny, images, items, backend, reference = region_setup
    out = tmp_path / "region_features"

    finished = kill_at_random_point(
        REGIONS_WORKER, [str(tiny), str(images), str(out)], lambda: store_size(out / "store"), len(items), seed, 0.1, tmp_path / "worker.log"
    )
    stored_before = set(FeatureStore(out / "store").keys())
    for path in visible_files(out / "json", "*.json"):
        read_region_json(path)  # every visible file is complete

    rerun = extract_regions(items, backend, FeatureStore(out / "store"), json_dir=out / "json")

    assert len(stored_before) == finished
    assert stored_before <= set(rerun.skipped)
    assert not stored_before & set(rerun.done)
    assert sorted(rerun.done + rerun.skipped) == sorted(items)
    assert rerun.failed == {}
    assert_stores_equal(FeatureStore(out / "store"), FeatureStore(reference / "store"), atol=1e-5)
    assert sorted(tree_bytes(out / "json")) == sorted(tree_bytes(reference / "json"))
    assert leftovers(out) == []


# --------------------------------------------------------------------------- faces

FACES_WORKER = """
import runpy
sys.argv = ["model.faces", *sys.argv[1:]]
runpy.run_module("model.faces", run_name="__main__")
"""


@pytest.fixture(scope="module")
def face_photos(tmp_path_factory) -> Path:
    """Eight photos: real news photos from the shared data when present, else demo scenes."""
    from conftest import SHARED_DATA

    folder = tmp_path_factory.mktemp("face_photos")
    real = SHARED_DATA / "newsimages-2025" / "images"
    if real.is_dir():
        for path in sorted(real.glob("*.jpg"))[:8]:
            (folder / path.name).symlink_to(path)
    else:
        for name, data in sorted(generate_demo_corpus(n_articles=5, seed=14).images.items())[:8]:
            (folder / f"{name}.jpg").write_bytes(data)
    return folder


def _faces_cli_args(photos: Path, out: Path, data_root: Path) -> list[str]:
    return [str(photos), str(out), "--profile", "tiny", "--data-root", str(data_root), "--images-per-write", "1", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def faces_setup(face_photos, tiny_facenet_file, tmp_path_factory):
    """A data root holding the tiny FaceNet weights, and the uninterrupted run's output."""
    from model.faces import main, tiny_facenet_path

    data_root = tmp_path_factory.mktemp("faces_root")
    weights = tiny_facenet_path(data_root)
    weights.parent.mkdir(parents=True)
    weights.symlink_to(tiny_facenet_file)
    reference = data_root / "reference"
    main(_faces_cli_args(face_photos, reference, data_root))
    return data_root, reference


@pytest.mark.parametrize("seed", SEEDS)
def test_faces_killed_at_random_point(face_photos, faces_setup, tmp_path, seed, capsys):
    from model.faces import main

    data_root, reference = faces_setup
    total = len(list(face_photos.glob("*.jpg")))
    out = tmp_path / "face_features"
    args = _faces_cli_args(face_photos, out, data_root)

    finished = kill_at_random_point(FACES_WORKER, args, lambda: store_size(out / "store"), total, seed, 0.1, tmp_path / "worker.log")
    capsys.readouterr()
    main(args)
    output = capsys.readouterr().out
    summary = json.loads(output[output.index("\n{") + 1 :])

    assert summary["resumed"] == finished
    assert summary["computed"] == total - finished
    assert_stores_equal(FeatureStore(out / "store"), FeatureStore(reference / "store"), atol=1e-5)
    assert leftovers(out) == []


# --------------------------------------------------------------------------- translation

TRANSLATE_WORKER = """
import runpy
sys.argv = ["model.translate", *sys.argv[1:]]
runpy.run_module("model.translate", run_name="__main__")
"""


@pytest.fixture(scope="module")
def translation_setup(tmp_path_factory):
    """Twelve German article files, an untrained tiny MarianMT and the uninterrupted translation."""
    from model.translate import (
        MarianTranslator,
        TinyMarianConfig,
        TranslationSettings,
        build_tiny_marian,
        translate_articles,
    )

    folder = tmp_path_factory.mktemp("translation")
    corpus = generate_demo_corpus(n_articles=12, seed=15)
    items = []
    for index, row in enumerate(corpus.german_rows):
        document = {"_id": f"de-{index:03d}", "split": ("train", "valid", "test")[index % 3], "language": "de",
                    "title": row["title"], "text": row["text"], "image_hash": row["hashvalue"]}
        atomic_write_bytes(folder / "articles" / document["split"] / f"{document['_id']}.json", canonical_json(document).encode())
        items.append((document["split"], document["_id"]))
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"articles": items}), encoding="utf-8")
    model = folder / "marian"
    config = TinyMarianConfig(vocab_size=300, d_model=32, ffn_dim=64, layers=1, attention_heads=2, max_positions=64)
    build_tiny_marian(model, (), [de for de, _ in corpus.parallel_sentences], config)
    translator = MarianTranslator(str(model), TranslationSettings(num_beams=1, batch_size=4))
    translate_articles(items, folder / "articles", folder / "reference", translator, group_size=1)
    return folder, items, manifest, model


@pytest.mark.parametrize("seed", SEEDS)
def test_translation_killed_at_random_point(translation_setup, tmp_path, seed, capsys):
    from model.translate import main

    folder, items, manifest, model = translation_setup
    out = tmp_path / "translated"
    args = ["translate", str(folder / "articles"), str(out), "--model", str(model), "--manifest", str(manifest),
            "--group-size", "1", "--num-beams", "1", "--batch-size", "4"]

    finished = kill_at_random_point(TRANSLATE_WORKER, args, lambda: len(visible_files(out, "*.json")), len(items), seed, 0.15, tmp_path / "worker.log")
    capsys.readouterr()
    main(args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert summary["reused"] == finished
    assert summary["translated_documents"] == len(items) - finished
    assert tree_bytes(out) == tree_bytes(folder / "reference")
    assert leftovers(out) == []


# --------------------------------------------------------------------------- training

TRAIN_WORKER = """
import runpy
sys.argv = ["model.train_nytimes", *sys.argv[1:]]
runpy.run_module("model.train_nytimes", run_name="__main__")
"""


@pytest.fixture(scope="module")
def training_setup(tmp_path_factory):
    """Demo articles with region features and an index on disk, and a tiny LXMERT to start from."""
    from test_dataset import FEATURE_DIM, demo_region_features

    from model.detectors.base import pad_regions
    from model.index import build_index
    from model.manifest import write_manifest
    from model.tiny import build_tiny_lxmert

    folder = tmp_path_factory.mktemp("training")
    dataset_root = folder / "nytimes800k"
    corpus = generate_demo_corpus(n_articles=30, seed=16)
    documents = [json.loads(canonical_json(document)) for document in corpus.documents]
    records, items, texts = [], [], []
    for document in documents:
        atomic_write_bytes(dataset_root / "articles" / document["split"] / f"{document['_id']}.json", canonical_json(document).encode())
        items.append([document["split"], document["_id"]])
        texts += [document["headline"]["main"], document["snippet"]]
        for position in document["image_positions"]:
            section = document["parsed_section"][position]
            texts.append(section["text"])
            regions = demo_region_features(section["text"], section["hash"], FEATURE_DIM)
            count = len(regions["obj_ids"])
            features = pad_regions(
                roi_features=regions["roi_features"], boxes=regions["normalized_boxes"] * 100.0, obj_ids=regions["obj_ids"],
                obj_probs=np.ones(count, np.float32), width=100, height=100, attr_ids=regions["attr_ids"],
            )
            records.append(features.to_record(section["hash"]))
    write_manifest(dataset_root, "articles", None, {"articles": sorted(items)})
    FeatureStore(dataset_root / "region_features" / "store").write(records)
    write_manifest(dataset_root, "region_features", None, {"done": sorted(r["key"] for r in records), "failed": []})
    build_index(dataset_root, "nytimes800k", require_faces=False)
    lxmert = build_tiny_lxmert(folder / "lxmert", texts, FEATURE_DIM)
    return dataset_root, lxmert


def _training_args(dataset_root: Path, lxmert: Path, output: Path) -> list[str]:
    articles, index = dataset_root / "articles", dataset_root / "index"
    return [
        "--trainDsDir", str(articles / "train"), "--trainIndex", str(index / "train.pickle"),
        "--validDsDir", str(articles / "valid"), "--validIndex", str(index / "valid.pickle"),
        "--featsDir", str(dataset_root / "region_features"), "--output", str(output), "--model", str(lxmert),
        "--mode", "1", "--maxSeqLen", "32", "--epochs", "2", "--batchSize", "4", "--microBatchSize", "4",
        "--numWorkers", "0", "--device", "cpu", "--checkpointEverySteps", "1", "--progress", "False", "--resume", "True",
    ]


def _checkpointed_step(output: Path) -> int:
    pointer = output / "last.json"
    try:
        return int(json.loads(pointer.read_text(encoding="utf-8"))["global_step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _learning_record(history: dict) -> dict:
    """The parts of history.json that do not depend on timing."""
    return {
        "steps": [(step["step"], step["epoch"], step["loss"], step["lr"]) for step in history["steps"]],
        "epochs": [(epoch["epoch"], epoch["global_step"], epoch["train_loss"], epoch["valid_loss"]) for epoch in history["epochs"]],
    }


@pytest.fixture(scope="module")
def training_reference(training_setup, tmp_path_factory):
    from model.cli import main

    dataset_root, lxmert = training_setup
    output = tmp_path_factory.mktemp("training_reference") / "run"
    assert main("nytimes800k", "train_nytimes", _training_args(dataset_root, lxmert, output)) == 0
    return output


@pytest.mark.parametrize("seed", SEEDS)
def test_training_killed_at_random_point(training_setup, training_reference, tmp_path, seed, monkeypatch):
    import torch

    from model.cli import main

    dataset_root, lxmert = training_setup
    output = tmp_path / "run"
    args = _training_args(dataset_root, lxmert, output)
    total_steps = json.loads((training_reference / "last.json").read_text())["global_step"]

    kill_at_random_point(TRAIN_WORKER, args, lambda: _checkpointed_step(output), total_steps, seed, 0.1, tmp_path / "worker.log")
    checkpointed = _checkpointed_step(output)
    optimizer_steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: optimizer_steps.append(1) or real_step(self, *a, **k))

    assert main("nytimes800k", "train_nytimes", args) == 0

    assert 1 <= checkpointed < total_steps
    assert len(optimizer_steps) == total_steps - checkpointed, "steps finished before the kill were trained again"
    history = json.loads((output / "history.json").read_text())
    reference_history = json.loads((training_reference / "history.json").read_text())
    assert [step["step"] for step in history["steps"]] == list(range(1, total_steps + 1))
    assert _learning_record(history) == _learning_record(reference_history)
    for folder in ("checkpoints/epoch_002", "best"):
        got, expected = _weights(output / folder), _weights(training_reference / folder)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{folder} {name}")
    assert leftovers(output) == []
