"""Tests of the pair index: building from manifests, drop reasons, leakage, safe loading."""

from __future__ import annotations

import json
import pickle

import pytest

from model.demo_corpus import generate_demo_corpus
from model.documents import article_images
from model.index import (
    NO_FACE_FEATURES,
    NO_REGION_FEATURES,
    REGION_FEATURES_FAILED,
    UntrustedIndexError,
    build_index,
    index_path,
    load_index,
)
from model.manifest import write_manifest
from model.storage import canonical_json


def write_articles(dataset_root, documents, stage="articles"):
    items = []
    for document in documents:
        path = dataset_root / stage / document["split"] / f"{document['_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(document), encoding="utf-8")
        items.append([document["split"], document["_id"]])
    return items


@pytest.fixture
def nytimes(tmp_path):
    """12 demo articles in two article partitions; features for all images but three."""
    documents = [json.loads(canonical_json(document)) for document in generate_demo_corpus(n_articles=12, seed=3).documents]
    root = tmp_path / "nytimes800k"
    items = write_articles(root, documents)
    write_manifest(root, "articles", "2024-01-01", {"articles": items[:6]})
    write_manifest(root, "articles", "2024-01-02", {"articles": items[6:]})
    hashes = [(document["_id"], ref.iid, ref.image_hash) for document in documents for ref in article_images(document)]
    failed, missing, no_face = hashes[0], hashes[1], hashes[2]
    done = [h for _, _, h in hashes if h not in (failed[2], missing[2])]
    write_manifest(root, "region_features", "2024-01-01", {"done": done[:5], "failed": [{"image_hash": failed[2], "reason": "decode"}], "feature_dim": 32})
    write_manifest(root, "region_features", "2024-01-02", {"done": done[5:], "failed": [], "feature_dim": 32})
    write_manifest(root, "face_features", "all", {"done": [h for _, _, h in hashes if h != no_face[2]], "failed": []})
    return {"root": root, "documents": documents, "hashes": hashes, "failed": failed, "missing": missing, "no_face": no_face}


def test_index_keeps_pairs_with_features(nytimes):
    report = build_index(nytimes["root"], "nytimes800k", require_faces=True)
    total = len(nytimes["hashes"])
    assert report.kept == total - 3
    assert report.dropped[REGION_FEATURES_FAILED] == 1
    assert report.dropped[NO_REGION_FEATURES] == 1
    assert report.dropped[NO_FACE_FEATURES] == 1
    assert report.dropped_share == pytest.approx(3 / total)
    aid, iid, _ = nytimes["failed"]
    assert report.dropped_examples[REGION_FEATURES_FAILED] == [f"{aid}/{iid}"]

    expected = {split: sorted((aid, iid) for aid, iid, h in nytimes["hashes"] if h not in {nytimes[k][2] for k in ("failed", "missing", "no_face")} and next(d for d in nytimes["documents"] if d["_id"] == aid)["split"] == split) for split in ("train", "valid", "test")}
    for split in ("train", "valid", "test"):
        assert load_index(index_path(nytimes["root"], split)) == expected[split]
        assert report.per_split[split] == len(expected[split])


def test_index_without_faces_keeps_faceless_images(nytimes):
    report = build_index(nytimes["root"], "nytimes800k", require_faces=False)
    assert report.dropped[NO_FACE_FEATURES] == 0
    assert report.kept == len(nytimes["hashes"]) - 2


def test_index_pickle_is_the_original_format(nytimes):
    build_index(nytimes["root"], "nytimes800k")
    mapping = pickle.loads(index_path(nytimes["root"], "train").read_bytes())
    assert list(mapping) == list(range(len(mapping)))
    assert all(isinstance(aid, str) and isinstance(iid, int) for aid, iid in mapping.values())
    import pyarrow.parquet as pq

    table = pq.read_table(index_path(nytimes["root"], "train").with_suffix(".parquet"))
    assert table.column_names == ["i", "aid", "iid", "image_hash"]
    assert [tuple(row) for row in zip(table.column("aid").to_pylist(), table.column("iid").to_pylist())] == list(mapping.values())


def test_rebuild_is_byte_identical(nytimes):
    build_index(nytimes["root"], "nytimes800k")
    first = index_path(nytimes["root"], "train").read_bytes()
    build_index(nytimes["root"], "nytimes800k")
    assert index_path(nytimes["root"], "train").read_bytes() == first


def test_leakage_is_reported(nytimes):
    documents = nytimes["documents"]
    dropped = {nytimes[key][2] for key in ("failed", "missing", "no_face")}
    train = next(d for d in documents if d["split"] == "train" and article_images(d)[0].image_hash not in dropped)
    test = next(d for d in documents if d["split"] == "test")
    shared = article_images(train)[0].image_hash
    test["parsed_section"][test["image_positions"][0]]["hash"] = shared
    (nytimes["root"] / "articles" / "test" / f"{test['_id']}.json").write_text(canonical_json(test), encoding="utf-8")
    report = build_index(nytimes["root"], "nytimes800k", require_faces=False)
    assert report.leaked_hashes == {shared: ["test", "train"]}


def test_missing_article_manifests_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize nytimes800k/articles"):
        build_index(tmp_path / "nytimes800k", "nytimes800k")


def test_newsimages_reads_translated_articles(tmp_path):
    root = tmp_path / "newsimages"
    documents = [
        {"_id": f"a{i}", "split": "train" if i < 3 else "test", "title_en": f"Title {i}", "text_en": "Text", "image_hash": f"{i:064x}"}
        for i in range(4)
    ]
    items = write_articles(root, documents, stage="translated_articles")
    write_manifest(root, "translated_articles", "batch1", {"articles": items})
    write_manifest(root, "region_features", "batch1", {"done": [d["image_hash"] for d in documents], "failed": [], "feature_dim": 8})
    report = build_index(root, "newsimages", require_faces=False)
    assert report.per_split == {"train": 3, "valid": 0, "test": 1}
    assert load_index(index_path(root, "test")) == [("a3", 0)]


def test_foreign_pickle_is_not_unpickled(tmp_path):
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle.dumps({0: ("aid1", 0), 1: ("aid2", 1)}))
    with pytest.raises(UntrustedIndexError, match="trustIndex"):
        load_index(path)
    assert load_index(path, allow_foreign_pickle=True) == [("aid1", 0), ("aid2", 1)]


def test_foreign_pickle_with_code_rejected(tmp_path):
    import os

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({0: (os.getcwd, 0)}))
    with pytest.raises(ValueError, match="not a plain"):
        load_index(path, allow_foreign_pickle=True)


def test_tampered_pickle_loses_trust(nytimes):
    build_index(nytimes["root"], "nytimes800k")
    path = index_path(nytimes["root"], "train")
    mapping = pickle.loads(path.read_bytes())
    mapping[0] = ("someone-else", 0)
    path.write_bytes(pickle.dumps(mapping, protocol=4))
    with pytest.raises(UntrustedIndexError):
        load_index(path)
