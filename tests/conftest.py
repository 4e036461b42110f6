"""Shared fixtures: an isolated Dagster home, a real SecantusDB server, the shared test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_dagster_home(tmp_path_factory, monkeypatch):
    """Give every test its own DAGSTER_HOME and keep the user's environment out of tests."""
    home = tmp_path_factory.mktemp("dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("NEWSLXMERT_MONGO_URI", raising=False)
    monkeypatch.delenv("NEWSLXMERT_DATA_ROOT", raising=False)
    monkeypatch.delenv("NEWSLXMERT_PROFILE", raising=False)
    return home


@pytest.fixture
def mongo_server(tmp_path):
    """A real SecantusDB server on 127.0.0.1 with its files in a temporary folder."""
    from model.mongo import EmbeddedMongo

    with EmbeddedMongo(tmp_path / "secantus") as server:
        yield server


@pytest.fixture
def mongo_client(mongo_server):
    from pymongo import MongoClient

    client = MongoClient(mongo_server.uri)
    yield client
    client.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real news data beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}; place the shared/ folder beside the repository")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Keep each test on one thread: CI has two cores and tests run one at a time."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_facenet_file(tmp_path_factory) -> Path:
    """Random tiny-profile FaceNet weights (about 90 MB), built once per test session."""
    from model.faces import ensure_tiny_facenet

    return ensure_tiny_facenet(tmp_path_factory.mktemp("tiny_facenet_root"))


@pytest.fixture
def link_tiny_facenet(tiny_facenet_file):
    """Return a function that makes the session's tiny FaceNet weights the tiny weights of a data root."""
    from model.faces import tiny_facenet_path

    def link(data_root: Path) -> Path:
        target = tiny_facenet_path(data_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(tiny_facenet_file)
        return target

    return link


@pytest.fixture(scope="session")
def dagster_dev(tmp_path_factory):
    """One ``dagster dev`` on 127.0.0.1 for the UI and backfill tests, stopped by its process group.

    The NYTimes800k partitions start at the demo corpus's first day, and a backfill run
    covers up to 2 partitions, so a backfill of the 6 demo days takes 3 runs. Runs execute
    their steps in process: on two cores, a process per step costs more than the steps.
    Images are copied from ``<data root>/demo/images``, where tests write the demo files.
    """
    from dagster_dev_server import DagsterDev

    root = tmp_path_factory.mktemp("dagster_dev")
    server = DagsterDev(
        root,
        env={
            "NEWSLXMERT_NYTIMES_START_DATE": "2024-01-01",
            "NEWSLXMERT_MAX_PARTITIONS_PER_RUN": "2",
            "NEWSLXMERT_PROFILE": "tiny",
            "NEWSLXMERT_DEVICE": "cpu",
            "NEWSLXMERT_EXECUTOR": "in_process",
            "NEWSLXMERT_IMAGE_SOURCE_DIR": str(root / "data" / "demo" / "images"),
        },
    )
    with server:
        yield server
