"""Export MongoDB news documents to one JSON file per article in per-split folders.

Layout: ``<out_root>/<split>/<aid>.json``, canonical JSON (sorted keys, ObjectId as hex,
datetimes ISO-8601 UTC), so two exports of the same data are byte-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

from model.storage import (
    UnsafePathError,
    check_safe_id,
    remove_stale_temporaries,
    safe_join,
    write_json_if_changed,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT_ALIASES = {"val": "valid", "validation": "valid", "dev": "valid"}

# Fields of a NYTimes800k document that later stages read; the export drops the rest.
NYTIMES_EXPORT_FIELDS = (
    "_id",
    "split",
    "pub_date",
    "headline",
    "snippet",
    "abstract",
    "web_url",
    "parsed_section",
    "image_positions",
)

MAX_EXAMPLE_IDS = 10


@dataclasses.dataclass
class ExportFailure:
    """One document that was not exported, and why."""

    aid: str
    reason: str


@dataclasses.dataclass
class ExportReport:
    per_split: Counter = dataclasses.field(default_factory=Counter)
    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (split, aid) exported
    written: int = 0
    unchanged: int = 0
    skipped_no_images: list[str] = dataclasses.field(default_factory=list)
    failures: list[ExportFailure] = dataclasses.field(default_factory=list)
    moved_between_splits: int = 0
    stale_temporaries_removed: int = 0
    pages: int = 0
    seconds: float = 0.0

    @property
    def exported(self) -> int:
        return sum(self.per_split.values())

    @property
    def documents_per_second(self) -> float:
        seen = self.exported + len(self.skipped_no_images) + len(self.failures)
        return seen / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain values for logs and asset metadata."""
        return {
            "exported": self.exported,
            "per_split": {split: self.per_split.get(split, 0) for split in SPLITS},
            "written": self.written,
            "unchanged": self.unchanged,
            "moved_between_splits": self.moved_between_splits,
            "skipped_no_images": len(self.skipped_no_images),
            "skipped_examples": self.skipped_no_images[:MAX_EXAMPLE_IDS],
            "failed": len(self.failures),
            "failed_examples": [f"{f.aid}: {f.reason}" for f in self.failures[:MAX_EXAMPLE_IDS]],
            "pages": self.pages,
            "seconds": round(self.seconds, 3),
            "documents_per_second": round(self.documents_per_second, 1),
        }


def merge_reports(reports: list[ExportReport]) -> ExportReport:
    """Combine the reports of several partitions into one."""
    merged = ExportReport()
    for report in reports:
        merged.per_split.update(report.per_split)
        merged.items.extend(report.items)
        merged.written += report.written
        merged.unchanged += report.unchanged
        merged.skipped_no_images.extend(report.skipped_no_images)
        merged.failures.extend(report.failures)
        merged.moved_between_splits += report.moved_between_splits
        merged.stale_temporaries_removed += report.stale_temporaries_removed
        merged.pages += report.pages
        merged.seconds += report.seconds
    return merged


# BSON type groups that ``_id`` values may have. A range query such as ``{"$gt": x}`` only
# matches values of x's type group, so paging walks each group separately.
ID_TYPE_GROUPS = ("number", "string", "objectId", "date", "binData", "bool", "object")


def iter_documents_by_id_range(
    collection,
    query: Mapping[str, Any] | None = None,
    projection: Mapping[str, Any] | None = None,
    page_size: int = 500,
) -> Iterator[list[dict[str, Any]]]:
    """Yield pages of documents sorted by ``_id``, each page fetched by a fresh short query.

    Each page requests ``_id`` greater than the last one seen, so no cursor stays open
    between pages (MongoDB closes cursors idle for 10 minutes) and memory holds one page.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    for type_group in ID_TYPE_GROUPS:
        last_id = None
        while True:
            id_filter: dict[str, Any] = {"$type": type_group}
            if last_id is not None:
                id_filter["$gt"] = last_id
            page_query = {"$and": [dict(query), {"_id": id_filter}]} if query else {"_id": id_filter}
            page = list(collection.find(page_query, projection).sort("_id", 1).limit(page_size))
            if page:
                yield page
                last_id = page[-1]["_id"]
            if len(page) < page_size:
                break


def normalize_split(value: Any, aliases: Mapping[str, str]) -> str:
    """Map a document's ``split`` value to train/valid/test, or raise ValueError naming it."""
    if value is None or value == "":
        raise ValueError("missing 'split' field; set it to one of train, valid, test")
    name = str(value).strip().lower()
    name = aliases.get(name, name)
    if name not in SPLITS:
        raise ValueError(
            f"unknown split {value!r}; expected one of {', '.join(SPLITS)} or a configured alias "
            f"({', '.join(sorted(aliases)) or 'none'})"
        )
    return name


def has_images(document: Mapping[str, Any]) -> bool:
    """True when the document has at least one image: NYTimes ``image_positions`` or a NewsImages image."""
    if document.get("image_positions"):
        return True
    return bool(document.get("image_url") or document.get("image_hash") or document.get("image_id"))


def export_documents(
    collection,
    out_root: Path | str,
    query: Mapping[str, Any] | None = None,
    fields: tuple[str, ...] | None = NYTIMES_EXPORT_FIELDS,
    split_aliases: Mapping[str, str] = DEFAULT_SPLIT_ALIASES,
    page_size: int = 500,
) -> ExportReport:
    """Export every document matching ``query`` to ``<out_root>/<split>/<aid>.json``.

    Documents without images are skipped and counted; documents with an unsafe id or a
    missing or unknown split get a failure record and the export goes on. A file whose
    bytes would not change is not rewritten, so a re-run after a crash only writes the rest.
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    report = ExportReport()
    report.stale_temporaries_removed = remove_stale_temporaries(out_root)
    projection = {field: 1 for field in fields} if fields else None
    started = time.perf_counter()

    first_raw_id: dict[str, Any] = {}  # file stem -> the _id that took it in this run
    for page in iter_documents_by_id_range(collection, query, projection, page_size):
        report.pages += 1
        for document in page:
            _export_one(document, out_root, split_aliases, report, first_raw_id)

    report.seconds = time.perf_counter() - started
    logger.info("export to %s finished: %s", out_root, report.summary())
    return report


def _export_one(
    document: dict[str, Any], out_root: Path, aliases: Mapping[str, str], report: ExportReport, first_raw_id: dict[str, Any]
) -> None:
    raw_id = document.get("_id")
    aid = str(raw_id) if raw_id is not None else ""
    try:
        check_safe_id(aid)
        split = normalize_split(document.get("split"), aliases)
        target = safe_join(out_root, split, f"{aid}.json")
    except (UnsafePathError, ValueError) as error:
        report.failures.append(ExportFailure(aid=aid if aid else "<empty _id>", reason=str(error)))
        return
    if aid in first_raw_id:
        # Ids of different BSON types, such as 7 and "7" or an ObjectId and its hex string,
        # name the same file; writing both would silently keep only the last one.
        first = first_raw_id[aid]
        report.failures.append(
            ExportFailure(
                aid=aid,
                reason=(
                    f"duplicate id: _id {raw_id!r} ({type(raw_id).__name__}) and _id {first!r} ({type(first).__name__}) "
                    f"both become {aid}.json; the first was exported, give this document a distinct _id"
                ),
            )
        )
        return
    first_raw_id[aid] = raw_id

    if not has_images(document):
        report.skipped_no_images.append(aid)
        return

    for other in SPLITS:
        if other != split:
            stale = out_root / other / f"{aid}.json"
            if stale.exists():
                stale.unlink()
                report.moved_between_splits += 1

    document = dict(document)
    document["split"] = split
    if write_json_if_changed(target, document):
        report.written += 1
    else:
        report.unchanged += 1
    report.per_split[split] += 1
    report.items.append((split, aid))
