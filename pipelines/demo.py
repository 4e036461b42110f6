"""The main job on the demo corpus: ``python -m pipelines.demo`` (``make demo``).

Steps:
1. generate the seeded demo corpus under ``<data_root>/demo`` (images, NYTimes-schema
   documents, German NewsImages-style TSVs, German-English reference pairs);
2. insert the documents into MongoDB (the embedded SecantusDB unless
   ``NEWSLXMERT_MONGO_URI`` is set);
3. materialize the asset graph with the tiny model profile, in three runs: the
   NYTimes800k daily partitions, the NewsImages batch partitions, then the
   unpartitioned split- and model-level assets;
4. print what each asset reported, and the evaluation metrics.

Runs are recorded in the Dagster instance at ``$DAGSTER_HOME`` (the Makefile sets
``.dagster_home``), so ``dagster dev`` shows them afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("newslxmert.demo")

DEMO_START = dt.date(2024, 1, 1)
# With 80 epochs the fine-tuned tiny model's test MRR@100 is 2.4 (image to text) and 2.2
# (text to image) times the random baseline, and the demo takes under 8 minutes on an idle
# 2-core CPU. Half as many epochs gave clearly lower scores in earlier measurements.
DEMO_EPOCHS = 80
# Dagster's console logger prints every step event at DEBUG; INFO keeps the asset logs.
CONSOLE_LOGGER = {"console": {"config": {"log_level": "INFO"}}}
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the NewsLXMERT pipeline on the demo corpus.")
    parser.add_argument("--data-root", default=os.environ.get("NEWSLXMERT_DATA_ROOT", "data"), help="output folder (default ./data)")
    parser.add_argument("--articles", type=int, default=240, help="demo articles to generate (default 240)")
    parser.add_argument("--days", type=int, default=6, help="publication days to spread them over (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=f"epochs of pre-training and of fine-tuning (default {DEMO_EPOCHS})")
    return parser.parse_args(argv)


def prepare_corpus(data_root: Path, n_articles: int, n_days: int, seed: int) -> list[str]:
    """Write the demo files, load the documents into MongoDB; return the publication days."""
    from model.demo_corpus import generate_demo_corpus, insert_demo_documents, write_demo_files
    from pipelines.resources import MongoResource

    corpus = generate_demo_corpus(n_articles=n_articles, seed=seed, start_date=DEMO_START, n_days=n_days)
    write_demo_files(corpus, data_root / "demo")
    mongo = MongoResource(data_root=str(data_root))
    with mongo.open_collection() as collection:
        inserted = insert_demo_documents(collection, corpus.documents)
    logger.info("demo corpus: %d articles, %d images, %d new in %s", len(corpus.documents), len(corpus.images), inserted, mongo.describe())
    return [(DEMO_START + dt.timedelta(days=day)).isoformat() for day in range(n_days)]


def group_assets(defs):
    """Split the asset keys by partitioning: NYTimes daily, NewsImages batches, none."""
    from dagster import DailyPartitionsDefinition, DynamicPartitionsDefinition

    daily, batches, unpartitioned = [], [], []
    for assets_def in defs.resolve_all_asset_specs():
        partitions = assets_def.partitions_def
        if partitions is None:
            unpartitioned.append(assets_def.key)
        elif isinstance(partitions, DailyPartitionsDefinition):
            daily.append(assets_def.key)
        elif isinstance(partitions, DynamicPartitionsDefinition):
            batches.append(assets_def.key)
        else:
            logger.warning("asset %s has partitions %r that the demo does not run", assets_def.key.to_user_string(), partitions)
    return daily, batches, unpartitioned


def demo_run_config(data_root: Path, epochs: int = DEMO_EPOCHS) -> dict[str, dict]:
    """Config of the assets that read demo source files, by asset key."""
    demo = data_root / "demo"
    local_images = {"source_dir": str(demo / "images"), "download": False}
    return {
        "nytimes800k/images": local_images,
        "newsimages/images": local_images,
        "newsimages/raw_articles": {"source_dir": str(demo / "newsimages")},
        # Mode 4 ("caption snippet headline."): in the demo, as in NYTimes800k, an article's
        # snippet describes only its first photo, so the other photos need their caption.
        "nytimes800k/pretrained_model": {"mode": 4, "epochs": epochs},
        "newsimages/finetuned_model": {"epochs": epochs},
    }


def run_assets(defs, instance, selection, tags, label: str, asset_config: dict[str, dict]) -> dict:
    """Materialize ``selection`` in one in-process run; print and return each asset's metadata by key."""
    if not selection:
        return {}
    job = defs.resolve_implicit_global_asset_job_def()
    ops = {
        "__".join(key.path): {"config": asset_config[key.to_user_string()]}
        for key in selection
        if key.to_user_string() in asset_config
    }
    started = time.perf_counter()
    result = job.execute_in_process(
        instance=instance, asset_selection=selection, tags=tags, run_config={"ops": ops, "loggers": CONSOLE_LOGGER}, raise_on_error=True
    )
    seconds = time.perf_counter() - started
    print(f"\n== {label}: {len(selection)} assets in {seconds:.1f} s")
    reported = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        key = materialization.asset_key.to_user_string()
        reported[key] = {name: value.value for name, value in materialization.metadata.items()}
    for key in sorted(reported):
        summary = {name: value for name, value in reported[key].items() if isinstance(value, (int, float, str)) and len(str(value)) < 60}
        print(f"  {key}: " + ", ".join(f"{name}={value}" for name, value in list(summary.items())[:8]))
    return reported


def graph_definitions(data_root: Path):
    """Return the code location's assets and checks, with resources bound to ``data_root``.

    ``pipelines.definitions`` builds its resources from the environment when it is first
    imported. Binding them here makes a run write under ``data_root`` even when that
    module was imported earlier with another data root, as happens in a test session.
    """
    from dagster import Definitions

    from pipelines.definitions import defs as location
    from pipelines.resources import MongoResource, PipelineSettings

    return Definitions(
        assets=location.assets,
        asset_checks=location.asset_checks,
        resources={
            "settings": PipelineSettings(data_root=str(data_root)),
            "nytimes_mongo": MongoResource(data_root=str(data_root), database="nytimes", collection="articles"),
            "newsimages_mongo": MongoResource(data_root=str(data_root), database="newsimages", collection="articles"),
        },
    )


def run_graph(defs, instance, days: list[str], batch_keys: list[str], asset_config: dict[str, dict]) -> dict[str, dict]:
    """Materialize the whole graph in three runs; return every asset's metadata by key.

    The runs are: the NYTimes800k days ``days``, the NewsImages batches ``batch_keys``
    (added to the instance's dynamic partitions), then the unpartitioned split- and
    model-level assets. Dagster cannot put differently partitioned assets in one run.
    """
    daily, batches, unpartitioned = group_assets(defs)
    reported = {}
    if days:
        reported.update(run_assets(
            defs, instance, daily, {RANGE_START_TAG: days[0], RANGE_END_TAG: days[-1]},
            f"NYTimes800k partitions {days[0]}..{days[-1]}", asset_config,
        ))
    if batches and batch_keys:
        instance.add_dynamic_partitions("newsimages_batches", batch_keys)
        reported.update(run_assets(
            defs, instance, batches, {RANGE_START_TAG: batch_keys[0], RANGE_END_TAG: batch_keys[-1]},
            f"NewsImages batches {batch_keys[0]}..{batch_keys[-1]}", asset_config,
        ))
    reported.update(run_assets(defs, instance, unpartitioned, {}, "split- and model-level assets", asset_config))
    return reported


def print_metrics(reported: dict[str, dict]) -> None:
    """Print the metrics table of every evaluation asset in ``reported``."""
    for key in sorted(reported):
        if key.endswith("evaluation") and "metrics" in reported[key]:
            print(f"\n{key}\n{reported[key]['metrics']}")


# Written only where DAGSTER_HOME has no dagster.yaml. Without the file Dagster warns on
# every start, and these commands run on machines without internet access, where the
# telemetry banner only adds noise.
INSTANCE_YAML = """\
# Written by the NewsLXMERT demo and real-data commands; edit freely.
# Set enabled to true to send Dagster its usage statistics.
telemetry:
  enabled: false
"""


def configure_console() -> None:
    """Log INFO to stderr, without the lines that libraries repeat on every run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # alembic logs each schema check of the Dagster instance's SQLite files at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # huggingface_hub reads this when first imported, and transformers follows it: no
    # progress bar for every tiny-model save and load.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def prepare_environment(data_root: Path) -> None:
    """Point the pipeline at ``data_root`` and the tiny profile, and create the Dagster home."""
    os.environ["NEWSLXMERT_DATA_ROOT"] = str(data_root)
    os.environ.setdefault("NEWSLXMERT_PROFILE", "tiny")
    os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve()))
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    instance_yaml = dagster_home / "dagster.yaml"
    if not instance_yaml.exists():
        instance_yaml.write_text(INSTANCE_YAML, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_console()
    data_root = Path(args.data_root).resolve()
    prepare_environment(data_root)

    from dagster import DagsterInstance

    started = time.perf_counter()
    days = prepare_corpus(data_root, args.articles, args.days, args.seed)

    from model.newsimages import discover_batches

    instance = DagsterInstance.get()
    batch_keys = discover_batches(data_root / "demo" / "newsimages")
    reported = run_graph(graph_definitions(data_root), instance, days, batch_keys, demo_run_config(data_root, args.epochs))
    print_metrics(reported)

    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s; outputs under {data_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
