"""The whole graph on real news photos: ``python -m pipelines.real_data``.

The MediaEval NewsImages 2025 release has 1,000 real photos, each with an English title
and tags. ``--source`` names its folder, by default the shared data folder beside the
repository. This command fine-tunes and evaluates on the photos:

1. write a seeded subset of its CSV (or all of it) under ``<data_root>/sources/``, where
   the ``newsimages/raw_articles`` asset reads it as one batch;
2. generate the demo corpus and insert its NYTimes800k-schema articles into MongoDB, since
   the real NYTimes800k cannot be downloaded here; pre-training runs on them;
3. materialize the graph in three runs (``pipelines.demo.run_graph``) and print the
   evaluation metrics.

The photos are read from the release's ``images/`` folder; nothing is downloaded. With the
tiny profile, region features come from an untrained detector and faces from an untrained
FaceNet, so the numbers test the pipeline, not the method (see docs/results.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import random
import sys
import time
from pathlib import Path

from pipelines.demo import (
    configure_console,
    demo_run_config,
    graph_definitions,
    prepare_corpus,
    prepare_environment,
    print_metrics,
    run_graph,
)

logger = logging.getLogger("newslxmert.real_data")

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "newsimages-2025"
CSV_NAME = "newsarticles.csv"
IMAGES_FOLDER = "images"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune and evaluate on the real photos of MediaEval NewsImages 2025.")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"the release folder with {CSV_NAME} and {IMAGES_FOLDER}/ (default: {DEFAULT_SOURCE})")
    parser.add_argument("--data-root", default=os.environ.get("NEWSLXMERT_DATA_ROOT", "data-real"), help="output folder (default ./data-real)")
    parser.add_argument("--articles", type=int, default=0, help="seeded subset of the CSV's rows; 0 takes every row (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the demo corpus (default 0)")
    parser.add_argument("--demo-articles", type=int, default=240, help="demo NYTimes800k-schema articles to pre-train on (default 240)")
    parser.add_argument("--demo-days", type=int, default=6, help="publication days of the demo articles (default 6)")
    parser.add_argument("--pretrain-epochs", type=int, default=80, help="pre-training epochs on the demo articles (default 80)")
    parser.add_argument("--finetune-epochs", type=int, default=40, help="fine-tuning epochs on the NewsImages training split (default 40)")
    return parser.parse_args(argv)


def write_csv_subset(source_csv: Path, target_dir: Path, size: int, seed: int) -> Path:
    """Copy ``size`` seeded rows of a NewsImages 2025 CSV (all rows when ``size`` is 0) into ``target_dir``.

    The rows keep their order and the file keeps the release's UTF-8 byte order mark, so
    the copy reads exactly as the original does. Raises ValueError when ``size`` exceeds
    the rows available.
    """
    text = source_csv.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    if size < 0 or size > len(rows):
        raise ValueError(f"{source_csv} has {len(rows)} rows; asked for {size} (use 1..{len(rows)}, or 0 for all)")
    chosen = sorted(random.Random(seed).sample(range(len(rows)), size)) if size else range(len(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=reader.fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[i] for i in chosen)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source_csv.name
    target.write_bytes(("\ufeff" + buffer.getvalue()).encode("utf-8"))
    return target


def real_data_run_config(data_root: Path, source_dir: Path, images_dir: Path, pretrain_epochs: int, finetune_epochs: int) -> dict[str, dict]:
    """Config by asset key: the demo's for NYTimes800k, the release's photos and CSV for NewsImages."""
    config = demo_run_config(data_root, pretrain_epochs)
    config.update({
        "newsimages/images": {"source_dir": str(images_dir), "download": False},
        "newsimages/raw_articles": {"source_dir": str(source_dir)},
        # Fine-tuning keeps mode 7 (title and tags), the NewsImages default.
        "newsimages/finetuned_model": {"epochs": finetune_epochs},
    })
    return config


def check_source(source: Path) -> tuple[Path, Path]:
    """Return the release's CSV and photo folder; raise FileNotFoundError naming what is missing."""
    source_csv, images_dir = source / CSV_NAME, source / IMAGES_FOLDER
    for path in (source_csv, images_dir):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; pass --source with the NewsImages 2025 folder that contains {CSV_NAME} and {IMAGES_FOLDER}/")
    return source_csv, images_dir


def run_real_data(
    defs,
    instance,
    data_root: Path,
    source: Path,
    *,
    articles: int = 0,
    seed: int = 0,
    demo_articles: int = 240,
    demo_days: int = 6,
    pretrain_epochs: int = 80,
    finetune_epochs: int = 40,
) -> dict[str, dict]:
    """Run the whole graph with NewsImages 2025 as the NewsImages dataset; return each asset's metadata.

    ``defs`` must bind its resources to ``data_root`` (``pipelines.demo.graph_definitions``).
    """
    from model.newsimages import discover_batches

    source_csv, images_dir = check_source(source)
    batch_dir = data_root / "sources" / source.name
    write_csv_subset(source_csv, batch_dir, articles, seed)
    days = prepare_corpus(data_root, demo_articles, demo_days, seed)
    batch_keys = discover_batches(batch_dir)
    asset_config = real_data_run_config(data_root, batch_dir, images_dir, pretrain_epochs, finetune_epochs)
    return run_graph(defs, instance, days, batch_keys, asset_config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_console()
    try:
        check_source(args.source.resolve())
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data_root = Path(args.data_root).resolve()
    prepare_environment(data_root)

    from dagster import DagsterInstance

    started = time.perf_counter()
    reported = run_real_data(
        graph_definitions(data_root),
        DagsterInstance.get(),
        data_root,
        args.source.resolve(),
        articles=args.articles,
        seed=args.seed,
        demo_articles=args.demo_articles,
        demo_days=args.demo_days,
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs,
    )
    print_metrics(reported)
    print(f"\nfinished in {time.perf_counter() - started:.1f} s; outputs under {data_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
