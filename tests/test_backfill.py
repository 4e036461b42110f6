"""A backfill and the new-articles sensor through the daemon of a real ``dagster dev``.

The demo corpus's 6 publication days are backfilled in 3 runs (the fixture's server
allows 2 partitions per run). Then a 7th day of articles is added to MongoDB, the sensor
is started, and the daemon's tick must launch one run for exactly that day, which
processes the day through every article-level stage.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from model.demo_corpus import generate_demo_corpus, insert_demo_documents, write_demo_files
from pipelines.resources import MongoResource
from pipelines.sensors import NYTIMES_SENSOR

LOCATION = "newslxmert"
DEMO_DAYS = [f"2024-01-0{day}" for day in range(1, 7)]
NEW_DAY = "2024-01-07"
FINISHED_RUN_STATES = {"SUCCESS", "FAILURE", "CANCELED"}

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidStepError { invalidStepKey }
    ... on UnauthorizedError { message }
  }
}
"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status error { message } }
    ... on PythonError { message }
  }
}
"""
RUNS_WITH_TAG = """
query($key: String!, $value: String!) {
  runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
    ... on Runs { results { runId status jobName tags { key value } } }
  }
}
"""
START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { name sensorState { status } }
    ... on PythonError { message }
  }
}
"""
RESET_SENSOR = """
mutation($selector: SensorSelector!) {
  resetSensor(sensorSelector: $selector) { __typename }
}
"""


def _runs_with_tag(server, key: str, value: str) -> list[dict]:
    data = server.graphql(RUNS_WITH_TAG, {"key": key, "value": value})
    return data["runsOrError"]["results"]


def _tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["tags"]}


def _wait_for(condition, timeout: float, what: str, server):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2.0)
    raise TimeoutError(f"{what} did not happen within {timeout} s; dagster dev log:\n{server.log_tail()}")


@pytest.mark.slow
def test_backfill_then_sensor_processes_only_the_new_day(dagster_dev):
    mongo = MongoResource(data_root=str(dagster_dev.data_root))
    history = generate_demo_corpus(n_articles=30, seed=0, n_days=6)
    write_demo_files(history, dagster_dev.data_root / "demo")
    with mongo.open_collection() as collection:
        insert_demo_documents(collection, history.documents)
    dagster_dev.wait_until_serving({("nytimes800k", "articles")})

    launched = dagster_dev.graphql(
        LAUNCH_BACKFILL,
        {"params": {"partitionNames": DEMO_DAYS, "assetSelection": [{"path": ["nytimes800k", "articles"]}], "fromFailure": False}},
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def backfill_done():
        status = dagster_dev.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        return status if status.get("status") not in ("REQUESTED", "CANCELING", None) else None

    final = _wait_for(backfill_done, 400, f"backfill {backfill_id} finishing", dagster_dev)
    runs = _runs_with_tag(dagster_dev, "dagster/backfill", backfill_id)
    ranges = sorted((_tags(run).get("dagster/asset_partition_range_start"), _tags(run).get("dagster/asset_partition_range_end")) for run in runs)

    assert final["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), final
    assert [run["status"] for run in runs] == ["SUCCESS"] * 3
    assert ranges == [("2024-01-01", "2024-01-02"), ("2024-01-03", "2024-01-04"), ("2024-01-05", "2024-01-06")]
    manifests = dagster_dev.data_root / "nytimes800k" / "articles" / "_manifests"
    assert sorted(path.stem for path in manifests.glob("*.json")) == DEMO_DAYS

    new_day = generate_demo_corpus(n_articles=8, seed=7, start_date=dt.date(2024, 1, 7), n_days=1)
    write_demo_files(new_day, dagster_dev.data_root / "demo")
    with mongo.open_collection() as collection:
        insert_demo_documents(collection, new_day.documents)
    selector = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__", "sensorName": NYTIMES_SENSOR}
    started = dagster_dev.graphql(START_SENSOR, {"selector": selector})["startSensor"]
    assert started["__typename"] == "Sensor", started

    try:
        sensor_runs = _wait_for(
            lambda: [run for run in _runs_with_tag(dagster_dev, "newslxmert/trigger", NYTIMES_SENSOR) if run["status"] in FINISHED_RUN_STATES],
            480,
            "the sensor's run finishing",
            dagster_dev,
        )
    finally:
        # Back to the default status, stopped, so that no later tick starts runs.
        dagster_dev.graphql(RESET_SENSOR, {"selector": selector})

    (run,) = _runs_with_tag(dagster_dev, "newslxmert/trigger", NYTIMES_SENSOR)
    assert run["runId"] == sensor_runs[0]["runId"]
    assert run["jobName"] == "nytimes800k_article_stages_job"
    assert _tags(run).get("dagster/partition") == NEW_DAY
    assert run["status"] == "SUCCESS", f"sensor run {run['runId']} ended {run['status']}; log:\n{dagster_dev.log_tail()}"
    new_manifest = json.loads((manifests / f"{NEW_DAY}.json").read_text())
    assert len(new_manifest["articles"]) == len(new_day.documents)
    for stage in ("images", "entities", "region_features", "face_features"):
        stage_manifests = sorted(path.stem for path in (dagster_dev.data_root / "nytimes800k" / stage / "_manifests").glob("*.json"))
        assert stage_manifests == [NEW_DAY], f"{stage} processed {stage_manifests}"
