"""Fast exact scoring equals the naive full forward of NewsLxmertForPreTraining; the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from model.evaluation import (
    EvaluationPool,
    ScoringSettings,
    evaluate_checkpoint,
    evaluate_pool,
    fast_score_matrix,
    naive_score_matrix,
    pool_from_batch,
    ranks_from_scores,
)

REGIONS, FACES, FACE_DIM = 36, 10, 512


def tiny_config(**overrides):
    from model.modeling import news_lxmert_config

    settings = dict(
        vocab_size=120,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=2,
        r_layers=1,
        x_layers=2,
        visual_feat_dim=24,
        max_position_embeddings=64,
        use_faces=True,
    )
    settings.update(overrides)
    return news_lxmert_config(**settings)


def make_model(seed: int = 0, **overrides):
    """A tiny NewsLXMERT with random weights.

    The default initialisation (std 0.02) gives match probabilities that differ by ~1e-6
    between images; std 0.3 spreads them so that ranks in both directions are well defined.
    """
    from model.modeling import NewsLxmertForPreTraining

    torch.manual_seed(seed)
    return NewsLxmertForPreTraining(tiny_config(initializer_range=0.3, **overrides)).eval()


def smallest_gap(scores: torch.Tensor) -> float:
    """The smallest difference between two scores of one query, over both directions."""
    gaps = []
    for matrix in (scores, scores.T):
        ordered = torch.sort(matrix, dim=1).values
        gaps.append(float((ordered[:, 1:] - ordered[:, :-1]).min()))
    return min(gaps)


def make_inputs(n: int, seed: int = 1, seq_len: int = 20, with_faces: bool = True) -> dict:
    """Random model inputs for n items with varied text lengths and face counts."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 120, (n, seq_len), generator=generator)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.long)
    lengths = torch.randint(4, seq_len + 1, (n,), generator=generator)
    lengths[0] = seq_len  # one text without padding
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = input_ids * attention_mask
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "visual_feats": torch.rand(n, REGIONS, 24, generator=generator),
        "visual_pos": torch.rand(n, REGIONS, 4, generator=generator),
    }
    if with_faces:
        face_counts = torch.randint(0, FACES + 1, (n,), generator=generator)
        face_counts[0] = 0  # an image without faces
        face_mask = (torch.arange(FACES)[None, :] < face_counts[:, None]).long()
        batch["face_feats"] = torch.randn(n, FACES, FACE_DIM, generator=generator) * face_mask[..., None]
        batch["face_mask"] = face_mask
    return batch


def make_pool(n: int, split: str = "test", **kwargs) -> EvaluationPool:
    items = [(f"article{k:03d}", 0) for k in range(n)]
    return pool_from_batch(split, items, make_inputs(n, **kwargs))


def test_naive_scores_equal_model_forward():
    """The naive scores of the matched pairs are the forward pass's match probabilities."""
    model = make_model()
    batch = make_inputs(5)
    pool = pool_from_batch("test", [(str(k), 0) for k in range(5)], batch)
    naive = naive_score_matrix(model, pool.texts, pool.visuals, pair_batch_size=3)
    with torch.no_grad():
        output = model(**batch)
    expected = torch.softmax(output.match_logits, dim=-1)[:, 1]
    torch.testing.assert_close(torch.diagonal(naive), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("trim_padding", [True, False])
def test_fast_scores_equal_naive(trim_padding):
    model = make_model()
    pool = make_pool(9)
    naive = naive_score_matrix(model, pool.texts, pool.visuals, pair_batch_size=7)
    fast = fast_score_matrix(
        model, pool.texts, pool.visuals, pair_batch_size=10, encode_batch_size=4, trim_padding=trim_padding
    )
    assert naive.shape == (9, 9)
    assert smallest_gap(naive) > 1e-4, "scores must be spread for the rank comparison to mean something"
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)
    for matrix_naive, matrix_fast in ((naive, fast), (naive.T, fast.T)):
        assert ranks_from_scores(matrix_fast).tolist() == ranks_from_scores(matrix_naive).tolist()


def test_fast_scores_without_faces():
    model = make_model(use_faces=False)
    pool = make_pool(6, with_faces=False)
    naive = naive_score_matrix(model, pool.texts, pool.visuals, pair_batch_size=36)
    fast = fast_score_matrix(model, pool.texts, pool.visuals, pair_batch_size=4)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)


def test_scores_match_single_pair_forward():
    """Entry (i, j) is image i with text j, checked against one pair run alone."""
    model = make_model()
    batch = make_inputs(5)
    pool = pool_from_batch("test", [(str(k), 0) for k in range(5)], batch)
    fast = fast_score_matrix(model, pool.texts, pool.visuals, pair_batch_size=8)
    image, text = 3, 1
    with torch.no_grad():
        lang = model.encode_text(*(batch[key][text : text + 1] for key in ("input_ids", "attention_mask", "token_type_ids")))
        vis, vis_mask = model.encode_visual(
            *(batch[key][image : image + 1] for key in ("visual_feats", "visual_pos", "face_feats", "face_mask"))
        )
        _, _, pooled = model.cross_encode(lang, batch["attention_mask"][text : text + 1], vis, vis_mask)
        expected = torch.softmax(model.match_logits(pooled), dim=-1)[0, 1]
    assert float(fast[image, text]) == pytest.approx(float(expected), abs=1e-5)


def test_evaluate_pool_restores_training_mode():
    model = make_model().train()
    result = evaluate_pool(model, make_pool(4), ScoringSettings(pair_batch_size=5))
    assert model.training
    assert result.size == 4
    assert result.nan_scores == 0
    assert set(result.directions) == {"image_to_text", "text_to_image"}


def test_evaluate_checkpoint_writes_report(tmp_path):
    import pyarrow.parquet as pq

    model = make_model()
    pools = {"test": make_pool(6, "test"), "valid": make_pool(4, "valid", seed=5)}
    calls = []
    report = evaluate_checkpoint(
        model,
        pools,
        tmp_path / "evaluation",
        settings=ScoringSettings(pair_batch_size=8),
        progress=lambda split, done, total: calls.append((split, done, total)),
    )
    assert calls[0] == ("test", 0, 36)
    assert ("test", 36, 36) in calls
    assert calls[-1] == ("valid", 16, 16)

    assert "| test | 6 | image → text |" in report.table_markdown
    assert "| valid | 4 | random ranking |" in report.table_markdown
    assert (tmp_path / "evaluation" / "metrics.md").read_text() == report.table_markdown
    metrics = json.loads(report.metrics_path.read_text())
    assert set(metrics) == {"test", "valid"}
    assert metrics["test"]["image_to_text"]["queries"] == 6
    assert metrics["valid"]["random"]["mrr@100"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)

    table = pq.read_table(report.ranks_path).to_pandas()
    assert len(table) == 2 * 6 + 2 * 4
    test_i2t = table[(table.split == "test") & (table.direction == "image_to_text")].sort_values("query")
    assert test_i2t["rank"].tolist() == report.results["test"].directions["image_to_text"].ranks.tolist()
    assert test_i2t["aid"].tolist() == [aid for aid, _ in pools["test"].items]
    assert (table["top_score"] >= table["true_score"]).all()

    png = report.histogram_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


class _FailingModel(nn.Module):
    """Raises on use: proves that saved scores were reused instead of recomputed."""

    def encode_text(self, *args):
        raise AssertionError("the model was run although saved scores exist")

    encode_visual = cross_encode = match_logits = encode_text


def test_evaluate_checkpoint_reuses_saved_scores(tmp_path):
    model = make_model()
    pools = {"test": make_pool(5)}
    first = evaluate_checkpoint(model, pools, tmp_path, model_fingerprint="checkpoint-a")
    again = evaluate_checkpoint(_FailingModel(), pools, tmp_path, model_fingerprint="checkpoint-a")
    assert again.results["test"].reused_scores
    np.testing.assert_array_equal(again.results["test"].scores, first.results["test"].scores)

    with pytest.raises(AssertionError, match="saved scores exist"):
        evaluate_checkpoint(_FailingModel(), pools, tmp_path, model_fingerprint="checkpoint-b")
    with pytest.raises(AssertionError, match="saved scores exist"):
        evaluate_checkpoint(_FailingModel(), {"test": make_pool(4)}, tmp_path, model_fingerprint="checkpoint-a")


def test_pool_from_batch_rejects_mismatched_inputs():
    batch = make_inputs(3)
    with pytest.raises(ValueError, match="3 texts"):
        pool_from_batch("test", [("a", 0), ("b", 0)], batch)
    del batch["face_mask"]
    with pytest.raises(KeyError, match="face_mask"):
        pool_from_batch("test", [("a", 0), ("b", 0), ("c", 0)], batch)
    with pytest.raises(ValueError, match="'fast' or 'naive'"):
        ScoringSettings(method="quick")
