"""Dagster resources: pipeline settings and MongoDB connections."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from dagster import ConfigurableResource
from pydantic import Field

from model.mongo import EmbeddedMongo, redact_text, redact_uri

DATA_ROOT_ENV = "NEWSLXMERT_DATA_ROOT"
MONGO_URI_ENV = "NEWSLXMERT_MONGO_URI"


def default_data_root() -> str:
    """Return ``NEWSLXMERT_DATA_ROOT``, else ``./data``, as an absolute path."""
    return os.path.abspath(os.environ.get(DATA_ROOT_ENV, "data"))


class PipelineSettings(ConfigurableResource):
    """Settings every stage reads: where data lands, which model profile, which device."""

    data_root: str = Field(default_factory=default_data_root, description="folder that contains every output")
    profile: str = Field(
        default_factory=lambda: os.environ.get("NEWSLXMERT_PROFILE", "base"),
        description="'base' loads real weights by name or folder; 'tiny' uses the small locally built models",
    )
    device: str = Field(
        default_factory=lambda: os.environ.get("NEWSLXMERT_DEVICE", "auto"),
        description="'auto' (CUDA when present), 'cpu' or 'cuda:N'",
    )

    def dataset_root(self, dataset: str) -> Path:
        return Path(self.data_root) / dataset

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddedMongoBusyError(TimeoutError):
    """Another process kept the embedded MongoDB server open for longer than the caller waits."""


def _acquire_lock(lock_file, timeout_s: float | None, storage: Path) -> None:
    if timeout_s is None:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise EmbeddedMongoBusyError(
                    f"the embedded MongoDB in {storage} is in use by another process; "
                    f"waited {timeout_s:.1f} s, retry later"
                ) from None
            time.sleep(0.1)


class MongoResource(ConfigurableResource):
    """A MongoDB collection, from the URI in an environment variable or an embedded server.

    With the variable unset, an embedded SecantusDB server starts in this process on
    127.0.0.1 with its files under ``<data_root>/mongo``. A file lock serializes processes
    that share that folder, because one storage folder can be opened by one server only.
    """

    uri_env_var: str = Field(default=MONGO_URI_ENV, description="environment variable holding the MongoDB URI")
    database: str = "nytimes"
    collection: str = "articles"
    data_root: str = Field(default_factory=default_data_root, description="embedded server data goes to <data_root>/mongo")

    def configured_uri(self) -> str | None:
        return os.environ.get(self.uri_env_var) or None

    def describe(self) -> str:
        """Describe where the collection lives, safe to log because the password is redacted."""
        uri = self.configured_uri()
        where = redact_uri(uri) if uri else f"embedded SecantusDB in {Path(self.data_root) / 'mongo'}"
        return f"{where} {self.database}.{self.collection}"

    @contextlib.contextmanager
    def open_collection(self, lock_timeout_s: float | None = None) -> Iterator:
        """Yield a pymongo collection; errors carry no password.

        With the embedded server, ``lock_timeout_s`` bounds the wait for another process
        that has the server open: after it, EmbeddedMongoBusyError is raised. None waits
        as long as it takes.
        """
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        uri = self.configured_uri()
        try:
            if uri:
                try:
                    client = MongoClient(uri, serverSelectionTimeoutMS=20000)
                except ValueError as error:  # pymongo raises a plain ValueError for some malformed hosts
                    raise ValueError(f"invalid MongoDB URI {self.describe()}: {redact_text(str(error))}") from None
                try:
                    yield client[self.database][self.collection]
                finally:
                    client.close()
                return
            storage = Path(self.data_root) / "mongo"
            storage.mkdir(parents=True, exist_ok=True)
            with open(storage.parent / ".mongo.lock", "w") as lock_file:
                _acquire_lock(lock_file, lock_timeout_s, storage)
                with EmbeddedMongo(storage) as server:
                    client = MongoClient(server.uri, serverSelectionTimeoutMS=20000)
                    try:
                        yield client[self.database][self.collection]
                    finally:
                        client.close()
        except PyMongoError as error:
            raise RuntimeError(f"MongoDB operation on {self.describe()} failed: {redact_text(str(error))}") from None
