"""Benchmark: fast exact N x N scoring against the naive full forward, in one run.

For each model size it scores one random pool three ways and prints the time of each and
the ratio naive / fast:

- naive: every layer for every pair (what a plain forward pass over all pairs costs),
- fast, padded: single-modality layers once per item, cross-modality layers per pair
  over the full padded length (the method alone),
- fast, trimmed: as above, and each pair batch drops the trailing positions that no pair
  in it attends to (the default of ``model.evaluation.ScoringSettings``).

It also prints the estimated multiply-accumulate (MAC) counts per pair and their ratio,
for the benchmarked sizes and for the base LXMERT size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scoring.py --pool 64

Inputs are random: texts padded to 100 tokens with real lengths drawn uniformly from
30-100, 36 regions of 2048-d features, 0-10 faces per image. Random weights take as long
as trained ones. The tiny size is the tiny profile's (``model.tiny``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.evaluation import fast_score_matrix, naive_score_matrix, pool_from_batch, ranks_from_scores  # noqa: E402
from model.modeling import NewsLxmertForPreTraining, news_lxmert_config  # noqa: E402
from model.tiny import TINY_LXMERT_SETTINGS  # noqa: E402

SEQ_LEN, REGIONS, FACES, FEAT_DIM, FACE_DIM = 100, 36, 10, 2048, 512

_SIZE_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "l_layers", "r_layers", "x_layers")
SIZES = {
    # name: hidden, heads, intermediate, language / relationship / cross layers
    "tiny": {key: TINY_LXMERT_SETTINGS[key] for key in _SIZE_KEYS},
    "mid": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, l_layers=4, r_layers=2, x_layers=2),
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, l_layers=9, r_layers=5, x_layers=5),
}


def self_attention_layer_macs(tokens: int, hidden: int, intermediate: int) -> int:
    """Count the MACs of one transformer layer: Q, K, V, O projections, attention, FFN."""
    return tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * tokens * tokens * hidden


def cross_layer_macs(text_len: int, visual_len: int, hidden: int, intermediate: int) -> int:
    """Count the MACs of one LXMERT cross-modality layer: cross-attention both ways, self-attention and FFN of both streams."""
    both = text_len + visual_len
    cross_attention = 4 * hidden * hidden * both + 4 * text_len * visual_len * hidden
    self_attention = 4 * hidden * hidden * both + 2 * (text_len**2 + visual_len**2) * hidden
    feed_forward = 2 * hidden * intermediate * both
    return cross_attention + self_attention + feed_forward


def macs_per_pair(size: dict, text_len: int = SEQ_LEN, pool: int | None = None) -> tuple[float, float]:
    """Estimate the MACs per pair of (naive, fast); fast adds the per-item encoders spread over ``pool`` pairs each."""
    hidden, intermediate = size["hidden_size"], size["intermediate_size"]
    visual_len = REGIONS + FACES
    text_encoder = size["l_layers"] * self_attention_layer_macs(text_len, hidden, intermediate)
    visual_encoder = (REGIONS * (FEAT_DIM + 4) + FACES * FACE_DIM) * hidden
    visual_encoder += size["r_layers"] * self_attention_layer_macs(visual_len, hidden, intermediate)
    cross = size["x_layers"] * cross_layer_macs(text_len, visual_len, hidden, intermediate) + hidden * hidden + 2 * hidden
    naive = text_encoder + visual_encoder + cross
    fast = cross + ((text_encoder + visual_encoder) / pool if pool else 0.0)
    return float(naive), float(fast)


def random_pool(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(30, SEQ_LEN + 1, (n,), generator=generator)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, 1000, (n, SEQ_LEN), generator=generator) * attention_mask
    face_counts = torch.randint(0, FACES + 1, (n,), generator=generator)
    face_mask = (torch.arange(FACES)[None, :] < face_counts[:, None]).long()
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "visual_feats": torch.rand(n, REGIONS, FEAT_DIM, generator=generator),
        "visual_pos": torch.rand(n, REGIONS, 4, generator=generator),
        "face_feats": torch.randn(n, FACES, FACE_DIM, generator=generator) * face_mask[..., None],
        "face_mask": face_mask,
    }
    return pool_from_batch("bench", [(str(k), 0) for k in range(n)], batch), lengths


def run_size(name: str, pool_size: int, pair_batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    # Weights with std 0.3 instead of 0.02 spread the scores, so that the rank comparison
    # below is not decided by near-ties. The time of a forward pass does not depend on it.
    config = news_lxmert_config(
        vocab_size=1000, visual_feat_dim=FEAT_DIM, use_faces=True, initializer_range=0.3, **SIZES[name]
    )
    model = NewsLxmertForPreTraining(config).eval()
    pool, lengths = random_pool(pool_size)
    args = (model, pool.texts, pool.visuals)
    methods = {
        "naive": lambda: naive_score_matrix(*args, pair_batch_size=pair_batch_size),
        "padded": lambda: fast_score_matrix(*args, pair_batch_size=pair_batch_size, trim_padding=False),
        "trimmed": lambda: fast_score_matrix(*args, pair_batch_size=pair_batch_size, trim_padding=True),
    }

    # Methods alternate within each repeat, and each keeps its fastest time, so that load
    # from other processes on a shared machine affects all three alike.
    seconds = {method: float("inf") for method in methods}
    scores = {}
    for _ in range(repeats):
        for method, score in methods.items():
            start = time.perf_counter()
            scores[method] = score()
            seconds[method] = min(seconds[method], time.perf_counter() - start)

    naive = scores["naive"]
    same_ranks = all(
        (ranks_from_scores(scores[method]) == ranks_from_scores(naive)).all()
        and (ranks_from_scores(scores[method].T) == ranks_from_scores(naive.T)).all()
        for method in ("padded", "trimmed")
    )
    naive_macs, fast_macs = macs_per_pair(SIZES[name], pool=pool_size)
    return {
        "size": name,
        "pool": pool_size,
        "naive_s": seconds["naive"],
        "padded_s": seconds["padded"],
        "trimmed_s": seconds["trimmed"],
        "max_abs_diff": max(float((scores[method] - naive).abs().max()) for method in ("padded", "trimmed")),
        "same_ranks": same_ranks,
        "mean_text_len": float(lengths.float().mean()),
        "mac_ratio": naive_macs / fast_macs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=64, help="pool size N; N x N pairs are scored by each method")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES), help="model sizes to run")
    parser.add_argument("--pair-batch-size", type=int, default=64, help="pairs per forward call, same for every method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"pool {args.pool} ({args.pool**2} pairs), pair batch {args.pair_batch_size}, best of {args.repeats}")
    print("| size | mean text tokens | naive s | fast padded s | fast trimmed s | naive/fast padded "
          "| naive/fast trimmed | MAC ratio (estimate) | max abs diff | same ranks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sizes:
        row = run_size(name, args.pool, args.pair_batch_size, args.repeats)
        print(
            f"| {name} | {row['mean_text_len']:.0f} | {row['naive_s']:.2f} | {row['padded_s']:.2f} | {row['trimmed_s']:.2f} "
            f"| {row['naive_s'] / row['padded_s']:.2f} | {row['naive_s'] / row['trimmed_s']:.2f} "
            f"| {row['mac_ratio']:.2f} | {row['max_abs_diff']:.1e} | {row['same_ranks']} |",
            flush=True,
        )

    print("\nEstimated MACs per pair at T = 100, V = 46 (no padding trimmed):")
    for name, size in SIZES.items():
        naive, limit = macs_per_pair(size)
        _, at_1000 = macs_per_pair(size, pool=1000)
        print(f"- {name}: naive {naive / 1e9:.3f} G, fast {limit / 1e9:.3f} G per pair as N grows "
              f"(ratio {naive / limit:.2f}); at N = 1000 ratio {naive / at_1000:.2f}")


if __name__ == "__main__":
    main()
