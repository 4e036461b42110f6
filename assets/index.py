"""``<dataset>/index``: per split, the (article, image) pairs that have everything training needs."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from model.documents import TEXT_STAGE
from model.fingerprint import index_files_fingerprint
from model.index import DROP_REASONS, build_index, index_folder
from pipelines.resources import PipelineSettings

STAGE = "index"
DROPPED_SHARE_CHECK = "dropped_share"


class IndexConfig(Config):
    require_faces: bool = Field(
        default=True,
        description="keep only pairs whose image went through face detection, with or without faces found (needed when training with faces)",
    )
    max_dropped_share: float = Field(
        default=0.05,
        description="the dropped_share check fails when a larger share of all pairs lacks features",
    )


def materialize_index(context: AssetExecutionContext, config: IndexConfig, settings: PipelineSettings, dataset: str) -> MaterializeResult:
    report = build_index(settings.dataset_root(dataset), dataset, require_faces=config.require_faces)
    summary = report.summary()
    for reason in DROP_REASONS:
        if report.dropped[reason]:
            context.log.warning(
                "%d pairs dropped (%s), for example %s", report.dropped[reason], reason, report.dropped_examples[reason][:3]
            )
    if report.leaked_hashes:
        context.log.error("%d images occur in more than one split, for example %s", len(report.leaked_hashes), list(report.leaked_hashes)[:3])
    context.log.info("index of %s: %s pairs kept, %s dropped", dataset, summary["per_split"], summary["dropped"])

    share_ok = report.dropped_share <= config.max_dropped_share
    dropped_check = AssetCheckResult(
        check_name=DROPPED_SHARE_CHECK,
        passed=share_ok,
        severity=AssetCheckSeverity.ERROR,
        description=(
            f"{report.dropped_total} of {report.kept + report.dropped_total} pairs dropped "
            f"({report.dropped_share:.2%}; at most {config.max_dropped_share:.2%} allowed)"
        ),
        metadata={
            "dropped_share": summary["dropped_share"],
            "max_dropped_share": config.max_dropped_share,
            "dropped_by_reason": MetadataValue.json(summary["dropped_by_reason"]),
            "dropped_examples": MetadataValue.json(summary["dropped_examples"]),
        },
    )
    fingerprints = {None: index_files_fingerprint(index_folder(settings.dataset_root(dataset)), report.per_split)}
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            "pairs": summary["pairs"],
            "per_split": MetadataValue.json(summary["per_split"]),
            "articles": summary["articles"],
            "dropped": summary["dropped"],
            "dropped_share": summary["dropped_share"],
            "dropped_by_reason": MetadataValue.json(summary["dropped_by_reason"]),
            "dropped_examples": MetadataValue.json(summary["dropped_examples"]),
            "images_in_several_splits": summary["leaked_images"],
            "images_in_several_splits_examples": MetadataValue.json(summary["leaked_examples"]),
            "images_shared_within_split": MetadataValue.json(summary["duplicate_images"]),
            "require_faces": config.require_faces,
            "fingerprints": MetadataValue.json(summary["fingerprints"]),
            "path": MetadataValue.path(str(settings.dataset_root(dataset) / STAGE)),
            "seconds": summary["seconds"],
            **fingerprint_metadata(fingerprints),
        },
        check_results=[dropped_check],
    )


def _asset_arguments(dataset: str) -> dict:
    key = AssetKey([dataset, STAGE])
    return dict(
        key=key,
        group_name=dataset,
        deps=[
            AssetKey([dataset, TEXT_STAGE[dataset]]),
            AssetKey([dataset, "region_features"]),
            AssetKey([dataset, "face_features"]),
        ],
        check_specs=[
            AssetCheckSpec(
                DROPPED_SHARE_CHECK,
                asset=key,
                blocking=True,
                description="At most max_dropped_share of all pairs lack region (or face) features.",
            )
        ],
        code_version="1",
        kinds={"python", "parquet"},
        description=(
            f"Pairs (aid, iid) of every {dataset} split whose image has region features (and face features when "
            "require_faces), over all partitions: index/<split>.pickle ({i: (aid, iid)}, the original format), "
            "a Parquet twin with the image hash, and a SHA-256 fingerprint. Dropped pairs are counted by reason."
        ),
    )


@asset(**_asset_arguments("nytimes800k"))
def nytimes800k_index(context: AssetExecutionContext, config: IndexConfig, settings: PipelineSettings) -> MaterializeResult:
    return materialize_index(context, config, settings, "nytimes800k")


@asset(**_asset_arguments("newsimages"))
def newsimages_index(context: AssetExecutionContext, config: IndexConfig, settings: PipelineSettings) -> MaterializeResult:
    return materialize_index(context, config, settings, "newsimages")
