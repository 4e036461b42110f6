"""The code location: jobs, partitions, backfill policy, code versions, and the whole
graph for one partition through the real ``dagster asset materialize`` command."""

from __future__ import annotations

import datetime as dt

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AllPartitionMapping, AssetKey, AssetSelection, DagsterInstance

from assets.partitions import BACKFILL_POLICY, MAX_PARTITIONS_PER_RUN
from model.demo_corpus import generate_demo_corpus, insert_demo_documents, write_demo_files
from pipelines.definitions import all_assets, defs
from pipelines.jobs import DATASET_PARTITIONS, MODEL_STAGES_JOB, NYTIMES_ARTICLE_STAGES_JOB, article_stage_keys
from pipelines.resources import MongoResource

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
DAY = "2024-01-02"


def _specs():
    """Specs of the assets the code location defines (not the stubs of assets they name as deps)."""
    return [spec for assets_def in all_assets for spec in assets_def.specs]


def test_article_stages_job_holds_every_nytimes_partitioned_asset():
    job = defs.resolve_job_def(NYTIMES_ARTICLE_STAGES_JOB)
    expected = set(article_stage_keys(all_assets, "nytimes800k"))

    assert AssetKey(["nytimes800k", "articles"]) in expected
    assert set(job.asset_layer.executable_asset_keys) == expected
    assert job.partitions_def == DATASET_PARTITIONS["nytimes800k"]


def test_model_stages_job_holds_the_unpartitioned_assets():
    unpartitioned = {spec.key for spec in _specs() if spec.partitions_def is None}
    if not unpartitioned:
        pytest.skip("no split- or model-level asset in this checkout yet")

    job = defs.resolve_job_def(MODEL_STAGES_JOB)

    assert set(job.asset_layer.executable_asset_keys) == unpartitioned


def test_partitioned_assets_share_partitions_and_backfill_policy():
    wrong = []
    for assets_def in all_assets:
        for spec in assets_def.specs:
            if spec.partitions_def is None:
                continue
            if spec.partitions_def != DATASET_PARTITIONS[spec.key.path[0]]:
                wrong.append(f"{spec.key.to_user_string()}: partitions {spec.partitions_def}")
            if assets_def.backfill_policy != BACKFILL_POLICY:
                wrong.append(f"{spec.key.to_user_string()}: backfill policy {assets_def.backfill_policy}")

    assert wrong == []
    assert BACKFILL_POLICY.max_partitions_per_run == MAX_PARTITIONS_PER_RUN


def test_every_asset_has_a_code_version():
    missing = [spec.key.to_user_string() for spec in _specs() if not spec.code_version]

    assert missing == [], f"set code_version on these assets so the UI can show code changes: {missing}"


def test_split_level_assets_read_every_article_partition():
    asset_graph = defs.get_repository_def().asset_graph
    narrower = []
    for spec in _specs():
        if spec.partitions_def is not None:
            continue
        for parent in asset_graph.get(spec.key).parent_keys:
            if asset_graph.get(parent).partitions_def is None:
                continue
            mapping = asset_graph.get_partition_mapping(spec.key, parent)
            if not isinstance(mapping, AllPartitionMapping):
                narrower.append(f"{spec.key.to_user_string()} <- {parent.to_user_string()}: {mapping}")

    assert narrower == []


def _cli_env(data_root: Path, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("NEWSLXMERT_MONGO_URI", None)
    env.update(
        DAGSTER_HOME=str(home),
        NEWSLXMERT_DATA_ROOT=str(data_root),
        NEWSLXMERT_PROFILE="tiny",
        NEWSLXMERT_DEVICE="cpu",
        NEWSLXMERT_IMAGE_SOURCE_DIR=str(data_root / "demo" / "images"),
        NEWSLXMERT_NEWSIMAGES_SOURCE=str(data_root / "demo" / "newsimages"),
        # One process for all steps: on two cores a process per step costs more than the steps.
        NEWSLXMERT_EXECUTOR="in_process",
        OMP_NUM_THREADS="1",
    )
    return env


def _materialize(env: dict[str, str], selection: str, partition: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "pipelines.definitions", "--select", selection, "--partition", partition],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )


def _check_outcomes(home: Path, keys: set[AssetKey]) -> dict[str, bool]:
    """Latest evaluation of every asset check on ``keys``: check name -> passed."""
    from dagster._core.events import DagsterEventType
    from dagster._core.event_api import EventRecordsFilter

    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_event_records(EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION))
    outcomes = {}
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.asset_key in keys:
            outcomes[f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"] = evaluation.passed
    return outcomes


def _materialized_keys(home: Path) -> set[AssetKey]:
    with DagsterInstance.from_config(str(home)) as instance:
        return {key for key in instance.get_asset_keys() if instance.get_latest_materialization_event(key) is not None}


@pytest.mark.slow
def test_cli_materializes_nytimes_graph_for_one_partition(tmp_path):
    """Every NYTimes800k asset downstream of the article export, for one publication day.

    The split- and model-level assets (index, pre-training, evaluation) join the
    selection by themselves once they are defined, because they depend on the export.
    """
    data_root = tmp_path / "data"
    # All articles on one day, so that the day holds train, valid and test articles and
    # pre-training has a validation split.
    corpus = generate_demo_corpus(n_articles=40, seed=0, n_days=1, start_date=dt.date.fromisoformat(DAY))
    write_demo_files(corpus, data_root / "demo")
    with MongoResource(data_root=str(data_root)).open_collection() as collection:
        insert_demo_documents(collection, corpus.documents)
    env = _cli_env(data_root, tmp_path / "dagster_home")

    asset_graph = defs.get_repository_def().asset_graph
    downstream = AssetSelection.assets(AssetKey(["nytimes800k", "articles"])).downstream().resolve(asset_graph)
    # Fine-tuning on NewsImages also depends on the pre-trained model; it is not part of this graph.
    expected = {key for key in downstream if key.path[0] == "nytimes800k"}

    result = _materialize(env, ",".join(sorted(key.to_user_string() for key in expected)), DAY)

    assert result.returncode == 0, result.stderr[-4000:]
    assert AssetKey(["nytimes800k", "face_features"]) in expected
    assert _materialized_keys(tmp_path / "dagster_home") >= expected
    outcomes = _check_outcomes(tmp_path / "dagster_home", expected)
    assert outcomes, "no asset check ran"
    assert [name for name, passed in outcomes.items() if not passed] == []
    assert (data_root / "nytimes800k" / "articles" / "_manifests" / f"{DAY}.json").exists()


@pytest.mark.slow
def test_cli_materializes_newsimages_graph_for_one_batch(tmp_path):
    """Every NewsImages asset downstream of the source files, for one batch (one TSV file)."""
    if AssetKey(["newsimages", "raw_articles"]) not in {spec.key for spec in _specs()}:
        pytest.skip("newsimages/raw_articles is not defined in this checkout")
    data_root = tmp_path / "data"
    corpus = generate_demo_corpus(n_articles=12, seed=0, n_days=3)
    write_demo_files(corpus, data_root / "demo")
    env = _cli_env(data_root, tmp_path / "dagster_home")
    batch = "content2024-01-02"
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.add_dynamic_partitions("newsimages_batches", [batch])

    # Fine-tuning starts from the NYTimes800k checkpoint, which this test does not train.
    needs_pretraining = {AssetKey(["newsimages", "finetuned_model"]), AssetKey(["newsimages", "evaluation"])}
    expected = {spec.key for spec in _specs() if spec.key.path[0] == "newsimages"} - needs_pretraining

    result = _materialize(env, ",".join(sorted(key.to_user_string() for key in expected)), batch)

    assert result.returncode == 0, result.stderr[-4000:]
    assert _materialized_keys(tmp_path / "dagster_home") >= expected
    outcomes = _check_outcomes(tmp_path / "dagster_home", expected)
    assert [name for name, passed in outcomes.items() if not passed] == []
