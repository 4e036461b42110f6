"""Sensors that start runs for new data.

``nytimes800k_new_articles_sensor`` finds documents added to the MongoDB collection since
its cursor and requests the article-level stages for exactly the publication days they
belong to. ``newsimages_new_batches_sensor`` registers every new NewsImages source file
as a dynamic partition and requests the article-level stages for it.

How the NYTimes800k sensor finds new documents
----------------------------------------------
The cursor stores the highest ObjectId ``_id`` seen, the collection's document count and
the number of documents per UTC publication day. A tick first queries the documents whose
``_id`` is above the stored one: ObjectIds start with their creation time in seconds, so
ids made by drivers at insert time grow with insertion, and this query walks only the
new tail of the ``_id`` index. When the collection grew by exactly the number of
documents found there, those documents are the new ones. Otherwise some documents were
inserted with ids that do not grow (string ids, ids kept from an archive, ObjectIds from
two clients in the same second) or were deleted, and the tick recounts the documents of
every publication day with one aggregation and compares the counts with the cursor's.
Either way, a day is requested when its document count changed.

A day whose partition does not exist yet (today, as daily partitions end with the last
complete day) stays in the cursor and is requested once its partition exists. Days
before the first partition are reported in the tick's log and skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.partitions import MAX_PARTITIONS_PER_RUN, newsimages_batch_partitions, nytimes_daily_partitions
from pipelines.resources import EmbeddedMongoBusyError, MongoResource

NYTIMES_SENSOR = "nytimes800k_new_articles_sensor"
NEWSIMAGES_SENSOR = "newsimages_new_batches_sensor"
NYTIMES_ARTICLES_KEY = AssetKey(["nytimes800k", "articles"])

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

# The folder that newsimages/raw_articles reads when its run config names none.
NEWSIMAGES_SOURCE_DIR_ENV = "NEWSLXMERT_NEWSIMAGES_SOURCE"

# Above this many documents past the stored _id, a tick recounts per day instead of
# holding every new _id in memory.
MAX_NEW_IDS_PER_TICK = 50_000

# UTC publication day of a document, or null when `pub_date` is missing or not a date.
_PUBLICATION_DAY_EXPRESSION = {
    "$cond": [
        {"$eq": [{"$type": "$pub_date"}, "date"]},
        {"$dateToString": {"format": "%Y-%m-%d", "date": "$pub_date"}},
        None,
    ]
}


@dataclasses.dataclass
class ArticleCursor:
    """The state of the collection as the NYTimes800k sensor saw it at its last tick."""

    last_object_id: str | None  # hex of the highest ObjectId _id, None when there was none
    total: int  # documents in the collection
    days: dict[str, int]  # documents per UTC publication day, "YYYY-MM-DD"
    undated: int = 0  # documents without a date in pub_date
    pending: list[str] = dataclasses.field(default_factory=list)  # changed days without a partition yet

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> "ArticleCursor | None":
        if not text:
            return None
        try:
            values = json.loads(text)
            return cls(
                last_object_id=values["last_object_id"],
                total=int(values["total"]),
                days={str(day): int(count) for day, count in values["days"].items()},
                undated=int(values.get("undated", 0)),
                pending=[str(day) for day in values.get("pending", [])],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"invalid {NYTIMES_SENSOR} cursor ({error}); reset the sensor's cursor in the UI "
                "to rescan the whole collection"
            ) from None


@dataclasses.dataclass
class ArticleScan:
    """The result of comparing the collection with a cursor."""

    changed_days: list[str]  # days whose document count changed, sorted
    new_documents: int  # documents added since the cursor (negative when more were deleted)
    method: str  # "new _ids" when the _id query found every addition, else "recount"
    cursor: ArticleCursor


def publication_day(value: Any) -> str | None:
    """The UTC day of a ``pub_date`` value; naive datetimes are UTC, as pymongo returns them."""
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.date().isoformat()


def count_documents_per_day(collection) -> tuple[dict[str, int], int]:
    """Documents per UTC publication day, and the number without a date, by one aggregation."""
    days: dict[str, int] = {}
    undated = 0
    for row in collection.aggregate([{"$group": {"_id": _PUBLICATION_DAY_EXPRESSION, "n": {"$sum": 1}}}]):
        if row["_id"] is None:
            undated += int(row["n"])
        else:
            days[str(row["_id"])] = int(row["n"])
    return dict(sorted(days.items())), undated


def highest_object_id(collection) -> str | None:
    document = collection.find_one({"_id": {"$type": "objectId"}}, {"_id": 1}, sort=[("_id", -1)])
    return str(document["_id"]) if document else None


def scan_for_new_articles(collection, previous: ArticleCursor | None, max_new_ids: int = MAX_NEW_IDS_PER_TICK) -> ArticleScan:
    """Find the publication days whose documents changed since ``previous``.

    With no previous cursor every day with documents counts as changed.
    """
    from bson import ObjectId

    total = collection.count_documents({})
    if previous is not None:
        if previous.last_object_id is None:
            id_filter: dict[str, Any] = {"$type": "objectId"}
        else:
            id_filter = {"$gt": ObjectId(previous.last_object_id)}
        # The count comes first, so a document inserted in between makes the numbers
        # disagree and leads to a recount rather than to a missed document.
        new_documents = list(collection.find({"_id": id_filter}, {"pub_date": 1}).sort("_id", 1).limit(max_new_ids + 1))
        if len(new_documents) <= max_new_ids and total == previous.total + len(new_documents):
            days = dict(previous.days)
            undated = previous.undated
            changed = set()
            for document in new_documents:
                day = publication_day(document.get("pub_date"))
                if day is None:
                    undated += 1
                    continue
                days[day] = days.get(day, 0) + 1
                changed.add(day)
            last_id = str(new_documents[-1]["_id"]) if new_documents else previous.last_object_id
            cursor = ArticleCursor(last_id, total, dict(sorted(days.items())), undated, list(previous.pending))
            return ArticleScan(sorted(changed), len(new_documents), "new _ids", cursor)

    days, undated = count_documents_per_day(collection)
    before = previous.days if previous is not None else {}
    changed = sorted(day for day, count in days.items() if before.get(day) != count)
    cursor = ArticleCursor(
        highest_object_id(collection),
        total,
        days,
        undated,
        list(previous.pending) if previous is not None else [],
    )
    added = total - (previous.total if previous is not None else 0)
    return ArticleScan(changed, added, "recount", cursor)


def consecutive_runs(keys: Sequence[str], all_keys: Sequence[str], max_per_run: int) -> list[list[str]]:
    """Group ``keys`` into runs of neighbouring partitions, at most ``max_per_run`` each.

    ``all_keys`` gives the partition order; a run covers a range with no gap, because a
    run over a partition range processes every partition inside it.
    """
    if max_per_run < 1:
        raise ValueError(f"max_per_run must be at least 1, got {max_per_run}")
    position = {key: index for index, key in enumerate(all_keys)}
    runs: list[list[str]] = []
    for key in sorted(keys, key=lambda k: position[k]):
        if runs and position[key] == position[runs[-1][-1]] + 1 and len(runs[-1]) < max_per_run:
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


def partition_run_request(keys: Sequence[str], run_key_suffix: str, tags: Mapping[str, str] | None = None) -> RunRequest:
    """Build the run request for a single partition or for a range of neighbouring partitions."""
    tags = dict(tags or {})
    if len(keys) == 1:
        return RunRequest(partition_key=keys[0], run_key=f"{keys[0]}:{run_key_suffix}", tags=tags)
    tags.update({RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]})
    return RunRequest(run_key=f"{keys[0]}...{keys[-1]}:{run_key_suffix}", tags=tags)


def _split_by_partition_existence(days: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """Days with a partition, days after the last partition (not yet), days before the first."""
    first = nytimes_daily_partitions.get_first_partition_key()
    ready, pending, too_early = [], [], []
    for day in sorted(set(days)):
        if nytimes_daily_partitions.has_partition_key(day):
            ready.append(day)
        elif first is not None and day < first:
            too_early.append(day)
        else:
            pending.append(day)
    return ready, pending, too_early


def nytimes_new_article_requests(
    context: SensorEvaluationContext, mongo: MongoResource, max_per_run: int = MAX_PARTITIONS_PER_RUN
) -> SensorResult | SkipReason:
    """Scan the collection, request runs for the changed days and advance the cursor (the sensor's body)."""
    previous = ArticleCursor.from_json(context.cursor)
    # A tick has a time limit (60 s by default) and an export keeps the embedded server open
    # for its whole run, so a tick that finds it in use skips and the next one retries.
    try:
        with mongo.open_collection(lock_timeout_s=0) as collection:
            scan = scan_for_new_articles(collection, previous)
    except EmbeddedMongoBusyError:
        return SkipReason(f"the embedded MongoDB at {mongo.describe()} is in use by a run; the next tick retries")

    days = set(scan.changed_days) | set(previous.pending if previous else [])
    if previous is None:
        # First tick: the cursor is new, so days that were already exported count as seen.
        materialized = context.instance.get_materialized_partitions(NYTIMES_ARTICLES_KEY)
        days = {day for day in days if day not in materialized}
    ready, pending, too_early = _split_by_partition_existence(days)
    scan.cursor.pending = pending

    context.log.info(
        "%s: %d documents (%+d, found by %s), %d changed days, %d to run, %d waiting for their partition",
        mongo.describe(), scan.cursor.total, scan.new_documents, scan.method, len(scan.changed_days), len(ready), len(pending),
    )
    if too_early:
        context.log.warning(
            "%d changed days lie before the first partition %s and are skipped, such as %s; "
            "lower NEWSLXMERT_NYTIMES_START_DATE to include them",
            len(too_early), nytimes_daily_partitions.get_first_partition_key(), ", ".join(too_early[:5]),
        )
    if scan.cursor.undated != (previous.undated if previous else 0):
        context.log.warning("%d documents have no date in pub_date and belong to no partition", scan.cursor.undated)

    if not ready:
        return SensorResult(
            skip_reason=SkipReason(
                f"no new articles in {mongo.describe()} ({scan.cursor.total} documents"
                + (f", {len(pending)} days waiting for their partition" if pending else "")
                + ")"
            ),
            cursor=scan.cursor.to_json(),
        )

    all_days = nytimes_daily_partitions.get_partition_keys()
    run_requests = []
    for keys in consecutive_runs(ready, all_days, max_per_run):
        documents = sum(scan.cursor.days.get(day, 0) for day in keys)
        run_requests.append(partition_run_request(keys, f"{documents}docs", tags={"newslxmert/trigger": NYTIMES_SENSOR}))
    return SensorResult(run_requests=run_requests, cursor=scan.cursor.to_json())


def build_nytimes_new_articles_sensor(job_name: str, minimum_interval_seconds: int = 120):
    @sensor(
        name=NYTIMES_SENSOR,
        job_name=job_name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.STOPPED,
        description=(
            "Requests the NYTimes800k article-level stages for the publication days of documents "
            "added to MongoDB since the last tick. Neighbouring days share a run, up to "
            f"{MAX_PARTITIONS_PER_RUN} per run."
        ),
    )
    def nytimes800k_new_articles_sensor(context: SensorEvaluationContext, nytimes_mongo: MongoResource):
        return nytimes_new_article_requests(context, nytimes_mongo)

    return nytimes800k_new_articles_sensor


def newsimages_source_dir() -> Path | None:
    """Return the NewsImages source folder from ``NEWSLXMERT_NEWSIMAGES_SOURCE``, or None when unset.

    It must be the variable that newsimages/raw_articles reads, because the runs this
    sensor requests carry no run config.
    """
    configured = os.environ.get(NEWSIMAGES_SOURCE_DIR_ENV, "").strip()
    return Path(configured).expanduser().resolve() if configured else None


def newsimages_new_batch_requests(context: SensorEvaluationContext, source_dir: Path | None) -> SensorResult | SkipReason:
    """Register new NewsImages batches as partitions and request a run for each (the sensor's body)."""
    from model.newsimages import discover_batches

    if source_dir is None:
        return SkipReason(f"{NEWSIMAGES_SOURCE_DIR_ENV} is not set; set it to the folder with the NewsImages TSV/CSV files")
    if not source_dir.is_dir():
        return SkipReason(f"NewsImages source folder {source_dir} does not exist; set {NEWSIMAGES_SOURCE_DIR_ENV}")
    discovered = list(discover_batches(source_dir))
    known = set(context.instance.get_dynamic_partitions(newsimages_batch_partitions.name))
    new = [batch for batch in discovered if batch not in known]
    if not new:
        return SkipReason(f"no new NewsImages batches in {source_dir} ({len(discovered)} known)")
    context.log.info("new NewsImages batches in %s: %s", source_dir, ", ".join(new))
    return SensorResult(
        run_requests=[
            RunRequest(partition_key=batch, run_key=f"batch:{batch}", tags={"newslxmert/trigger": NEWSIMAGES_SENSOR})
            for batch in new
        ],
        dynamic_partitions_requests=[newsimages_batch_partitions.build_add_request(new)],
    )


def build_newsimages_new_batches_sensor(job_name: str, minimum_interval_seconds: int = 300):
    @sensor(
        name=NEWSIMAGES_SENSOR,
        job_name=job_name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.STOPPED,
        description=(
            "Registers each new NewsImages source file as a partition of newsimages_batches and "
            f"requests the NewsImages article-level stages for it. Folder: ${NEWSIMAGES_SOURCE_DIR_ENV}."
        ),
    )
    def newsimages_new_batches_sensor(context: SensorEvaluationContext):
        return newsimages_new_batch_requests(context, newsimages_source_dir())

    return newsimages_new_batches_sensor
