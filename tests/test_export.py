"""Export of MongoDB documents to per-split JSON folders, against a real SecantusDB server."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import Binary, Decimal128, ObjectId

from model.demo_corpus import generate_demo_corpus, insert_demo_documents
from model.export import export_documents, iter_documents_by_id_range

REPO = Path(__file__).resolve().parents[1]


def _nested_document(oid: str, split: str | None = "train", **extra) -> dict:
    document = {
        "_id": ObjectId(oid),
        "pub_date": dt.datetime(2018, 3, 4, 5, 6, 7),
        "headline": {"main": "A headline", "print": "ignored by the projection"},
        "snippet": "A snippet.",
        "parsed_section": [
            {"type": "paragraph", "text": "Body.", "named_entities": [{"text": "Body", "label": "ORG", "start": 0, "end": 4}]},
            {"type": "caption", "text": "A caption.", "hash": "ab" * 32, "url": "https://example.org/a.jpg"},
        ],
        "image_positions": [1],
    }
    if split is not None:
        document["split"] = split
    document.update(extra)
    return document


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "_manifests" not in path.parts
    }


def test_export_nested_types_and_bad_documents(mongo_client, tmp_path):
    collection = mongo_client.test.articles
    collection.insert_many(
        [
            _nested_document("0" * 23 + "1", split="train"),
            _nested_document("0" * 23 + "2", split="val"),  # alias of valid
            _nested_document("0" * 23 + "3", split=None),  # missing split
            _nested_document("0" * 23 + "4", split="holdout"),  # unknown split
            _nested_document("0" * 23 + "5", image_positions=[]),  # no images
            dict(_nested_document("0" * 23 + "6"), _id="../escape"),  # unsafe id
            dict(_nested_document("0" * 23 + "7"), _id="a/b"),
            dict(_nested_document("0" * 23 + "8"), _id=""),
        ]
    )
    out = tmp_path / "root" / "articles"

    report = export_documents(collection, out, page_size=3)

    assert report.per_split == {"train": 1, "valid": 1}
    assert report.skipped_no_images == ["000000000000000000000005"]
    failed = {failure.aid: failure.reason for failure in report.failures}
    assert len(failed) == 5
    assert "missing 'split'" in failed["000000000000000000000003"]
    assert "unknown split 'holdout'" in failed["000000000000000000000004"]
    assert any("path separator" in reason for aid, reason in failed.items() if "escape" in aid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "secantus"]
    assert sorted(p.relative_to(tmp_path / "root").as_posix() for p in (tmp_path / "root").rglob("*") if p.is_file()) == [
        "articles/train/000000000000000000000001.json",
        "articles/valid/000000000000000000000002.json",
    ]

    exported = json.loads((out / "train" / "000000000000000000000001.json").read_text())
    assert exported["_id"] == "000000000000000000000001"
    assert exported["pub_date"] == "2018-03-04T05:06:07Z"
    assert exported["headline"] == {"main": "A headline", "print": "ignored by the projection"}
    assert exported["parsed_section"][0]["named_entities"][0]["label"] == "ORG"
    assert json.loads((out / "valid" / "000000000000000000000002.json").read_text())["split"] == "valid"


def test_export_bson_scalar_types(mongo_client, tmp_path):
    collection = mongo_client.test.articles
    collection.insert_one(
        _nested_document("0" * 23 + "9", price=Decimal128("12.50"), blob=Binary(b"\x00\x01"), ref=ObjectId("0" * 24))
    )

    export_documents(collection, tmp_path, fields=None)

    exported = json.loads((tmp_path / "train" / ("0" * 23 + "9.json")).read_text())
    assert exported["price"] == "12.50"
    assert exported["blob"] == "AAE="
    assert exported["ref"] == "0" * 24


def test_projection_drops_unused_fields(mongo_client, tmp_path):
    collection = mongo_client.test.articles
    collection.insert_one(_nested_document("0" * 23 + "1", unused_large_field="x" * 1000))

    export_documents(collection, tmp_path)

    exported = json.loads((tmp_path / "train" / ("0" * 23 + "1.json")).read_text())
    assert "unused_large_field" not in exported


def test_reexport_is_byte_identical_and_writes_nothing(mongo_client, tmp_path):
    collection = mongo_client.test.articles
    insert_demo_documents(collection, generate_demo_corpus(n_articles=30, seed=3).documents)

    first = export_documents(collection, tmp_path / "a", page_size=7)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.json")}
    second = export_documents(collection, tmp_path / "a", page_size=7)
    export_documents(collection, tmp_path / "b", page_size=100)

    assert first.written == 30
    assert second.written == 0
    assert second.unchanged == 30
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.json")} == mtimes
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_changed_split_moves_the_file(mongo_client, tmp_path):
    collection = mongo_client.test.articles
    collection.insert_one(_nested_document("0" * 23 + "1", split="train"))
    export_documents(collection, tmp_path)

    collection.update_one({}, {"$set": {"split": "test"}})
    report = export_documents(collection, tmp_path)

    assert report.moved_between_splits == 1
    assert not (tmp_path / "train" / ("0" * 23 + "1.json")).exists()
    assert (tmp_path / "test" / ("0" * 23 + "1.json")).exists()


def test_paging_visits_every_document_once(mongo_client):
    collection = mongo_client.test.articles
    collection.insert_many([{"_id": i, "v": i} for i in range(23)])

    pages = list(iter_documents_by_id_range(collection, {"v": {"$gte": 5}}, None, page_size=4))

    assert [len(page) for page in pages] == [4, 4, 4, 4, 2]
    assert [doc["_id"] for page in pages for doc in page] == list(range(5, 23))


def test_paging_rejects_zero_page_size(mongo_client):
    with pytest.raises(ValueError, match="page_size"):
        list(iter_documents_by_id_range(mongo_client.test.articles, page_size=0))


_EXPORT_SCRIPT = """
import sys, time
from pymongo import MongoClient
import model.export as export
original = export.write_json_if_changed
def slow_write(path, value):
    changed = original(path, value)
    time.sleep(0.02)
    return changed
export.write_json_if_changed = slow_write
client = MongoClient(sys.argv[1])
export.export_documents(client.test.articles, sys.argv[2], page_size=10)
print("finished", flush=True)
"""


@pytest.mark.parametrize("kill_after", [0.6, 1.5])
def test_export_killed_halfway_then_rerun(mongo_server, mongo_client, tmp_path, kill_after):
    collection = mongo_client.test.articles
    insert_demo_documents(collection, generate_demo_corpus(n_articles=120, seed=5).documents)
    reference = tmp_path / "reference"
    export_documents(collection, reference)
    target = tmp_path / "killed"

    process = subprocess.Popen(
        [sys.executable, "-c", _EXPORT_SCRIPT, mongo_server.uri, str(target)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    time.sleep(kill_after)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(target.rglob("*.json")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = {p.name for p in target.rglob("*.json")}
    assert 0 < len(partial) < 120, "the kill should land in the middle of the export"

    report = export_documents(collection, target)

    assert report.written == 120 - len(partial)
    assert report.unchanged == len(partial)
    assert _tree(target) == _tree(reference)
    assert not list(target.rglob("*.tmp"))
