"""Retrieval metrics, ranks with ties, pool selection and the random baseline."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluation import (
    DEFAULT_RECALL_KS,
    random_baseline,
    ranks_from_scores,
    results_from_scores,
    retrieval_metrics,
    select_pool,
)


def test_ranks_hand_computed():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # true 0.9 is the highest: rank 0
            [0.8, 0.5, 0.7],  # true 0.5 below 0.8 and 0.7: rank 2
            [0.1, 0.6, 0.3],  # true 0.3 below 0.6 only: rank 1
        ]
    )
    assert ranks_from_scores(scores).tolist() == [0, 2, 1]


def test_ranks_ties_never_favour_true_item():
    scores = np.array(
        [
            [0.5, 0.5, 0.5, 0.1],  # two candidates tie with the true item: rank 2
            [0.2, 0.2, 0.9, 0.2],  # one higher, two tied: rank 3, the worst
            [0.3, 0.3, 0.3, 0.3],  # all equal: worst rank
            [0.1, 0.2, 0.3, 0.4],  # strictly highest: rank 0
        ]
    )
    assert ranks_from_scores(scores).tolist() == [2, 3, 3, 0]


def test_ranks_with_explicit_true_index():
    scores = np.array([[0.1, 0.9, 0.4], [0.7, 0.2, 0.7]])
    assert ranks_from_scores(scores, true_index=[1, 2]).tolist() == [0, 1]


def test_ranks_nan_counts_against_true_item():
    scores = np.array(
        [
            [0.9, np.nan, 0.1],  # a NaN candidate beats the true item
            [0.2, np.nan, 0.1],  # a NaN true score gets the worst rank
            [0.1, 0.2, 0.8],
        ]
    )
    assert ranks_from_scores(scores).tolist() == [1, 2, 0]


def test_ranks_reject_bad_shapes():
    with pytest.raises(ValueError, match="matrix"):
        ranks_from_scores(np.zeros(3))
    with pytest.raises(ValueError, match="true_index"):
        ranks_from_scores(np.zeros((2, 3)), true_index=[0, 3])


def test_metrics_hand_computed():
    ranks = [0, 1, 4, 9, 99, 100, 499]
    metrics = retrieval_metrics(ranks)
    expected_mrr = (1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 100 + 0 + 0) / 7
    assert metrics["mrr@100"] == pytest.approx(expected_mrr)
    assert metrics["r@1"] == pytest.approx(1 / 7)
    assert metrics["r@5"] == pytest.approx(3 / 7)
    assert metrics["r@10"] == pytest.approx(4 / 7)
    assert metrics["r@20"] == pytest.approx(4 / 7)
    assert metrics["r@50"] == pytest.approx(4 / 7)
    assert metrics["r@100"] == pytest.approx(5 / 7)
    assert metrics["median_rank"] == 10.0  # 1-based ranks 1 2 5 10 100 101 500
    assert metrics["mean_rank"] == pytest.approx((1 + 2 + 5 + 10 + 100 + 101 + 500) / 7)
    assert metrics["queries"] == 7


def test_metrics_even_count_median():
    assert retrieval_metrics([0, 1, 2, 5])["median_rank"] == 2.5


def test_metrics_reject_empty_and_negative():
    with pytest.raises(ValueError, match="non-empty"):
        retrieval_metrics([])
    with pytest.raises(ValueError, match=">= 0"):
        retrieval_metrics([0, -1])


def test_metrics_match_ranx():
    from ranx import Qrels, Run, evaluate

    rng = np.random.default_rng(7)
    n = 150  # more than 100, so some true items fall outside MRR@100
    scores = rng.normal(size=(n, n))
    scores[np.arange(n), np.arange(n)] += 1.5  # better than random, still spread over all ranks
    ranks = ranks_from_scores(scores)
    ours = retrieval_metrics(ranks)
    assert ranks.max() >= 100

    qrels = Qrels({f"q{q}": {f"d{q}": 1} for q in range(n)})
    run = Run({f"q{q}": {f"d{c}": float(scores[q, c]) for c in range(n)} for q in range(n)})
    names = ["mrr@100"] + [f"recall@{k}" for k in DEFAULT_RECALL_KS]
    theirs = evaluate(qrels, run, names)

    assert ours["mrr@100"] == pytest.approx(theirs["mrr@100"], abs=1e-9)
    for k in DEFAULT_RECALL_KS:
        assert ours[f"r@{k}"] == pytest.approx(theirs[f"recall@{k}"], abs=1e-9), k


def test_random_baseline_hand_computed():
    assert random_baseline(1)["mrr@100"] == 1.0
    assert random_baseline(2)["mrr@100"] == pytest.approx((1 + 1 / 2) / 2)
    harmonic_100 = sum(1 / r for r in range(1, 101))
    assert random_baseline(1000)["mrr@100"] == pytest.approx(harmonic_100 / 1000)
    assert random_baseline(1000)["r@10"] == pytest.approx(0.01)
    assert random_baseline(5)["r@10"] == 1.0
    assert random_baseline(1000)["mean_rank"] == 500.5


def test_random_baseline_matches_simulation():
    rng = np.random.default_rng(0)
    n, trials = 20, 400
    simulated = []
    for _ in range(trials):
        ranks = ranks_from_scores(rng.random((n, n)))
        simulated.append(retrieval_metrics(ranks, mrr_cutoff=10)["mrr@10"])
    expected = random_baseline(n, mrr_cutoff=10)["mrr@10"]
    # 8,000 queries: the standard error of the mean is below 0.004.
    assert np.mean(simulated) == pytest.approx(expected, abs=0.015)


def test_results_from_scores_both_directions():
    items = [("a", 0), ("b", 0), ("c", 0)]
    scores = np.array(
        [
            [0.9, 0.8, 0.1],
            [0.95, 0.5, 0.2],
            [0.1, 0.2, 0.3],
        ]
    )
    result = results_from_scores("test", items, scores)
    assert result.directions["image_to_text"].ranks.tolist() == [0, 1, 0]
    assert result.directions["text_to_image"].ranks.tolist() == [1, 1, 0]
    assert result.directions["image_to_text"].top_candidates.tolist() == [0, 0, 2]
    assert result.directions["text_to_image"].top_candidates.tolist() == [1, 0, 2]
    assert result.directions["text_to_image"].metrics["mrr@100"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_select_pool_first_items_distinct_articles():
    index = [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1), ("d", 0)]
    selection = select_pool(index, 3)
    assert selection.items == [("a", 0), ("b", 0), ("c", 0)]
    assert selection.skipped_same_article == 1
    assert selection.complete

    every_pair = select_pool(index, 3, distinct_articles=False)
    assert every_pair.items == [("a", 0), ("a", 1), ("b", 0)]


def test_select_pool_smaller_split_is_reported():
    selection = select_pool([("a", 0), ("b", 0)], 1000)
    assert selection.items == [("a", 0), ("b", 0)]
    assert not selection.complete
    assert selection.available == 2
    with pytest.raises(ValueError, match="at least 2"):
        select_pool([("a", 0)], 1)
