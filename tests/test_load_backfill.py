"""A 50-day backfill of the article-level assets on the multiprocess executor.

100 demo articles published over 50 days are loaded into the embedded SecantusDB (through
``MongoResource``), and ``nytimes800k/articles``, ``nytimes800k/images`` and
``nytimes800k/entities`` are materialized for all 50 daily partitions. As a Dagster
backfill does with the pipeline's backfill policy (at most 31 partitions per run), the
days are split into two runs over partition ranges, and both runs execute at the same
time: their export steps take turns on the embedded server's file lock, and their image
steps write into the same folder. Every article, image and entities file must then be
accounted for exactly once.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import threading

import pyarrow.parquet as pq
from dagster import (
    DagsterInstance,
    Definitions,
    define_asset_job,
    execute_job,
    multiprocess_executor,
)
from dagster._core.definitions.reconstruct import ReconstructableJob

from assets.entities import nytimes800k_entities
from assets.images import nytimes800k_images
from assets.nytimes_articles import nytimes800k_articles
from assets.partitions import MAX_PARTITIONS_PER_RUN, nytimes_daily_partitions
from pipelines.executors import multiprocess_config
from pipelines.resources import MongoResource, PipelineSettings

DAYS = [(dt.date(2024, 1, 1) + dt.timedelta(days=offset)).isoformat() for offset in range(50)]
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
ASSETS = [nytimes800k_articles, nytimes800k_images, nytimes800k_entities]
JOB = "load_backfill_job"


def load_backfill_job():
    """The three article-level assets under the pipeline's multiprocess executor settings.

    Step processes rebuild this job from this file; the resources read the data root and
    profile from the environment that the test sets.
    """
    job = define_asset_job(
        JOB,
        selection=[assets_def.key for assets_def in ASSETS],
        partitions_def=nytimes_daily_partitions,
        executor_def=multiprocess_executor.configured(multiprocess_config()),
    )
    definitions = Definitions(
        assets=ASSETS,
        jobs=[job],
        resources={"settings": PipelineSettings(), "nytimes_mongo": MongoResource(database="nytimes", collection="articles")},
    )
    return definitions.resolve_job_def(JOB)


def run_ranges(days: list[str], per_run: int) -> list[tuple[str, str]]:
    return [(days[start], days[min(start + per_run, len(days)) - 1]) for start in range(0, len(days), per_run)]


def test_fifty_day_backfill_accounts_items(tmp_path, monkeypatch):
    from model.demo_corpus import (
        generate_demo_corpus,
        insert_demo_documents,
        write_demo_files,
    )
    from model.storage import canonical_json

    data_root = tmp_path / "data"
    monkeypatch.setenv("NEWSLXMERT_DATA_ROOT", str(data_root))
    monkeypatch.setenv("NEWSLXMERT_PROFILE", "tiny")
    monkeypatch.setenv("NEWSLXMERT_DEVICE", "cpu")
    corpus = generate_demo_corpus(n_articles=100, n_days=50, seed=8)
    write_demo_files(corpus, data_root / "demo")
    with MongoResource(data_root=str(data_root)).open_collection() as collection:
        assert insert_demo_documents(collection, corpus.documents) == 100
    documents = {str(document["_id"]): json.loads(canonical_json(document)) for document in corpus.documents}
    run_config = {
        "ops": {"nytimes800k__images": {"config": {"source_dir": str(data_root / "demo" / "images"), "download": False}}}
    }

    ranges = run_ranges(DAYS, MAX_PARTITIONS_PER_RUN)
    results: dict[tuple[str, str], object] = {}
    errors: list[BaseException] = []
    with DagsterInstance.get() as instance:

        def launch(first: str, last: str) -> None:
            try:
                results[(first, last)] = execute_job(
                    ReconstructableJob.for_file(__file__, "load_backfill_job"),
                    instance=instance,
                    run_config=run_config,
                    tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
                )
            except BaseException as error:  # reported by the main thread's asserts
                errors.append(error)

        threads = [threading.Thread(target=launch, args=run_range) for run_range in ranges]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=900)

        assert errors == []
        assert sorted(results) == ranges
        for run_range, result in results.items():
            assert result.success, f"run {run_range} failed: {[event.message for event in result.all_events if event.is_failure]}"
        for assets_def in ASSETS:
            assert instance.get_materialized_partitions(assets_def.key) == set(DAYS), assets_def.key.to_user_string()

    root = data_root / "nytimes800k"

    # Articles: each exactly once over all partitions, in the partition of its publication day.
    article_manifests = {path.stem: json.loads(path.read_text()) for path in (root / "articles" / "_manifests").glob("*.json")}
    assert sorted(article_manifests) == DAYS
    listed = collections.Counter(aid for manifest in article_manifests.values() for _, aid in manifest["articles"])
    assert listed == collections.Counter(list(documents))
    for day, manifest in article_manifests.items():
        for split, aid in manifest["articles"]:
            assert documents[aid]["pub_date"][:10] == day
            assert documents[aid]["split"] == split
            assert json.loads((root / "articles" / split / f"{aid}.json").read_text())["_id"] == aid

    # Images: each exactly once, none failed, each file equal to its source.
    image_manifests = {path.stem: json.loads(path.read_text()) for path in (root / "images" / "_manifests").glob("*.json")}
    assert sorted(image_manifests) == DAYS
    assert all(manifest["failed"] == [] for manifest in image_manifests.values())
    gathered = collections.Counter(image_hash for manifest in image_manifests.values() for image_hash in manifest["images"])
    assert gathered == collections.Counter(list(corpus.images))
    for image_hash, data in corpus.images.items():
        assert (root / "images" / f"{image_hash}.jpg").read_bytes() == data
    status_rows = collections.Counter()
    for day in DAYS:
        table = pq.read_table(root / "images" / "_status" / f"{day}.parquet").to_pylist()
        status_rows.update(row["image_hash"] for row in table)
        assert {row["status"] for row in table} <= {"ok", "skipped"}
    assert status_rows == collections.Counter(list(corpus.images))

    # Entities: one file per article, listed once.
    entity_manifests = {path.stem: json.loads(path.read_text()) for path in (root / "entities" / "_manifests").glob("*.json")}
    assert sorted(entity_manifests) == DAYS
    annotated = collections.Counter(aid for manifest in entity_manifests.values() for _, aid in manifest["articles"])
    assert annotated == collections.Counter(list(documents))
    assert sorted(path.stem for path in (root / "entities").glob("*.json")) == sorted(documents)

    # Nothing half-written anywhere.
    leftovers = [str(path) for path in root.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []
