"""Schedules: the daily NYTimes800k run for the newest publication day.

NewsImages batches arrive as files at no fixed time, so the NewsImages sensor starts
their runs instead of a schedule.
"""

from __future__ import annotations

from dagster import DefaultScheduleStatus, build_schedule_from_partitioned_job

NYTIMES_DAILY_SCHEDULE = "nytimes800k_daily_schedule"

# Runs at 02:00 UTC: a daily partition ends at midnight UTC, and the wait leaves time for
# the day's last articles to reach MongoDB.
DAILY_HOUR_UTC = 2


def build_nytimes_daily_schedule(article_stages_job):
    """A schedule that materializes the article-level stages for the day that just ended.

    A tick at 02:00 UTC on day D requests partition D-1, the newest complete partition.
    """
    return build_schedule_from_partitioned_job(
        article_stages_job,
        name=NYTIMES_DAILY_SCHEDULE,
        hour_of_day=DAILY_HOUR_UTC,
        minute_of_hour=0,
        default_status=DefaultScheduleStatus.STOPPED,
        description=(
            "Materializes the NYTimes800k article-level stages for the newest publication day "
            f"every day at {DAILY_HOUR_UTC:02d}:00 UTC."
        ),
    )
