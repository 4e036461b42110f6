"""``<dataset>/region_features``: 36 Faster R-CNN regions per image, for the NewsLXMERT visual input."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import os
from pathlib import Path
from typing import Optional

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from assets.partitions import BACKFILL_POLICY, newsimages_batch_partitions, nytimes_daily_partitions
from model.feature_store import FeatureStore
from model.fingerprint import feature_stage_fingerprint
from model.image_io import DEFAULT_MAX_PIXELS
from model.manifest import UNPARTITIONED, read_manifest, write_manifest
from model.regions import (
    BACKENDS,
    EXTRACTOR_FILE,
    JSON_DIR,
    STAGE,
    STORE_DIR,
    TINY_COMPONENT,
    BackendSettings,
    RegionReport,
    build_backend,
    check_extractor,
    default_num_workers,
    extract_regions,
    extractor_identity,
)
from pipelines.resources import PipelineSettings
from pipelines.executors import GPU_OP_TAGS

EXAMPLES = 10
# Many small shards (one per flush, per partition) slow down opening the store; past this
# count the run merges them into one.
MAX_SHARDS = 256


class RegionFeaturesConfig(Config):
    backend: str = Field(default="torchvision", description=f"region backend: {', '.join(BACKENDS)}")
    weights: str = Field(
        default_factory=lambda: os.environ.get("NEWSLXMERT_FRCNN_WEIGHTS", ""),
        description=(
            "torchvision: a state-dict file (e.g. fasterrcnn_resnet50_fpn_coco-258fb6c6.pth) or a folder with "
            "config.json and model.pt; detectron2: a checkpoint. Empty: random tiny weights in the tiny profile, "
            "an error otherwise."
        ),
    )
    architecture: str = Field(
        default="fasterrcnn_resnet50_fpn",
        description="torchvision architecture of a bare state-dict file (a folder's config.json names its own)",
    )
    detectron2_config: str = Field(default="", description="detectron2 config .yaml file, for the detectron2 backend")
    precomputed_dir: str = Field(
        default="", description="folder of <hash>.json or <hash>.jpg files from the original scripts, for the precomputed backend"
    )
    min_size: Optional[int] = Field(default=None, description="shorter side of the network input in pixels (empty: the model's)")
    max_size: Optional[int] = Field(default=None, description="cap on the longer side in pixels (empty: the model's)")
    score_thresh: Optional[float] = Field(default=None, description="minimum class probability of a region (empty: the model's)")
    batch_size: Optional[int] = Field(
        default=None,
        ge=1,
        description=(
            "images per backbone pass; empty: 8 on CUDA, 1 on the CPU, where batched passes measured slower "
            "(docs/benchmarks.md)"
        ),
    )
    loader_workers: int = Field(
        default_factory=default_num_workers, ge=0, description="DataLoader processes decoding images (0: decode in the run process)"
    )
    images_per_write: int = Field(default=64, ge=1, description="images per store shard; a killed run redoes at most these")
    write_json: bool = Field(
        default=False,
        description=(
            "also write the original per-image layout to region_features/json/<hash>.json (about 3x the store's size; "
            "python -m model.region_json to-json converts a store later)"
        ),
    )
    overwrite: bool = Field(default=False, description="extract images of these partitions again even when already stored")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="largest accepted image, in pixels")

    def backend_settings(self, settings: PipelineSettings) -> BackendSettings:
        return BackendSettings(
            backend=self.backend,
            weights=self.weights,
            architecture=self.architecture,
            detectron2_config=self.detectron2_config,
            precomputed_dir=self.precomputed_dir,
            min_size=self.min_size,
            max_size=self.max_size,
            score_thresh=self.score_thresh,
            device=settings.torch_device(),
            profile=settings.profile,
            tiny_dir=str(Path(settings.data_root) / "models" / "tiny" / TINY_COMPONENT),
        )


def materialize_region_features(
    context: AssetExecutionContext, config: RegionFeaturesConfig, settings: PipelineSettings, dataset: str
) -> MaterializeResult:
    dataset_root = settings.dataset_root(dataset)
    stage_root = dataset_root / STAGE
    partitions = context.partition_keys if context.has_partition_key_range or context.has_partition_key else [None]

    backend = build_backend(config.backend_settings(settings))
    identity = extractor_identity(backend)
    stage_root.mkdir(parents=True, exist_ok=True)
    check_extractor(stage_root, identity)
    store = FeatureStore(stage_root / STORE_DIR)
    json_dir = stage_root / JSON_DIR if config.write_json else None
    context.log.info("region backend %s on %s: %s", backend.name, settings.torch_device(), identity)

    total = RegionReport(feature_dim=backend.feature_dim)
    for partition in partitions:
        hashes = read_manifest(dataset_root, "images", partition)["images"]
        items = {image_hash: dataset_root / "images" / f"{image_hash}.jpg" for image_hash in hashes}
        context.log.info("regions of %d images of partition %s", len(items), partition or UNPARTITIONED)
        report = extract_regions(
            items,
            backend,
            store,
            json_dir=json_dir,
            batch_size=config.batch_size or (8 if settings.torch_device().startswith("cuda") else 1),
            num_workers=config.loader_workers if backend.needs_pixels else 0,
            flush_every=config.images_per_write,
            max_pixels=config.max_pixels,
            overwrite=config.overwrite,
        )
        for image_hash, reason in sorted(report.failed.items()):
            context.log.warning("image %s: no regions: %s", image_hash, reason)
        feature_dim = report.feature_dim or backend.feature_dim
        write_manifest(
            dataset_root,
            STAGE,
            partition,
            {
                "done": sorted(report.done + report.skipped),
                "failed": [{"image_hash": key, "reason": reason} for key, reason in sorted(report.failed.items())],
                "feature_dim": feature_dim,
            },
        )
        context.log.info(
            "partition %s: %d extracted, %d already stored, %d failed, %.2f images/s",
            partition or UNPARTITIONED, len(report.done), len(report.skipped), len(report.failed), report.images_per_second,
        )
        total.done += report.done
        total.skipped += report.skipped
        total.failed.update(report.failed)
        total.seconds += report.seconds
        total.feature_dim = feature_dim

    shard_count = len(list((store.folder / "shards").glob("shard-*.arrow"))) if store.folder.exists() else 0
    if shard_count > MAX_SHARDS:
        context.log.info("merging %d store shards into one", shard_count)
        store.compact()

    failed_examples = [{"image_hash": key, "reason": reason} for key, reason in sorted(total.failed.items())[:EXAMPLES]]
    # After the merge above, which moves every row to a new shard.
    fingerprints = {
        partition: feature_stage_fingerprint(dataset_root, STAGE, partition, store.folder, identity_files=[EXTRACTOR_FILE])
        for partition in partitions
    }
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            "images_done": len(total.done),
            "images_skipped": len(total.skipped),
            "skipped_examples": MetadataValue.json(total.skipped[:EXAMPLES]),
            "images_failed": len(total.failed),
            "failed_examples": MetadataValue.json(failed_examples),
            "images_per_second": total.images_per_second,
            "seconds": round(total.seconds, 3),
            "feature_dim": total.feature_dim,
            "backend": backend.name,
            "weights": identity.get("weights", ""),
            "weights_sha256": MetadataValue.json(identity.get("weights_sha256", {})),
            "attributes": "predicted" if backend.has_attributes else "none: attr_ids -1, attr_probs 0",
            "extractor": MetadataValue.json(identity),
            "device": settings.torch_device(),
            "store": MetadataValue.path(str(store.folder)),
            "json": MetadataValue.path(str(json_dir)) if json_dir else "not written (write_json is off)",
            "partitions": len(partitions),
            "settings": MetadataValue.json(config.model_dump() | {"profile": settings.profile}),
            **fingerprint_metadata(fingerprints),
        },
    )


_DESCRIPTION = (
    "36 Faster R-CNN regions per {dataset} image (RoI features [36, D], absolute and normalized boxes, object "
    "and attribute ids and probabilities, the real region count) in the fast store at "
    "<data_root>/{dataset}/region_features/store/, and with write_json also as the original per-image JSON. "
    "Images already stored are skipped; unreadable ones are recorded as failures."
)


@asset(
    key=["nytimes800k", STAGE],
    group_name="nytimes800k",
    partitions_def=nytimes_daily_partitions,
    backfill_policy=BACKFILL_POLICY,
    op_tags=GPU_OP_TAGS,
    code_version="1",
    deps=[AssetKey(["nytimes800k", "images"])],
    kinds={"pytorch"},
    description=_DESCRIPTION.format(dataset="nytimes800k"),
)
def nytimes800k_region_features(
    context: AssetExecutionContext, config: RegionFeaturesConfig, settings: PipelineSettings
) -> MaterializeResult:
    return materialize_region_features(context, config, settings, "nytimes800k")


@asset(
    key=["newsimages", STAGE],
    group_name="newsimages",
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    op_tags=GPU_OP_TAGS,
    code_version="1",
    deps=[AssetKey(["newsimages", "images"])],
    kinds={"pytorch"},
    description=_DESCRIPTION.format(dataset="newsimages"),
)
def newsimages_region_features(
    context: AssetExecutionContext, config: RegionFeaturesConfig, settings: PipelineSettings
) -> MaterializeResult:
    return materialize_region_features(context, config, settings, "newsimages")
