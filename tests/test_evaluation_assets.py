"""Evaluation inputs from the pipeline's data path, and the evaluation assets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.dataset import PairDatasetConfig, record_from_document
from model.demo_corpus import generate_demo_corpus
from model.evaluation import build_pool
from model.storage import canonical_json

FEATURE_DIM = 16


class DemoLookups:
    """Demo-corpus articles with region features and faces that identify their image."""

    def __init__(self, n_articles: int = 16):
        corpus = generate_demo_corpus(n_articles=n_articles, seed=3)
        self.documents = {document["_id"]: document for document in map(json.loads, map(canonical_json, corpus.documents))}
        self.records = {aid: record_from_document(document) for aid, document in self.documents.items()}
        self.pairs = [(aid, iid) for aid, record in self.records.items() for iid in range(len(record.image_hashes))]
        self.regions, self.faces = {}, {}
        for position, (aid, iid) in enumerate(self.pairs):
            image_hash = self.records[aid].image_hashes[iid]
            features = np.full((36, FEATURE_DIM), float(position), dtype=np.float32)
            boxes = np.tile(np.array([0.1, 0.2, 0.5, 0.6], dtype=np.float32), (36, 1))
            self.regions[image_hash] = {"roi_features": features, "normalized_boxes": boxes}
            n_faces = position % 3
            embeddings = np.zeros((10, 512), dtype=np.float32)
            embeddings[:n_faces] = position
            self.faces[image_hash] = {"embeddings": embeddings, "mask": np.arange(10) < n_faces}

    def texts(self) -> list[str]:
        return [text for record in self.records.values() for text in (record.text.headline, record.text.snippet, *record.text.captions)]

    def position(self, pair: tuple[str, int]) -> int:
        return self.pairs.index(pair)


@pytest.fixture(scope="module")
def lookups() -> DemoLookups:
    return DemoLookups()


@pytest.fixture(scope="module")
def tokenizer(lookups):
    from model.tiny import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(lookups.texts(), vocab_size=300)


def _build(lookups, tokenizer, size, *, regions=None, distinct_articles=True, mode=7):
    return build_pool(
        "test",
        lookups.pairs,
        size,
        articles=lookups.records.__getitem__,
        regions=(lookups.regions if regions is None else regions).__getitem__,
        faces=lookups.faces.__getitem__,
        tokenizer=tokenizer,
        data_config=PairDatasetConfig(dataset="nytimes800k", mode=mode, use_faces=True, max_seq_len=40),
        distinct_articles=distinct_articles,
    )


def test_build_pool_rows_follow_index(lookups, tokenizer):
    pool = _build(lookups, tokenizer, 6)
    assert len(pool) == 6
    aids = [aid for aid, _ in pool.items]
    assert len(set(aids)) == 6, "one pair per article"
    assert pool.items[0] == lookups.pairs[0]
    assert pool.selection.skipped_same_article >= 1, "the demo corpus has articles with several images"

    for row, pair in enumerate(pool.items):
        position = lookups.position(pair)
        assert float(pool.visuals.visual_feats[row, 0, 0]) == position
        assert int(pool.visuals.face_mask[row].sum()) == position % 3
        record = lookups.records[pair[0]]
        length = int(pool.texts.attention_mask[row].sum())
        decoded = tokenizer.decode(pool.texts.input_ids[row, :length], skip_special_tokens=True)
        assert decoded.split()[:3] == record.text.snippet.lower().split()[:3]
    assert pool.texts.input_ids.dtype == torch.int64
    assert pool.texts.input_ids.shape[1] <= 40


def test_build_pool_every_image_when_articles_may_repeat(lookups, tokenizer):
    pool = _build(lookups, tokenizer, 5, distinct_articles=False, mode=1)
    assert pool.items == lookups.pairs[:5]
    assert pool.selection.skipped_same_article == 0


def test_build_pool_replaces_pairs_that_fail_to_load(lookups, tokenizer):
    missing_hash = lookups.records[lookups.pairs[0][0]].image_hashes[0]
    regions = {key: value for key, value in lookups.regions.items() if key != missing_hash}
    pool = _build(lookups, tokenizer, 4, regions=regions)
    assert len(pool) == 4
    assert lookups.pairs[0] not in pool.items
    assert len(pool.selection.failures) == 1
    aid, iid, reason = pool.selection.failures[0]
    assert (aid, iid) == lookups.pairs[0]
    assert missing_hash in reason


def test_build_pool_without_any_features_fails_fast(lookups, tokenizer, monkeypatch):
    import model.evaluation

    monkeypatch.setattr(model.evaluation, "MAX_FAILURES_BEFORE_FIRST_ITEM", 3)
    with pytest.raises(ValueError, match="first 3 pairs of the index all failed") as caught:
        _build(lookups, tokenizer, 5, regions={})
    assert lookups.records[lookups.pairs[0][0]].image_hashes[0] in str(caught.value)


def test_build_pool_smaller_split_is_reported(lookups, tokenizer):
    pool = _build(lookups, tokenizer, 1000)
    assert len(pool) == len(lookups.records)
    assert not pool.selection.complete
    assert pool.selection.summary()["requested"] == 1000


# ---------------------------------------------------------------------------- the assets


def _write_pipeline_folders(root, lookups: DemoLookups, tokenizer):
    """Write articles, index, region and face stores and a checkpoint as the pipeline lays them out."""
    from model.detectors.base import RegionFeatures
    from model.faces import FaceResult, face_store
    from model.feature_store import FeatureStore
    from model.index import IndexedPair, index_folder, write_split_index
    from model.modeling import NewsLxmertForPreTraining, news_lxmert_config

    dataset_root = root / "nytimes800k"
    aids = list(lookups.records)
    split_of = {aid: "test" for aid in aids[:7]}
    split_of.update({aid: "valid" for aid in aids[7:12]})
    split_of.update({aid: "train" for aid in aids[12:]})
    for aid, document in lookups.documents.items():
        document = {**document, "split": split_of[aid]}
        path = dataset_root / "articles" / split_of[aid] / f"{aid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(document), encoding="utf-8")

    for split in ("train", "valid", "test"):
        pairs = [
            IndexedPair(aid, iid, lookups.records[aid].image_hashes[iid]) for aid, iid in lookups.pairs if split_of[aid] == split
        ]
        write_split_index(index_folder(dataset_root), split, pairs)

    region_records, face_records = [], []
    for image_hash, regions in lookups.regions.items():
        features = RegionFeatures(
            roi_features=regions["roi_features"],
            boxes=regions["normalized_boxes"] * 100,
            normalized_boxes=regions["normalized_boxes"],
            obj_ids=np.zeros(36, np.int64),
            obj_probs=np.ones(36, np.float32),
            attr_ids=np.zeros(36, np.int64),
            attr_probs=np.ones(36, np.float32),
            n_regions=36,
            image_width=100,
            image_height=100,
        )
        region_records.append(features.to_record(image_hash))
        faces = lookups.faces[image_hash]
        n_faces = int(faces["mask"].sum())
        result = FaceResult(faces["embeddings"][:n_faces], np.ones(n_faces, np.float32), np.zeros((n_faces, 4), np.float32), n_faces, 100, 100)
        face_records.append(result.to_record(image_hash, 10, "test"))
    FeatureStore(dataset_root / "region_features" / "store").write(region_records)
    face_store(dataset_root / "face_features").write(face_records)

    checkpoint = dataset_root / "pretrained_model" / "best"
    torch.manual_seed(0)
    config = news_lxmert_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=1,
        r_layers=1,
        x_layers=1,
        visual_feat_dim=FEATURE_DIM,
        use_faces=True,
    )
    NewsLxmertForPreTraining(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory, lookups, tokenizer):
    root = tmp_path_factory.mktemp("data")
    checkpoint = _write_pipeline_folders(root, lookups, tokenizer)
    return root, checkpoint


def _materialize(root, run_config, instance):
    from dagster import materialize

    from assets.evaluation import nytimes800k_evaluation
    from pipelines.resources import PipelineSettings

    return materialize(
        [nytimes800k_evaluation],
        resources={"settings": PipelineSettings(data_root=str(root), profile="tiny", device="cpu")},
        run_config={"ops": {"nytimes800k__evaluation": {"config": run_config}}},
        instance=instance,
    )


def test_evaluation_asset_writes_metrics(pipeline_root):
    import pyarrow.parquet as pq
    from dagster import DagsterInstance

    root, checkpoint = pipeline_root
    run_config = {"checkpoint": str(checkpoint), "test_pool_size": 5, "valid_pool_size": 4, "pair_batch_size": 16}
    result = _materialize(root, run_config, DagsterInstance.ephemeral())
    assert result.success
    metadata = result.asset_materializations_for_node("nytimes800k__evaluation")[0].metadata

    table = metadata["metrics"].value
    assert "| test | 5 | image → text |" in table
    assert "| valid | 4 | text → image |" in table
    assert "| test | 5 | random ranking |" in table

    folder = root / "nytimes800k" / "evaluation"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metadata["test_i2t_mrr@100"].value == pytest.approx(metrics["test"]["image_to_text"]["mrr@100"], abs=1e-6)
    assert metadata["valid_t2i_mrr@100"].value == pytest.approx(metrics["valid"]["text_to_image"]["mrr@100"], abs=1e-6)
    assert metadata["test_random_mrr@100"].value == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5, abs=1e-6)
    assert metadata["test_pool_size"].value == 5

    ranks = pq.read_table(folder / "ranks.parquet").to_pandas()
    assert len(ranks) == 2 * 5 + 2 * 4
    assert set(ranks["split"]) == {"test", "valid"}
    assert ranks["rank"].between(0, 4).all()
    assert (folder / "rank_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert metadata["rank_histogram"].value.startswith("![rank histogram](data:image/png;base64,")
    assert metadata["settings"].value["faces"] is True
    assert metadata["settings"].value["mode"] == 7
    assert metadata["pools"].value["test"]["skipped_same_article"] >= 0


def test_evaluation_asset_finds_upstream_checkpoint(pipeline_root):
    from dagster import AssetKey, AssetMaterialization, DagsterInstance, MetadataValue

    root, checkpoint = pipeline_root
    instance = DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        AssetMaterialization(AssetKey(["nytimes800k", "pretrained_model"]), metadata={"checkpoint": MetadataValue.path(str(checkpoint))})
    )
    result = _materialize(root, {"test_pool_size": 3, "valid_pool_size": 0}, instance)
    assert result.success
    metadata = result.asset_materializations_for_node("nytimes800k__evaluation")[0].metadata
    assert metadata["checkpoint"].value == str(checkpoint)
    assert "valid" not in metadata["pools"].value


def test_evaluation_asset_without_checkpoint_names_fix(pipeline_root):
    from dagster import DagsterInstance

    root, _ = pipeline_root
    with pytest.raises(FileNotFoundError, match="nytimes800k/pretrained_model"):
        _materialize(root, {"test_pool_size": 3}, DagsterInstance.ephemeral())
