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
        documents = [json.loads(canonical_json(document)) for document in corpus.documents]
        self.records = {document["_id"]: record_from_document(document) for document in documents}
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
        regions=(regions or lookups.regions).__getitem__,
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


def test_build_pool_smaller_split_is_reported(lookups, tokenizer):
    pool = _build(lookups, tokenizer, 1000)
    assert len(pool) == len(lookups.records)
    assert not pool.selection.complete
    assert pool.selection.summary()["requested"] == 1000
