"""Benchmark: re-running a partition with no new articles against its first, full run.

One publication day of the demo corpus is loaded into the embedded MongoDB, then the
NYTimes800k article-level stages (``--stages``) are materialized for that day twice, one
asset per in-process Dagster run, in dependency order. The second run finds every
output in place. The script prints, per stage, the wall time of both runs, their ratio,
and the counters that show how much work each run did (files written, images fetched,
features extracted).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_incremental.py --articles 200

The wall time of the articles stage includes starting and stopping the embedded
SecantusDB server (about 2.5 s per run on a 2-core machine). A MongoDB server reached by
URI does not add that cost, so the export's own ``seconds`` counter is printed beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DAY = dt.date(2024, 1, 1)
STAGE_ORDER = ("articles", "images", "entities", "region_features", "face_features")
# Counters that show how much work a run did, by stage.
WORK_COUNTERS = {
    "articles": ("exported", "written", "unchanged", "seconds"),
    "images": ("images", "fetched", "skipped_existing", "seconds"),
    "entities": ("articles", "written", "unchanged", "seconds"),
    "region_features": ("images_done", "images_skipped", "seconds"),
    "face_features": ("images", "computed", "resumed", "seconds"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=200, help="demo articles published on the benchmark day (default 200)")
    parser.add_argument(
        "--stages", default=",".join(STAGE_ORDER), help=f"comma-separated stages to run, in order (default {','.join(STAGE_ORDER)})"
    )
    parser.add_argument("--data-root", type=Path, default=None, help="folder for outputs (default: a temporary folder)")
    return parser.parse_args(argv)


def load_day(data_root: Path, n_articles: int) -> None:
    from model.demo_corpus import generate_demo_corpus, insert_demo_documents, write_demo_files
    from pipelines.resources import MongoResource

    corpus = generate_demo_corpus(n_articles=n_articles, seed=0, start_date=DAY, n_days=1)
    write_demo_files(corpus, data_root / "demo")
    with MongoResource(data_root=str(data_root)).open_collection() as collection:
        insert_demo_documents(collection, corpus.documents)


def run_stage(stage: str, data_root: Path, instance) -> tuple[float, dict]:
    from dagster import AssetKey, materialize

    from pipelines.definitions import all_assets
    from pipelines.resources import MongoResource, PipelineSettings

    key = AssetKey(["nytimes800k", stage])
    assets_def = next(item for item in all_assets if key in getattr(item, "keys", ()))
    resources = {
        "settings": PipelineSettings(data_root=str(data_root), profile="tiny", device="cpu"),
        "nytimes_mongo": MongoResource(data_root=str(data_root)),
    }
    started = time.perf_counter()
    result = materialize([assets_def], resources=resources, partition_key=DAY.isoformat(), instance=instance)
    seconds = time.perf_counter() - started
    (materialization,) = result.asset_materializations_for_node(assets_def.op.name)
    return seconds, {name: value.value for name, value in materialization.metadata.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGE_ORDER))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(STAGE_ORDER)}")

    with tempfile.TemporaryDirectory(prefix="bench_incremental_") as scratch:
        data_root = (args.data_root or Path(scratch) / "data").resolve()
        os.environ["DAGSTER_HOME"] = str(Path(scratch) / "dagster_home")
        os.environ["NEWSLXMERT_IMAGE_SOURCE_DIR"] = str(data_root / "demo" / "images")
        Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
        load_day(data_root, args.articles)

        from dagster import DagsterInstance

        instance = DagsterInstance.ephemeral()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"settings: {args.articles} articles on {DAY}, tiny profile, CPU, one in-process run per stage\n")
        print(f"{'stage':<16} {'full run s':>10} {'re-run s':>9} {'ratio':>7}  work (full run -> re-run)")
        totals = [0.0, 0.0]
        for stage in stages:
            first_seconds, first = run_stage(stage, data_root, instance)
            second_seconds, second = run_stage(stage, data_root, instance)
            totals[0] += first_seconds
            totals[1] += second_seconds
            work = ", ".join(f"{name} {first.get(name, '-')} -> {second.get(name, '-')}" for name in WORK_COUNTERS[stage])
            print(f"{stage:<16} {first_seconds:>10.2f} {second_seconds:>9.2f} {second_seconds / first_seconds:>7.3f}  {work}")
        print(f"{'all':<16} {totals[0]:>10.2f} {totals[1]:>9.2f} {totals[1] / totals[0]:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
