"""Asset checks on the stages' outputs: missing images, failed items, NaN or Inf in
features, faces per image, one image in two splits, translation coverage.

The checks read what each stage wrote for a partition (its manifest under
``<data_root>/<dataset>/<stage>/_manifests/<partition>.json``, its feature store, the
index files) through the plain functions in ``model.quality``.

Blocking checks guard against data that would corrupt training. They cover NaN or Inf
features, a face count that does not fit the model's face slots, an image in two splits
(a test image seen in training), and translated NewsImages documents without English
text. When one fails, Dagster skips the downstream assets of the same run. The share checks only
warn: a stage that failed on a few items leaves them out of the index, and training
goes on without them.
"""

# NOTE: no `from __future__ import annotations`: Dagster reads resource types from real annotations.

from typing import Optional

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    MetadataValue,
    asset_check,
)

from assets.partitions import newsimages_batch_partitions, nytimes_daily_partitions
from model.manifest import UNPARTITIONED, read_manifest
from model.quality import count_faces, failure_share, images_in_several_splits, scan_nonfinite, translation_coverage
from pipelines.resources import PipelineSettings

DATASET_PARTITIONS = {"nytimes800k": nytimes_daily_partitions, "newsimages": newsimages_batch_partitions}

# Largest shares of failed items that pass. Image downloads fail more often than the
# extraction of an image that was read, so images get a wider margin.
MAX_MISSING_IMAGE_SHARE = 0.05
MAX_FAILED_SHARE = {"region_features": 0.02, "face_features": 0.02, "entities": 0.02}
MIN_TRANSLATION_COVERAGE = 0.98
# The model has this many face slots per image; more faces do not fit its input.
MAX_FACES = 10
# A mean above this many faces per image (over all images) suggests a too-low detection threshold.
MAX_MEAN_FACES = 4.0


def _partitions(context: AssetCheckExecutionContext) -> list[Optional[str]]:
    if context.has_partition_key_range or context.has_partition_key:
        return list(context.partition_keys)
    return [None]


def _manifests(settings: PipelineSettings, dataset: str, stage: str, partitions: list[Optional[str]]) -> dict:
    root = settings.dataset_root(dataset)
    return {partition or UNPARTITIONED: read_manifest(root, stage, partition) for partition in partitions}


def _share_result(stage: str, manifests: dict, max_share: float, what: str) -> AssetCheckResult:
    share = failure_share(manifests.values(), stage)
    return AssetCheckResult(
        passed=share.share <= max_share,
        severity=AssetCheckSeverity.WARN,
        description=f"{share.failed} of {share.total} {what} failed ({share.share:.1%}; at most {max_share:.0%} passes)",
        metadata={
            "failed": share.failed,
            "total": share.total,
            "failed_share": round(share.share, 6),
            "max_share": max_share,
            "failed_examples": MetadataValue.json(share.examples),
            "partitions": len(manifests),
        },
    )


def _missing_images_check(dataset: str):
    @asset_check(
        asset=AssetKey([dataset, "images"]),
        name="missing_images_share",
        partitions_def=DATASET_PARTITIONS[dataset],
        description=f"Share of the partition's images that could not be fetched or decoded is at most {MAX_MISSING_IMAGE_SHARE:.0%}.",
    )
    def missing_images_share(context: AssetCheckExecutionContext, settings: PipelineSettings) -> AssetCheckResult:
        manifests = _manifests(settings, dataset, "images", _partitions(context))
        return _share_result("images", manifests, MAX_MISSING_IMAGE_SHARE, "images")

    return missing_images_share


def _failed_items_check(dataset: str, stage: str):
    max_share = MAX_FAILED_SHARE[stage]

    @asset_check(
        asset=AssetKey([dataset, stage]),
        name="failed_items_share",
        partitions_def=DATASET_PARTITIONS[dataset],
        description=f"Share of the partition's items that {stage} failed on is at most {max_share:.0%}.",
    )
    def failed_items_share(context: AssetCheckExecutionContext, settings: PipelineSettings) -> AssetCheckResult:
        manifests = _manifests(settings, dataset, stage, _partitions(context))
        return _share_result(stage, manifests, max_share, "articles" if stage == "entities" else "images")

    return failed_items_share


def _finite_features_check(dataset: str, stage: str):
    @asset_check(
        asset=AssetKey([dataset, stage]),
        name="features_finite",
        partitions_def=DATASET_PARTITIONS[dataset],
        blocking=True,
        description="Every float array stored for the partition's images is free of NaN and Inf; blocks training inputs otherwise.",
    )
    def features_finite(context: AssetCheckExecutionContext, settings: PipelineSettings) -> AssetCheckResult:
        manifests = _manifests(settings, dataset, stage, _partitions(context))
        keys = sorted({key for manifest in manifests.values() for key in manifest["done"]})
        store = settings.dataset_root(dataset) / stage / "store"
        scan = scan_nonfinite(store, keys)
        return AssetCheckResult(
            passed=scan.passed,
            severity=AssetCheckSeverity.ERROR,
            description=(
                f"{scan.checked} images checked: {len(scan.nonfinite)} arrays with NaN or Inf, "
                f"{len(scan.missing)} images listed as done but absent from {store}"
            ),
            metadata={
                "images_checked": scan.checked,
                "nonfinite": len(scan.nonfinite),
                "nonfinite_examples": MetadataValue.json(scan.nonfinite[:10]),
                "missing_from_store": len(scan.missing),
                "missing_examples": MetadataValue.json(scan.missing[:10]),
                "store": MetadataValue.path(str(store)),
            },
        )

    return features_finite


def _faces_per_image_check(dataset: str):
    @asset_check(
        asset=AssetKey([dataset, "face_features"]),
        name="faces_per_image",
        partitions_def=DATASET_PARTITIONS[dataset],
        blocking=True,
        description=(
            f"Every image has between 0 and {MAX_FACES} stored faces (the model's face slots; blocking), "
            f"and the mean is at most {MAX_MEAN_FACES} faces per image (a warning)."
        ),
    )
    def faces_per_image(context: AssetCheckExecutionContext, settings: PipelineSettings) -> AssetCheckResult:
        manifests = _manifests(settings, dataset, "face_features", _partitions(context))
        keys = sorted({key for manifest in manifests.values() for key in manifest["done"]})
        counts = count_faces(settings.dataset_root(dataset) / "face_features" / "store", keys, MAX_FACES)
        metadata = {
            "images": counts.images,
            "mean_faces": round(counts.mean, 4),
            "images_per_face_count": MetadataValue.json({str(n): images for n, images in counts.histogram.items()}),
            "out_of_range": len(counts.out_of_range),
            "out_of_range_examples": MetadataValue.json(counts.out_of_range[:10]),
        }
        if counts.out_of_range:
            return AssetCheckResult(
                passed=False,
                severity=AssetCheckSeverity.ERROR,
                description=f"{len(counts.out_of_range)} images have a face count outside 0..{MAX_FACES}",
                metadata=metadata,
            )
        return AssetCheckResult(
            passed=counts.mean <= MAX_MEAN_FACES,
            severity=AssetCheckSeverity.WARN,
            description=f"{counts.images} images, {counts.mean:.2f} faces per image on average",
            metadata=metadata,
        )

    return faces_per_image


def _image_in_two_splits_check(dataset: str):
    @asset_check(
        asset=AssetKey([dataset, "index"]),
        name="image_in_one_split",
        blocking=True,
        description="No image is in two splits of the index; a test image seen in training would inflate the scores.",
    )
    def image_in_one_split(settings: PipelineSettings) -> AssetCheckResult:
        index_dir = settings.dataset_root(dataset) / "index"
        leaked = images_in_several_splits(index_dir)
        examples = {image_hash: splits for image_hash, splits in list(leaked.items())[:10]}
        return AssetCheckResult(
            passed=not leaked,
            severity=AssetCheckSeverity.ERROR,
            description=f"{len(leaked)} images occur in more than one split",
            metadata={
                "images_in_several_splits": len(leaked),
                "examples": MetadataValue.json(examples),
                "index": MetadataValue.path(str(index_dir)),
            },
        )

    return image_in_one_split


@asset_check(
    asset=AssetKey(["newsimages", "translated_articles"]),
    name="translation_coverage",
    partitions_def=newsimages_batch_partitions,
    blocking=True,
    description=(
        f"At least {MIN_TRANSLATION_COVERAGE:.0%} of the batch's articles are translated (a warning), and every "
        "translated document has title_en and text_en (blocking: German text would reach the English tokenizer)."
    ),
)
def translation_coverage_check(context: AssetCheckExecutionContext, settings: PipelineSettings) -> AssetCheckResult:
    partitions = _partitions(context)
    source = _manifests(settings, "newsimages", "articles", partitions)
    translated = _manifests(settings, "newsimages", "translated_articles", partitions)
    coverage = translation_coverage(
        [item for manifest in source.values() for item in manifest["articles"]],
        [item for manifest in translated.values() for item in manifest["articles"]],
        settings.dataset_root("newsimages") / "translated_articles",
    )
    metadata = {
        "articles": coverage.articles,
        "translated": coverage.translated,
        "coverage": round(coverage.share, 6),
        "min_coverage": MIN_TRANSLATION_COVERAGE,
        "untranslated_examples": MetadataValue.json(coverage.untranslated_examples),
        "without_english": len(coverage.without_english),
        "without_english_examples": MetadataValue.json(coverage.without_english[:10]),
    }
    if coverage.without_english:
        return AssetCheckResult(
            passed=False,
            severity=AssetCheckSeverity.ERROR,
            description=f"{len(coverage.without_english)} translated documents lack English fields",
            metadata=metadata,
        )
    return AssetCheckResult(
        passed=coverage.share >= MIN_TRANSLATION_COVERAGE,
        severity=AssetCheckSeverity.WARN,
        description=f"{coverage.translated} of {coverage.articles} articles translated ({coverage.share:.1%})",
        metadata=metadata,
    )


nytimes800k_checks = [
    _missing_images_check("nytimes800k"),
    _failed_items_check("nytimes800k", "region_features"),
    _failed_items_check("nytimes800k", "face_features"),
    _failed_items_check("nytimes800k", "entities"),
    _finite_features_check("nytimes800k", "region_features"),
    _finite_features_check("nytimes800k", "face_features"),
    _faces_per_image_check("nytimes800k"),
    _image_in_two_splits_check("nytimes800k"),
]
newsimages_checks = [
    _missing_images_check("newsimages"),
    _failed_items_check("newsimages", "region_features"),
    _failed_items_check("newsimages", "face_features"),
    _failed_items_check("newsimages", "entities"),
    _finite_features_check("newsimages", "region_features"),
    _finite_features_check("newsimages", "face_features"),
    _faces_per_image_check("newsimages"),
    _image_in_two_splits_check("newsimages"),
    translation_coverage_check,
]
