"""Tests of token, region and face masking."""

from __future__ import annotations

import numpy as np
import pytest

from model.masking import mask_features, mask_tokens

MASK_ID = 4
REPLACEMENTS = np.arange(5, 100)


def test_token_masking_rates_and_labels():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=200_000)
    masked, labels = mask_tokens(ids, rng, mask_token_id=MASK_ID, replacement_ids=REPLACEMENTS, lm_ratio=0.15)
    chosen = labels != -100
    assert chosen.mean() == pytest.approx(0.15, abs=0.005)
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
    as_mask = (masked[chosen] == MASK_ID).mean()
    kept = (masked[chosen] == ids[chosen]).mean()
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / len(REPLACEMENTS), abs=0.01), "10% kept, plus random draws that hit the same id"


def test_entity_tokens_use_the_entity_ratio():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 100, size=100_000)
    entity = np.arange(len(ids)) % 2 == 0
    _, labels = mask_tokens(ids, rng, mask_token_id=MASK_ID, replacement_ids=REPLACEMENTS, entity_mask=entity, lm_ratio=0.15, entity_ratio=0.30)
    assert (labels[entity] != -100).mean() == pytest.approx(0.30, abs=0.01)
    assert (labels[~entity] != -100).mean() == pytest.approx(0.15, abs=0.01)


def test_special_tokens_never_masked():
    rng = np.random.default_rng(2)
    ids = np.array([2] + [50] * 20 + [3])
    special = np.zeros(len(ids), bool)
    special[[0, -1]] = True
    for _ in range(200):
        masked, labels = mask_tokens(ids, rng, mask_token_id=MASK_ID, replacement_ids=REPLACEMENTS, special_mask=special, lm_ratio=0.9)
        assert masked[0] == 2
        assert masked[-1] == 3
        assert labels[0] == -100
        assert labels[-1] == -100


def test_zero_ratio_masks_nothing():
    rng = np.random.default_rng(3)
    ids = np.arange(5, 40)
    masked, labels = mask_tokens(ids, rng, mask_token_id=MASK_ID, replacement_ids=REPLACEMENTS, lm_ratio=0.0)
    np.testing.assert_array_equal(masked, ids)
    assert (labels == -100).all()


def test_feature_masking_zeroes_replaces_and_keeps():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(100_000, 3)).astype(np.float32) + 10
    other = np.full(3, -7.0, np.float32)
    masked, chosen = mask_features(features, rng, ratio=0.15, replacement=lambda _: other)
    picked = chosen == 1
    assert picked.mean() == pytest.approx(0.15, abs=0.005)
    np.testing.assert_array_equal(masked[~picked], features[~picked])
    zeroed = (masked[picked] == 0).all(axis=1).mean()
    replaced = (masked[picked] == -7).all(axis=1).mean()
    assert zeroed == pytest.approx(0.8, abs=0.01)
    assert replaced == pytest.approx(0.1, abs=0.01)
    assert masked.dtype == np.float32


def test_feature_masking_respects_valid_rows():
    rng = np.random.default_rng(5)
    faces = np.ones((10, 4), np.float32)
    valid = np.array([True, True] + [False] * 8)
    for _ in range(100):
        masked, chosen = mask_features(faces, rng, ratio=1.0, valid=valid)
        assert chosen[2:].sum() == 0
        assert chosen[:2].sum() == 2
        np.testing.assert_array_equal(masked[2:], faces[2:])


def test_missing_replacement_keeps_the_row():
    rng = np.random.default_rng(6)
    features = np.ones((5000, 2), np.float32)
    masked, chosen = mask_features(features, rng, ratio=1.0, replacement=lambda _: None)
    kept = (masked == 1).all(axis=1)
    assert kept.mean() == pytest.approx(0.2, abs=0.02)
    assert chosen.all()


def test_same_seed_same_masks():
    ids = np.arange(5, 60)
    first = mask_tokens(ids, np.random.default_rng([7, 1, 3]), mask_token_id=MASK_ID, replacement_ids=REPLACEMENTS)
    second = mask_tokens(ids, np.random.default_rng([7, 1, 3]), mask_token_id=MASK_ID, replacement_ids=REPLACEMENTS)
    for one, other in zip(first, second):
        np.testing.assert_array_equal(one, other)
