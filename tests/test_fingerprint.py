"""Content fingerprints of stage outputs."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from model.feature_store import FeatureStore
from model.fingerprint import (
    article_files_fingerprint,
    collection_fingerprint,
    combine_partition_fingerprints,
    documents_fingerprint,
    entity_files_fingerprint,
    evaluation_fingerprint,
    feature_stage_fingerprint,
    fingerprint_files,
    fingerprint_manifests,
    fingerprint_value,
    folder_fingerprint,
    image_files_fingerprint,
    index_files_fingerprint,
    store_row_locations,
    store_rows_fingerprint,
)
from model.index import IndexedPair, write_split_index
from model.manifest import write_manifest
from model.storage import UnsafePathError, atomic_write_bytes, canonical_json


def test_value_fingerprint_ignores_key_order():
    assert fingerprint_value({"a": 1, "b": [1, 2]}) == fingerprint_value({"b": [1, 2], "a": 1})
    assert fingerprint_value({"a": 1}) != fingerprint_value({"a": 2})


def test_file_fingerprint_follows_content_not_listing_order(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.json").write_text("one")
    (tmp_path / "x" / "b.json").write_text("two")

    first = fingerprint_files(tmp_path, ["x/b.json", "x/a.json"])
    same = fingerprint_files(tmp_path, ["x/a.json", "x/b.json"])
    (tmp_path / "x" / "b.json").write_text("three")
    changed = fingerprint_files(tmp_path, ["x/a.json", "x/b.json"])

    assert first == same
    assert first != changed
    assert len(first) == 32


def test_file_fingerprint_rejects_missing_and_outside_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fingerprint_files(tmp_path, ["nope.json"])
    with pytest.raises(UnsafePathError):
        fingerprint_files(tmp_path / "inner", ["../../etc/passwd"])


def test_file_fingerprint_reads_through_links(tmp_path):
    # The images stage may store a link to a photo of the local source folder.
    outside = tmp_path / "release" / "photo.jpg"
    atomic_write_bytes(outside, b"photo")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "h1.jpg").symlink_to(outside)
    first = fingerprint_files(tmp_path / "root", ["h1.jpg"])

    atomic_write_bytes(outside, b"another photo")

    assert fingerprint_files(tmp_path / "root", ["h1.jpg"]) != first
    with pytest.raises(UnsafePathError):
        fingerprint_files(tmp_path / "root", ["/etc/passwd"])


def test_manifest_fingerprint_changes_with_one_partition(tmp_path):
    write_manifest(tmp_path, "images", "2024-01-01", {"images": ["h1"], "failed": []})
    write_manifest(tmp_path, "images", "2024-01-02", {"images": ["h2"], "failed": []})
    before = fingerprint_manifests(tmp_path, "images", ["2024-01-02", "2024-01-01"])

    write_manifest(tmp_path, "images", "2024-01-02", {"images": ["h2", "h3"], "failed": []})

    assert fingerprint_manifests(tmp_path, "images", ["2024-01-01", "2024-01-02"]) != before
    assert fingerprint_manifests(tmp_path, "images", ["2024-01-01"]) == fingerprint_manifests(tmp_path, "images", ["2024-01-01"])
    with pytest.raises(FileNotFoundError, match="2024-01-03"):
        fingerprint_manifests(tmp_path, "images", ["2024-01-03"])


# --------------------------------------------------------------------------- partitions


def test_combine_single_partition_keeps_its_fingerprint():
    assert combine_partition_fingerprints({"2024-01-01": "abc"}) == "abc"
    assert combine_partition_fingerprints({None: "abc"}) == "abc"


def test_combine_several_partitions_ignores_order():
    forward = combine_partition_fingerprints({"a": "1", "b": "2"})
    backward = combine_partition_fingerprints({"b": "2", "a": "1"})

    assert forward == backward
    assert forward != combine_partition_fingerprints({"a": "1", "b": "3"})
    with pytest.raises(ValueError, match="at least one partition"):
        combine_partition_fingerprints({})


# --------------------------------------------------------------------------- stage files


def _write_articles(dataset_root, stage, partition, documents):
    items = []
    for split, aid, text in documents:
        atomic_write_bytes(dataset_root / stage / split / f"{aid}.json", canonical_json({"_id": aid, "text": text}).encode())
        items.append([split, aid])
    write_manifest(dataset_root, stage, partition, {"articles": sorted(items)})


def test_article_fingerprint_follows_listed_files(tmp_path):
    _write_articles(tmp_path, "articles", "d1", [("train", "a1", "one"), ("test", "a2", "two")])
    first = article_files_fingerprint(tmp_path, "articles", "d1")

    _write_articles(tmp_path, "articles", "d1", [("train", "a1", "one"), ("test", "a2", "two")])
    rewritten = article_files_fingerprint(tmp_path, "articles", "d1")
    _write_articles(tmp_path, "articles", "d2", [("train", "a3", "other day")])
    other_partition_written = article_files_fingerprint(tmp_path, "articles", "d1")
    _write_articles(tmp_path, "articles", "d1", [("train", "a1", "one, edited"), ("test", "a2", "two")])
    edited = article_files_fingerprint(tmp_path, "articles", "d1")
    _write_articles(tmp_path, "articles", "d1", [("train", "a1", "one, edited"), ("test", "a2", "two"), ("valid", "a4", "new")])
    added = article_files_fingerprint(tmp_path, "articles", "d1")

    assert rewritten == first
    assert other_partition_written == first
    assert edited != first
    assert added != edited


def test_article_fingerprint_names_missing_file(tmp_path):
    _write_articles(tmp_path, "translated_articles", "b1", [("train", "a1", "one")])
    (tmp_path / "translated_articles" / "train" / "a1.json").unlink()

    with pytest.raises(FileNotFoundError, match="train/a1.json"):
        article_files_fingerprint(tmp_path, "translated_articles", "b1")
    with pytest.raises(FileNotFoundError, match="partition b2"):
        article_files_fingerprint(tmp_path, "translated_articles", "b2")


def test_entity_fingerprint_follows_entity_files(tmp_path):
    atomic_write_bytes(tmp_path / "entities" / "a1.json", b'{"spans": []}')
    write_manifest(tmp_path, "entities", None, {"articles": [["train", "a1"]], "failed": []})
    first = entity_files_fingerprint(tmp_path, None)

    atomic_write_bytes(tmp_path / "entities" / "a1.json", b'{"spans": [{"label": "GPE"}]}')
    changed_spans = entity_files_fingerprint(tmp_path, None)
    write_manifest(tmp_path, "entities", None, {"articles": [["train", "a1"]], "failed": [{"aid": "a2", "reason": "x"}]})
    new_failure = entity_files_fingerprint(tmp_path, None)

    assert changed_spans != first
    assert new_failure != changed_spans


def test_image_fingerprint_reads_bytes_not_names(tmp_path):
    atomic_write_bytes(tmp_path / "images" / "h1.jpg", b"first image")
    atomic_write_bytes(tmp_path / "images" / "h2.jpg", b"second image")
    write_manifest(tmp_path, "images", "d1", {"images": ["h1", "h2"], "failed": []})
    first = image_files_fingerprint(tmp_path, "d1")

    atomic_write_bytes(tmp_path / "images" / "h1.jpg", b"first image")
    same_bytes = image_files_fingerprint(tmp_path, "d1")
    atomic_write_bytes(tmp_path / "images" / "h2.jpg", b"second image, replaced")
    replaced = image_files_fingerprint(tmp_path, "d1")

    assert same_bytes == first
    assert replaced != first


def test_folder_fingerprint_skips_hidden_files(tmp_path):
    folder = tmp_path / "best"
    atomic_write_bytes(folder / "config.json", b"{}")
    atomic_write_bytes(folder / "sub" / "model.safetensors", b"weights")
    first = folder_fingerprint(folder)

    (folder / ".model.safetensors.123.tmp").write_bytes(b"half written")
    with_temporary = folder_fingerprint(folder)
    atomic_write_bytes(folder / "sub" / "model.safetensors", b"other weights")
    changed = folder_fingerprint(folder)

    assert with_temporary == first
    assert changed != first
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_fingerprint(tmp_path / "missing")


def test_index_fingerprint_follows_pairs(tmp_path):
    folder = tmp_path / "index"
    write_split_index(folder, "train", [IndexedPair("a1", 0, "h1"), IndexedPair("a2", 0, "h2")])
    write_split_index(folder, "valid", [IndexedPair("a3", 0, "h3")])
    first = index_files_fingerprint(folder, ["train", "valid"])

    write_split_index(folder, "train", [IndexedPair("a1", 0, "h1"), IndexedPair("a2", 0, "h2")])
    rebuilt = index_files_fingerprint(folder, ["valid", "train"])
    write_split_index(folder, "train", [IndexedPair("a1", 0, "h1"), IndexedPair("a2", 0, "h9")])
    other_image = index_files_fingerprint(folder, ["train", "valid"])

    assert rebuilt == first
    assert other_image != first
    with pytest.raises(FileNotFoundError, match="test.pickle.sha256"):
        index_files_fingerprint(folder, ["train", "test"])


def test_evaluation_fingerprint_reads_metrics_and_ranks(tmp_path):
    atomic_write_bytes(tmp_path / "metrics.json", b'{"test": {"mrr@100": 0.5}}')
    atomic_write_bytes(tmp_path / "ranks.parquet", b"ranks")
    atomic_write_bytes(tmp_path / "rank_histogram.png", b"png")
    first = evaluation_fingerprint(tmp_path)

    atomic_write_bytes(tmp_path / "rank_histogram.png", b"png drawn again")
    redrawn = evaluation_fingerprint(tmp_path)
    atomic_write_bytes(tmp_path / "ranks.parquet", b"other ranks")
    new_ranks = evaluation_fingerprint(tmp_path)

    assert redrawn == first
    assert new_ranks != first


# --------------------------------------------------------------------------- feature stores


def _record(key: str, value: float) -> dict:
    return {"key": key, "features": np.full((3, 4), value, dtype="float32"), "count": 3}


def test_store_rows_fingerprint_follows_rewrites(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([_record("h1", 1.0), _record("h2", 2.0)])
    first = store_rows_fingerprint(store.folder, ["h2", "h1"])

    store.write([_record("h3", 3.0)])
    other_key_written = store_rows_fingerprint(store.folder, ["h1", "h2"])
    store.write([_record("h2", 2.5)])
    h2_rewritten = store_rows_fingerprint(store.folder, ["h1", "h2"])

    assert other_key_written == first
    assert h2_rewritten != first
    assert store_rows_fingerprint(store.folder, ["h1"]) == store_rows_fingerprint(store.folder, ["h1"])


def test_store_rows_fingerprint_counts_missing_keys(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([_record("h1", 1.0)])

    locations, shards = store_row_locations(store.folder, ["h1", "absent"])

    assert locations == {"h1": ("shard-000001.arrow", 0)}
    assert list(shards) == ["shard-000001.arrow"]
    assert store_rows_fingerprint(store.folder, ["h1", "absent"]) != store_rows_fingerprint(store.folder, ["h1"])
    assert store_rows_fingerprint(tmp_path / "no_store", ["h1"]) != store_rows_fingerprint(store.folder, ["h1"])


def test_store_rows_fingerprint_changes_after_compaction(tmp_path):
    # Merging shards moves every row, so the fingerprint changes although the features did not.
    store = FeatureStore(tmp_path / "store")
    store.write([_record("h1", 1.0)])
    store.write([_record("h2", 2.0)])
    before = store_rows_fingerprint(store.folder, ["h1", "h2"])

    store.compact()

    assert store_rows_fingerprint(store.folder, ["h1", "h2"]) != before
    assert np.array_equal(FeatureStore(store.folder).get("h2")["features"], np.full((3, 4), 2.0, dtype="float32"))


def test_feature_stage_fingerprint_reads_manifest_rows_and_identity(tmp_path):
    stage_root = tmp_path / "region_features"
    store = FeatureStore(stage_root / "store")
    store.write([_record("h1", 1.0), _record("h2", 2.0)])
    atomic_write_bytes(stage_root / "extractor.json", b'{"weights": "a"}')
    write_manifest(tmp_path, "region_features", "d1", {"done": ["h1"], "failed": [], "feature_dim": 4})

    def fingerprint():
        return feature_stage_fingerprint(tmp_path, "region_features", "d1", store.folder, identity_files=["extractor.json"])

    first = fingerprint()
    store.write([_record("h2", 2.5)])  # not listed as done for d1
    unlisted_rewrite = fingerprint()
    store.write([_record("h1", 1.5)])
    listed_rewrite = fingerprint()
    atomic_write_bytes(stage_root / "extractor.json", b'{"weights": "b"}')
    new_identity = fingerprint()
    write_manifest(tmp_path, "region_features", "d1", {"done": ["h1"], "failed": [{"image_hash": "h3", "reason": "x"}], "feature_dim": 4})
    new_failure = fingerprint()

    assert unlisted_rewrite == first
    assert listed_rewrite != first
    assert new_identity != listed_rewrite
    assert new_failure != new_identity


# --------------------------------------------------------------------------- MongoDB documents


def test_documents_fingerprint_ignores_key_order():
    when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    first = documents_fingerprint([{"_id": "a", "pub_date": when, "n": 1}, {"_id": "b"}])

    assert first == documents_fingerprint([{"n": 1, "pub_date": when, "_id": "a"}, {"_id": "b"}])
    assert first != documents_fingerprint([{"_id": "b"}, {"_id": "a", "pub_date": when, "n": 1}])
    assert first != documents_fingerprint([{"_id": "a", "pub_date": when, "n": 2}, {"_id": "b"}])


def test_collection_fingerprint_reads_matching_documents(mongo_client):
    collection = mongo_client.test.articles
    collection.insert_many([{"_id": f"a{i}", "batch": "b1", "title": f"title {i}"} for i in range(5)] + [{"_id": "x", "batch": "b2"}])
    first = collection_fingerprint(collection, {"batch": "b1"}, page_size=2)

    collection.insert_one({"_id": "y", "batch": "b2"})
    other_batch_changed = collection_fingerprint(collection, {"batch": "b1"}, page_size=2)
    collection.update_one({"_id": "a3"}, {"$set": {"title": "edited"}})
    edited = collection_fingerprint(collection, {"batch": "b1"}, page_size=2)

    assert other_batch_changed == first
    assert edited != first
    assert collection_fingerprint(collection, {"batch": "b1"}, page_size=500) == edited
