"""The per-partition export loop and its metadata, shared by both datasets' article assets."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

from pathlib import Path
from typing import Callable, Optional, Sequence

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from assets.data_versions import fingerprint_metadata, run_data_version
from model.export import export_documents, merge_reports
from model.fingerprint import article_files_fingerprint
from model.manifest import write_manifest
from pipelines.resources import MongoResource


def export_partitions(
    context: AssetExecutionContext,
    mongo: MongoResource,
    dataset_root: Path,
    partitions: Sequence[Optional[str]],
    partition_query: Callable[[Optional[str]], dict],
    fields: Optional[tuple[str, ...]],
    split_aliases: dict[str, str],
    page_size: int,
) -> MaterializeResult:
    """Export each partition's documents to ``<dataset_root>/articles``, write its manifest, return the result.

    The data version is the fingerprint of the partitions' manifests and article files.
    """
    out_root = dataset_root / "articles"
    reports = []
    with mongo.open_collection() as collection:
        for partition in partitions:
            context.log.info("exporting %s (partition %s) to %s", mongo.describe(), partition or "all", out_root)
            report = export_documents(
                collection,
                out_root,
                query=partition_query(partition),
                fields=fields,
                split_aliases=split_aliases,
                page_size=page_size,
            )
            write_manifest(dataset_root, "articles", partition, {"articles": [list(item) for item in sorted(report.items)]})
            for failure in report.failures:
                context.log.warning("document %s not exported: %s", failure.aid, failure.reason)
            reports.append(report)

    summary = merge_reports(reports).summary()
    fingerprints = {partition: article_files_fingerprint(dataset_root, "articles", partition) for partition in partitions}
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            "exported": summary["exported"],
            "per_split": MetadataValue.json(summary["per_split"]),
            "written": summary["written"],
            "unchanged": summary["unchanged"],
            "skipped_no_images": summary["skipped_no_images"],
            "skipped_examples": MetadataValue.json(summary["skipped_examples"]),
            "failed": summary["failed"],
            "failed_examples": MetadataValue.json(summary["failed_examples"]),
            "seconds": summary["seconds"],
            "documents_per_second": summary["documents_per_second"],
            "path": MetadataValue.path(str(out_root)),
            "partitions": len(partitions),
            "source": mongo.describe(),
            **fingerprint_metadata(fingerprints),
        },
    )
