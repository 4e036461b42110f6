"""Sensors for new NYTimes800k articles and new NewsImages batches, against real servers and files."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from bson import ObjectId
from dagster import AssetMaterialization, DagsterInstance, SkipReason, build_sensor_context

from model.demo_corpus import generate_demo_corpus, insert_demo_documents, write_demo_files
from pipelines.definitions import defs
from pipelines.resources import MongoResource
from pipelines.sensors import (
    NEWSIMAGES_SENSOR,
    NYTIMES_ARTICLES_KEY,
    NYTIMES_SENSOR,
    RANGE_END_TAG,
    RANGE_START_TAG,
    ArticleCursor,
    consecutive_runs,
    newsimages_new_batch_requests,
    nytimes_new_article_requests,
    scan_for_new_articles,
)

DEMO_DAYS = [f"2024-01-0{day}" for day in range(1, 7)]


def _demo_documents(n_articles: int, seed: int, start: dt.date, n_days: int) -> list[dict]:
    return generate_demo_corpus(n_articles=n_articles, seed=seed, start_date=start, n_days=n_days).documents


def _with_fresh_object_ids(documents: list[dict]) -> list[dict]:
    """The documents with ObjectIds made now, as a driver makes them at insert time."""
    return [dict(document, _id=ObjectId()) for document in documents]


@pytest.fixture
def served_resource(mongo_server, monkeypatch, tmp_path):
    """The resource pointed at one running SecantusDB server by URI, as in production.

    Each open of the embedded default starts and stops a server (about 2 s each), so
    only one test below goes through it.
    """
    monkeypatch.setenv("NEWSLXMERT_MONGO_URI", mongo_server.uri)
    return MongoResource(data_root=str(tmp_path))


def _tick(resource: MongoResource, instance: DagsterInstance, cursor: str | None):
    context = build_sensor_context(cursor=cursor, instance=instance)
    return nytimes_new_article_requests(context, resource)


def test_scan_finds_new_object_ids_without_recount(mongo_client):
    collection = mongo_client["nytimes"]["articles"]
    collection.insert_many(_with_fresh_object_ids(_demo_documents(30, 0, dt.date(2024, 1, 1), 3)))

    first = scan_for_new_articles(collection, None)
    collection.insert_many(_with_fresh_object_ids(_demo_documents(10, 1, dt.date(2024, 1, 9), 1)))
    second = scan_for_new_articles(collection, first.cursor)
    third = scan_for_new_articles(collection, second.cursor)

    assert first.method == "recount"
    assert first.changed_days == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert second.method == "new _ids"
    assert second.changed_days == ["2024-01-09"]
    assert second.new_documents == 10
    assert second.cursor.days["2024-01-09"] == 10
    assert second.cursor.total == 40
    assert third.changed_days == []
    assert third.new_documents == 0


def test_scan_recounts_when_ids_do_not_grow(mongo_client):
    collection = mongo_client["nytimes"]["articles"]
    collection.insert_many(_with_fresh_object_ids(_demo_documents(30, 0, dt.date(2024, 1, 1), 3)))
    first = scan_for_new_articles(collection, None)

    # String ids kept from an archive: a range query on the ObjectId mark cannot see them.
    late = [dict(document, _id=f"archive-{index}") for index, document in enumerate(_demo_documents(4, 2, dt.date(2024, 1, 2), 1))]
    collection.insert_many(late)
    second = scan_for_new_articles(collection, first.cursor)

    assert second.method == "recount"
    assert second.changed_days == ["2024-01-02"]
    assert second.cursor.days["2024-01-02"] == first.cursor.days["2024-01-02"] + 4


def test_scan_counts_documents_without_date(mongo_client):
    collection = mongo_client["nytimes"]["articles"]
    collection.insert_many([{"_id": ObjectId(), "pub_date": "2024-01-01"}, {"_id": ObjectId()}])

    scan = scan_for_new_articles(collection, None)

    assert scan.changed_days == []
    assert scan.cursor.undated == 2


def test_sensor_requests_exactly_the_new_day(tmp_path):
    # The embedded default: the sensor and the inserts each start the server on its files.
    resource = MongoResource(data_root=str(tmp_path))
    instance = DagsterInstance.ephemeral()
    with resource.open_collection() as collection:
        insert_demo_documents(collection, _demo_documents(240, 0, dt.date(2024, 1, 1), 6))

    first = _tick(resource, instance, None)
    assert [request.tags.get(RANGE_START_TAG) for request in first.run_requests] == ["2024-01-01"]
    assert [request.tags.get(RANGE_END_TAG) for request in first.run_requests] == ["2024-01-06"]

    with resource.open_collection() as collection:
        insert_demo_documents(collection, _demo_documents(40, 7, dt.date(2024, 1, 7), 1))
    second = _tick(resource, instance, first.cursor)
    third = _tick(resource, instance, second.cursor)

    assert [request.partition_key for request in second.run_requests] == ["2024-01-07"]
    assert RANGE_START_TAG not in second.run_requests[0].tags
    assert json.loads(second.cursor)["days"]["2024-01-07"] == 40
    assert third.run_requests == []
    assert "no new articles" in third.skip_reason.skip_message


def test_sensor_requests_a_day_that_gained_articles(served_resource):
    resource = served_resource
    instance = DagsterInstance.ephemeral()
    with resource.open_collection() as collection:
        insert_demo_documents(collection, _with_fresh_object_ids(_demo_documents(60, 0, dt.date(2024, 1, 1), 3)))
    first = _tick(resource, instance, None)

    with resource.open_collection() as collection:
        insert_demo_documents(collection, _with_fresh_object_ids(_demo_documents(3, 5, dt.date(2024, 1, 2), 1)))
    second = _tick(resource, instance, first.cursor)

    assert [request.partition_key for request in second.run_requests] == ["2024-01-02"]
    assert ArticleCursor.from_json(second.cursor).days == {"2024-01-01": 20, "2024-01-02": 23, "2024-01-03": 20}


def test_first_tick_skips_materialized_days(served_resource):
    resource = served_resource
    instance = DagsterInstance.ephemeral()
    with resource.open_collection() as collection:
        insert_demo_documents(collection, _demo_documents(60, 0, dt.date(2024, 1, 1), 3))
    instance.report_runless_asset_event(AssetMaterialization(NYTIMES_ARTICLES_KEY, partition="2024-01-01"))

    first = _tick(resource, instance, None)

    assert [(request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) for request in first.run_requests] == [
        ("2024-01-02", "2024-01-03")
    ]


def test_today_waits_for_its_partition(served_resource):
    resource = served_resource
    instance = DagsterInstance.ephemeral()
    now = dt.datetime.now(dt.timezone.utc)
    with resource.open_collection() as collection:
        collection.insert_one({"_id": ObjectId(), "split": "train", "pub_date": now})

    first = _tick(resource, instance, None)
    second = _tick(resource, instance, first.cursor)

    assert first.run_requests == []
    assert ArticleCursor.from_json(first.cursor).pending == [now.date().isoformat()]
    assert second.run_requests == []
    assert ArticleCursor.from_json(second.cursor).pending == [now.date().isoformat()]


def test_sensor_is_in_definitions_with_its_job():
    sensor = defs.resolve_sensor_def(NYTIMES_SENSOR)

    assert sensor.job_name == "nytimes800k_article_stages_job"
    assert sensor.required_resource_keys == {"nytimes_mongo"}


def test_sensor_definition_ticks_through_dagster(served_resource):
    resource = served_resource
    with resource.open_collection() as collection:
        insert_demo_documents(collection, _demo_documents(20, 0, dt.date(2024, 1, 3), 1))
    sensor = defs.resolve_sensor_def(NYTIMES_SENSOR)
    context = build_sensor_context(instance=DagsterInstance.ephemeral(), resources={"nytimes_mongo": resource}, definitions=defs)

    data = sensor.evaluate_tick(context)

    assert [request.partition_key for request in data.run_requests] == ["2024-01-03"]
    assert data.cursor is not None


def test_consecutive_runs_split_at_gaps_and_size():
    keys = [f"2024-01-{day:02d}" for day in range(1, 32)]

    runs = consecutive_runs(["2024-01-05", "2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-09"], keys, 3)

    assert runs == [["2024-01-01", "2024-01-02", "2024-01-03"], ["2024-01-04", "2024-01-05"], ["2024-01-09"]]


def test_cursor_rejects_garbage():
    with pytest.raises(ValueError, match="reset the sensor's cursor"):
        ArticleCursor.from_json('{"total": "many"}')


def test_newsimages_sensor_registers_new_batches(tmp_path):
    corpus = generate_demo_corpus(n_articles=12, seed=0, n_days=3)
    source_dir = write_demo_files(corpus, tmp_path / "demo")["newsimages"]
    instance = DagsterInstance.ephemeral()

    first = newsimages_new_batch_requests(build_sensor_context(instance=instance), source_dir)
    (request,) = first.dynamic_partitions_requests
    instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    second = newsimages_new_batch_requests(build_sensor_context(instance=instance), source_dir)
    newer = generate_demo_corpus(n_articles=4, seed=1, start_date=dt.date(2024, 2, 1), n_days=1)
    write_demo_files(newer, tmp_path / "demo")
    third = newsimages_new_batch_requests(build_sensor_context(instance=instance), source_dir)

    assert request.partitions_def_name == "newsimages_batches"
    assert sorted(request.partition_keys) == ["content2024-01-01", "content2024-01-02", "content2024-01-03"]
    assert sorted(run.partition_key for run in first.run_requests) == sorted(request.partition_keys)
    assert isinstance(second, SkipReason)
    assert [run.partition_key for run in third.run_requests] == ["content2024-02-01"]
    assert list(third.dynamic_partitions_requests[0].partition_keys) == ["content2024-02-01"]


def test_newsimages_sensor_skips_missing_folder(tmp_path):
    result = newsimages_new_batch_requests(build_sensor_context(instance=DagsterInstance.ephemeral()), tmp_path / "absent")

    assert isinstance(result, SkipReason)
    assert "does not exist" in result.skip_message


def test_newsimages_sensor_reads_the_raw_articles_folder_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWSLXMERT_NEWSIMAGES_SOURCE", str(tmp_path / "sources"))
    sensor = defs.resolve_sensor_def(NEWSIMAGES_SENSOR)
    context = build_sensor_context(instance=DagsterInstance.ephemeral())

    data = sensor.evaluate_tick(context)

    assert data.run_requests == []
    assert str(tmp_path / "sources") in data.skip_message


def test_newsimages_sensor_skips_without_folder_setting(monkeypatch):
    monkeypatch.delenv("NEWSLXMERT_NEWSIMAGES_SOURCE", raising=False)

    result = newsimages_new_batch_requests(build_sensor_context(instance=DagsterInstance.ephemeral()), None)

    assert "NEWSLXMERT_NEWSIMAGES_SOURCE is not set" in result.skip_message
