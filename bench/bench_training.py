"""Benchmark: training samples per second reading the fast store against the original layout.

Both ways train the same model on the same pairs with the same batches; only the region
features' storage differs:

- fast store: the region stage's Arrow store (``model.feature_store``, memory-mapped) and
  the index's Parquet twin;
- original layout: one JSON file per image with base64 arrays, as the original NewsLXMERT
  scripts wrote them, and a pickle index (read without resolving classes).

It prints the data-loading rate alone (the DataLoader iterated without a model) and the
training rate (forward, backward and optimizer step), each with the ratio fast / original:

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_training.py --images 400 --feature-dim 2048

Data: demo-corpus articles (mode 4 texts) with random region features of ``--feature-dim``
dimensions; the model is the tiny profile's LXMERT unless ``--hidden`` sets another width.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dataset import ArticleStore, NewsPairDataset, PairDatasetConfig, collate_samples, open_region_reader  # noqa: E402
from model.demo_corpus import generate_demo_corpus  # noqa: E402
from model.detectors.base import RegionFeatures  # noqa: E402
from model.feature_store import FeatureStore  # noqa: E402
from model.index import IndexedPair, load_index, write_split_index  # noqa: E402
from model.modeling import NewsLxmertForPreTraining, news_lxmert_config  # noqa: E402
from model.region_json import write_region_json  # noqa: E402
from model.storage import canonical_json  # noqa: E402
from model.tiny import TINY_LXMERT_SETTINGS, train_wordpiece_tokenizer  # noqa: E402
from model.train import TrainConfig, train_model  # noqa: E402


def random_regions(rng: np.random.Generator, dim: int) -> RegionFeatures:
    boxes = np.sort(rng.random((36, 4), dtype=np.float32).reshape(36, 2, 2), axis=1).reshape(36, 4)
    return RegionFeatures(
        roi_features=rng.random((36, dim), dtype=np.float32),
        boxes=boxes * 500,
        normalized_boxes=boxes,
        obj_ids=rng.integers(0, 1600, 36),
        obj_probs=rng.random(36, dtype=np.float32),
        attr_ids=rng.integers(0, 400, 36),
        attr_probs=rng.random(36, dtype=np.float32),
        n_regions=36,
        image_width=500,
        image_height=500,
    )


def write_data(root: Path, images: int, dim: int) -> dict:
    """Articles, both feature layouts and both index formats for about ``images`` images."""
    corpus = generate_demo_corpus(n_articles=max(2, images // 2), seed=11)
    documents = [json.loads(canonical_json(document)) for document in corpus.documents]
    articles = root / "articles" / "train"
    articles.mkdir(parents=True)
    pairs = []
    for document in documents:
        (articles / f"{document['_id']}.json").write_text(canonical_json(document), encoding="utf-8")
        for iid, position in enumerate(document["image_positions"]):
            pairs.append(IndexedPair(document["_id"], iid, document["parsed_section"][position]["hash"]))
    pairs = pairs[:images]

    rng = np.random.default_rng(0)
    store = FeatureStore(root / "dataset" / "region_features" / "store")
    records = []
    for pair in pairs:
        regions = random_regions(rng, dim)
        records.append(regions.to_record(pair.image_hash))
        write_region_json(root / "original_json", pair.image_hash, regions)
    for start in range(0, len(records), 256):
        store.write(records[start : start + 256])
    write_split_index(root / "index", "train", pairs)
    (root / "original_train.pickle").write_bytes(pickle.dumps({i: (p.aid, p.iid) for i, p in enumerate(pairs)}))
    texts = [text for d in documents for text in (d["headline"]["main"], d["snippet"])]
    return {"articles": articles, "pairs": len(pairs), "texts": texts}


def make_dataset(root: Path, layout: str, tokenizer) -> NewsPairDataset:
    if layout == "fast store":
        pairs = load_index(root / "index" / "train.parquet")
        regions = open_region_reader(root / "dataset" / "region_features")
    else:
        pairs = load_index(root / "original_train.pickle", allow_foreign_pickle=True)
        regions = open_region_reader(root / "original_json")
    config = PairDatasetConfig(mode=4, max_seq_len=100)
    return NewsPairDataset(pairs, ArticleStore(root / "articles" / "train", cache_size=0), regions.get, tokenizer, config)


def loading_rate(dataset: NewsPairDataset, batch_size: int, workers: int, pad_id: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=lambda s: collate_samples(s, pad_id)
    )
    started = time.perf_counter()
    count = sum(batch["input_ids"].shape[0] for batch in loader)
    return count / (time.perf_counter() - started)


def training_rate(dataset, tokenizer, dim: int, hidden: int | None, batch_size: int, workers: int, output: Path) -> float:
    settings = dict(TINY_LXMERT_SETTINGS)
    if hidden:
        settings.update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=max(1, hidden // 64))
    torch.manual_seed(0)
    model = NewsLxmertForPreTraining(news_lxmert_config(vocab_size=len(tokenizer), visual_feat_dim=dim, **settings))
    config = TrainConfig(epochs=1, batch_size=batch_size, micro_batch_size=batch_size, num_workers=workers, log_every_steps=10**6)
    result = train_model(model, tokenizer, dataset, None, output, config)
    return result.samples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="pairs (one image each) to train on")
    parser.add_argument("--feature-dim", type=int, default=2048, help="region feature dimension D")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--hidden", type=int, default=None, help="model width; default: the tiny profile's")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per layout; the best rate counts")
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="bench_training_"))
    try:
        data = write_data(root, args.images, args.feature_dim)
        tokenizer = train_wordpiece_tokenizer(data["texts"])
        json_bytes = sum(path.stat().st_size for path in (root / "original_json").glob("*.json"))
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 torch thread")
        print(f"pairs {data['pairs']}, D {args.feature_dim}, batch {args.batch_size}, workers {args.workers}, JSON {json_bytes / 2**20:.0f} MiB")
        rates: dict[tuple[str, str], float] = {}
        for repeat in range(args.repeats):
            for layout in ("original layout", "fast store"):
                dataset = make_dataset(root, layout, tokenizer)
                load = loading_rate(dataset, args.batch_size, args.workers, tokenizer.pad_token_id)
                train = training_rate(dataset, tokenizer, args.feature_dim, args.hidden, args.batch_size, args.workers, root / f"run{repeat}{layout[0]}")
                rates[(layout, "load")] = max(rates.get((layout, "load"), 0.0), load)
                rates[(layout, "train")] = max(rates.get((layout, "train"), 0.0), train)
                print(f"  run {repeat + 1} {layout}: loading {load:.1f} samples/s, training {train:.1f} samples/s")
        print("| what | original layout (samples/s) | fast store (samples/s) | ratio |")
        print("|---|---|---|---|")
        for what, label in (("load", "data loading only"), ("train", "training")):
            original, fast = rates[("original layout", what)], rates[("fast store", what)]
            print(f"| {label} | {original:.1f} | {fast:.1f} | {fast / original:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
