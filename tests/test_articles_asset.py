"""The nytimes800k/articles asset, the MongoDB resource and the code location."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize
from pymongo import MongoClient

from assets.nytimes_articles import nytimes800k_articles
from model.demo_corpus import generate_demo_corpus, insert_demo_documents
from model.mongo import redact_text, redact_uri
from pipelines.resources import MongoResource, PipelineSettings

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")


def test_redact_uri_hides_password():
    redacted = redact_uri("mongodb://reader:s3cret@db.example.org:27017/nytimes?authSource=admin")

    assert "s3cret" not in redacted
    assert redacted == "mongodb://reader:***@db.example.org:27017/nytimes?authSource=admin"


def test_redact_text_hides_password_in_messages():
    message = "connection to mongodb+srv://reader:p%40ss@cluster0.example.net/ failed"

    assert redact_text(message) == "connection to mongodb+srv://reader:***@cluster0.example.net/ failed"


def test_resource_errors_do_not_leak_password(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NEWSLXMERT_MONGO_URI", "mongodb://reader:s3cret@127.0.0.1:1/?serverSelectionTimeoutMS=300")
    resource = MongoResource(data_root=str(tmp_path))
    caplog.set_level(logging.DEBUG)

    with pytest.raises(RuntimeError) as raised:
        with resource.open_collection() as collection:
            collection.find_one({})

    assert "s3cret" not in str(raised.value)
    assert "s3cret" not in resource.describe()
    assert "s3cret" not in caplog.text


def test_embedded_resource_persists_between_opens(tmp_path):
    resource = MongoResource(data_root=str(tmp_path), database="db", collection="c")

    with resource.open_collection() as collection:
        collection.insert_one({"_id": "kept"})
    with resource.open_collection() as collection:
        found = collection.find_one({"_id": "kept"})

    assert found == {"_id": "kept"}
    assert (tmp_path / "mongo").is_dir()


def _load_demo(data_root: Path, n_articles: int = 60) -> None:
    with MongoResource(data_root=str(data_root)).open_collection() as collection:
        insert_demo_documents(collection, generate_demo_corpus(n_articles=n_articles, n_days=3).documents)


def test_asset_exports_one_partition(tmp_path):
    _load_demo(tmp_path)
    resources = {"settings": PipelineSettings(data_root=str(tmp_path)), "nytimes_mongo": MongoResource(data_root=str(tmp_path))}

    result = materialize(
        [nytimes800k_articles], resources=resources, partition_key="2024-01-02", instance=DagsterInstance.ephemeral()
    )

    assert result.success
    metadata = result.asset_materializations_for_node("nytimes800k__articles")[0].metadata
    assert metadata["exported"].value == 20
    assert metadata["failed"].value == 0
    manifest = json.loads((tmp_path / "nytimes800k/articles/_manifests/2024-01-02.json").read_text())
    assert len(manifest["articles"]) == 20
    for split, aid in manifest["articles"]:
        document = json.loads((tmp_path / "nytimes800k/articles" / split / f"{aid}.json").read_text())
        assert document["pub_date"].startswith("2024-01-02T")


def test_definitions_validate_and_cli_materialize(tmp_path):
    _load_demo(tmp_path)
    env = dict(os.environ, NEWSLXMERT_DATA_ROOT=str(tmp_path), DAGSTER_HOME=str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()

    validate = subprocess.run(
        [str(DAGSTER), "definitions", "validate", "-m", "pipelines.definitions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert validate.returncode == 0, validate.stderr[-3000:]

    materialized = subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "pipelines.definitions",
         "--select", "nytimes800k/articles", "--partition", "2024-01-03"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert materialized.returncode == 0, materialized.stderr[-3000:]
    exported = [p for split in ("train", "valid", "test") for p in (tmp_path / "nytimes800k/articles" / split).glob("*.json")]
    assert len(exported) == 20


def test_embedded_lock_timeout_raises_busy(tmp_path):
    from pipelines.resources import EmbeddedMongoBusyError

    resource = MongoResource(data_root=str(tmp_path))
    with resource.open_collection():
        waiting = subprocess.run(
            [sys.executable, "-c",
             "import sys; from pipelines.resources import MongoResource, EmbeddedMongoBusyError\n"
             "try:\n"
             "    with MongoResource(data_root=sys.argv[1]).open_collection(lock_timeout_s=0.5):\n"
             "        print('opened')\n"
             "except EmbeddedMongoBusyError as error:\n"
             "    print('busy:', error)\n",
             str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )

    assert waiting.stdout.startswith("busy:"), waiting.stderr[-2000:]
    assert "in use by another process" in waiting.stdout
