"""The code location that ``dagster dev`` and ``dagster asset materialize`` load.

Every asset and asset check in the ``assets`` package is loaded automatically. The jobs
are built from those assets (``pipelines.jobs``), and the schedule and sensors target the jobs.
The executor comes from ``NEWSLXMERT_EXECUTOR`` (``pipelines.executors``).
"""

from __future__ import annotations

import logging

from dagster import Definitions, load_asset_checks_from_package_module, load_assets_from_package_module

import assets
from pipelines.executors import GPU_OP_TAGS, executor_from_env, untagged_gpu_assets
from pipelines.jobs import NEWSIMAGES_ARTICLE_STAGES_JOB, NYTIMES_ARTICLE_STAGES_JOB, build_jobs
from pipelines.resources import MongoResource, PipelineSettings
from pipelines.schedules import build_nytimes_daily_schedule
from pipelines.sensors import build_newsimages_new_batches_sensor, build_nytimes_new_articles_sensor

all_assets = load_assets_from_package_module(assets)
asset_keys = {spec.key for assets_def in all_assets if hasattr(assets_def, "specs") for spec in assets_def.specs}
# A check whose asset is not written yet (for example the index) is left out: Dagster
# would otherwise show its asset as an external asset that nothing materializes.
all_asset_checks = [
    checks_def
    for checks_def in load_asset_checks_from_package_module(assets)
    if all(check_key.asset_key in asset_keys for check_key in checks_def.check_keys)
]
jobs = build_jobs(all_assets)

_untagged = untagged_gpu_assets(all_assets)
if _untagged:
    logging.getLogger(__name__).warning(
        "GPU-bound assets without op_tags=%s run without the GPU concurrency limit: %s", GPU_OP_TAGS, ", ".join(_untagged)
    )

schedules = []
sensors = []
if NYTIMES_ARTICLE_STAGES_JOB in jobs:
    schedules.append(build_nytimes_daily_schedule(jobs[NYTIMES_ARTICLE_STAGES_JOB]))
    sensors.append(build_nytimes_new_articles_sensor(NYTIMES_ARTICLE_STAGES_JOB))
if NEWSIMAGES_ARTICLE_STAGES_JOB in jobs:
    sensors.append(build_newsimages_new_batches_sensor(NEWSIMAGES_ARTICLE_STAGES_JOB))

defs = Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    jobs=list(jobs.values()),
    schedules=schedules,
    sensors=sensors,
    resources={
        "settings": PipelineSettings(),
        "nytimes_mongo": MongoResource(database="nytimes", collection="articles"),
        "newsimages_mongo": MongoResource(database="newsimages", collection="articles"),
    },
    executor=executor_from_env(),
)
