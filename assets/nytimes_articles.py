"""``nytimes800k/articles``: the MongoDB collection exported to per-split JSON folders."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.


import datetime as dt

from dagster import AssetExecutionContext, Config, asset
from pydantic import Field

from assets.partitions import BACKFILL_POLICY, nytimes_daily_partitions
from assets.article_export import export_partitions
from model.export import DEFAULT_SPLIT_ALIASES, NYTIMES_EXPORT_FIELDS
from pipelines.resources import MongoResource, PipelineSettings


class ArticleExportConfig(Config):
    page_size: int = Field(default=500, description="documents fetched per query; each page is a fresh short query")
    split_aliases: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_SPLIT_ALIASES),
        description="extra names accepted for a split, such as val -> valid",
    )


def publication_day_query(partition_key: str) -> dict:
    """The MongoDB filter selecting documents published on the UTC day ``partition_key``."""
    start = dt.datetime.fromisoformat(partition_key).replace(tzinfo=dt.timezone.utc)
    return {"pub_date": {"$gte": start, "$lt": start + dt.timedelta(days=1)}}


@asset(
    key=["nytimes800k", "articles"],
    group_name="nytimes800k",
    partitions_def=nytimes_daily_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    kinds={"mongodb", "json"},
    description=(
        "NYTimes800k articles exported from MongoDB to <data_root>/nytimes800k/articles/<split>/<aid>.json, "
        "one publication day per partition. Articles without images are skipped and counted."
    ),
)
def nytimes800k_articles(
    context: AssetExecutionContext,
    config: ArticleExportConfig,
    settings: PipelineSettings,
    nytimes_mongo: MongoResource,
):
    partitions = context.partition_keys if context.has_partition_key_range or context.has_partition_key else [None]
    return export_partitions(
        context,
        nytimes_mongo,
        settings.dataset_root("nytimes800k"),
        partitions,
        partition_query=lambda partition: publication_day_query(partition) if partition else {},
        fields=NYTIMES_EXPORT_FIELDS,
        split_aliases=config.split_aliases,
        page_size=config.page_size,
    )
