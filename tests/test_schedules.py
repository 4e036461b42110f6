"""The daily NYTimes800k schedule requests the newest complete publication day."""

from __future__ import annotations

import datetime as dt

from dagster import DagsterInstance, build_schedule_context

from pipelines.definitions import defs
from pipelines.jobs import NYTIMES_ARTICLE_STAGES_JOB
from pipelines.schedules import NYTIMES_DAILY_SCHEDULE


def _schedule():
    return defs.get_repository_def().get_schedule_def(NYTIMES_DAILY_SCHEDULE)


def test_schedule_runs_daily_at_two_utc():
    schedule = _schedule()

    assert schedule.job_name == NYTIMES_ARTICLE_STAGES_JOB
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone in (None, "UTC")


def test_tick_requests_the_day_that_ended():
    tick_time = dt.datetime(2024, 1, 8, 2, 0, tzinfo=dt.timezone.utc)
    context = build_schedule_context(instance=DagsterInstance.ephemeral(), scheduled_execution_time=tick_time)

    data = _schedule().evaluate_tick(context)

    assert [request.partition_key for request in data.run_requests] == ["2024-01-07"]


def test_tick_just_after_midnight_still_takes_the_previous_day():
    tick_time = dt.datetime(2024, 3, 1, 2, 0, tzinfo=dt.timezone.utc)
    context = build_schedule_context(instance=DagsterInstance.ephemeral(), scheduled_execution_time=tick_time)

    data = _schedule().evaluate_tick(context)

    assert [request.partition_key for request in data.run_requests] == ["2024-02-29"]
