"""``<dataset>/face_features``: MTCNN faces and FaceNet embeddings of every downloaded image."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import os
from pathlib import Path
from typing import Any, Optional

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from assets.partitions import BACKFILL_POLICY, newsimages_batch_partitions, nytimes_daily_partitions
from model.documents import article_images, iter_articles
from model.faces import STORE_FOLDER, FaceConfig, FaceExtractor, FaceReport, extract_face_features
from model.fingerprint import feature_stage_fingerprint
from model.manifest import read_manifest, write_manifest
from pipelines.resources import PipelineSettings
from pipelines.executors import GPU_OP_TAGS

STAGE = "face_features"


class FaceFeaturesConfig(Config):
    facenet_weights: Optional[str] = Field(
        default_factory=lambda: os.environ.get("NEWSLXMERT_FACENET_WEIGHTS") or None,
        description=(
            "FaceNet weights: 'vggface2' or 'casia-webface' (facenet-pytorch's download cache), a state-dict "
            "file, or a folder holding facenet.pt. Empty: vggface2 in the base profile, random weights in tiny."
        ),
    )
    image_size: int = Field(default=160, description="face crop side in pixels, FaceNet's input")
    margin: int = Field(default=0, description="pixels added around each box, in crop pixels")
    min_face_size: int = Field(default=20, description="smallest face MTCNN searches for, in pixels")
    thresholds: list[float] = Field(default=[0.6, 0.7, 0.7], description="MTCNN P-, R- and O-net thresholds")
    factor: float = Field(default=0.709, description="scale step of MTCNN's image pyramid")
    post_process: bool = Field(default=True, description="standardise crops as (x - 127.5) / 128")
    max_faces: int = Field(default=10, description="faces kept per image, largest first")
    face_batch_size: int = Field(default=64, description="faces per FaceNet forward pass")
    images_per_write: int = Field(default=64, description="images per feature-store shard; a crash loses at most these")
    loader_workers: int = Field(
        default=0, description="DataLoader processes decoding images and, when the device is the CPU, running MTCNN"
    )
    write_json: bool = Field(default=False, description="also write the original per-image JSON under face_features/json/")
    json_dtype: str = Field(default="float64", description="float dtype of the JSON base64 arrays (the original wrote float64)")

    def face_config(self) -> FaceConfig:
        return FaceConfig(
            image_size=self.image_size,
            margin=self.margin,
            min_face_size=self.min_face_size,
            thresholds=tuple(self.thresholds),
            factor=self.factor,
            post_process=self.post_process,
            max_faces=self.max_faces,
            face_batch_size=self.face_batch_size,
            images_per_write=self.images_per_write,
            loader_workers=self.loader_workers,
        )


def nytimes_facenet_details(dataset_root: Path, partition: Optional[str]) -> dict[str, dict]:
    """Image hash -> ``facenet_details`` of the partition's NYTimes800k captions that carry them."""
    items = [tuple(item) for item in read_manifest(dataset_root, "articles", partition)["articles"]]
    found: dict[str, dict] = {}
    for _, document in iter_articles(dataset_root / "articles", items):
        sections = document.get("parsed_section") or []
        for ref, position in zip(article_images(document), document.get("image_positions") or []):
            details = sections[position].get("facenet_details")
            if isinstance(details, dict):
                found.setdefault(ref.image_hash, details)
    return found


def _merge(reports: list[FaceReport]) -> dict[str, Any]:
    merged = FaceReport()
    for report in reports:
        merged.done += report.done
        merged.failures += report.failures
        merged.computed += report.computed
        merged.from_documents += report.from_documents
        merged.resumed += report.resumed
        merged.invalid_document_faces += report.invalid_document_faces
        merged.faces_per_image.update(report.faces_per_image)
        merged.truncated += report.truncated
        merged.model_id = merged.model_id or report.model_id
        merged.seconds += report.seconds
        merged.compute_seconds += report.compute_seconds
    return merged.summary()


def materialize_face_features(
    context: AssetExecutionContext, config: FaceFeaturesConfig, settings: PipelineSettings, dataset: str
) -> MaterializeResult:
    dataset_root = settings.dataset_root(dataset)
    face_root = dataset_root / STAGE
    face_config = config.face_config()
    device = settings.torch_device()
    partitions = context.partition_keys if context.has_partition_key_range or context.has_partition_key else [None]

    extractors: list[FaceExtractor] = []

    def shared_extractor() -> FaceExtractor:
        # Built on first need and shared by every partition of this run.
        if not extractors:
            extractors.append(
                FaceExtractor.from_settings(face_config, config.facenet_weights, settings.profile, settings.data_root, device)
            )
        return extractors[0]

    reports = []
    for partition in partitions:
        hashes = read_manifest(dataset_root, "images", partition)["images"]
        items = [(image_hash, dataset_root / "images" / f"{image_hash}.jpg") for image_hash in hashes]
        document_faces = nytimes_facenet_details(dataset_root, partition) if dataset == "nytimes800k" else {}
        context.log.info(
            "faces of %d images of partition %s (%d from documents) on %s", len(items), partition or "all",
            len(document_faces), device,
        )
        report = extract_face_features(
            items,
            face_root,
            face_config,
            shared_extractor,
            document_faces=document_faces,
            write_json=config.write_json,
            json_dtype=config.json_dtype,
        )
        for key, reason in report.failures:
            context.log.warning("image %s: no faces recorded: %s", key, reason)
        write_manifest(
            dataset_root,
            STAGE,
            partition,
            {
                "done": sorted(report.done),
                "failed": [{"image_hash": key, "reason": reason} for key, reason in report.failures],
                "with_faces": report.with_faces,
                "faces": report.faces,
            },
        )
        reports.append(report)

    summary = _merge(reports)
    context.log.info(
        "%d images, %d with faces, %d faces, %.2f images/s", summary["images"], summary["images_with_faces"],
        summary["faces"], summary["images_per_second"],
    )
    fingerprints = {partition: feature_stage_fingerprint(dataset_root, STAGE, partition, face_root / STORE_FOLDER) for partition in partitions}
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            "images": summary["images"],
            "images_with_faces": summary["images_with_faces"],
            "faces": summary["faces"],
            "faces_per_image": MetadataValue.json(summary["faces_per_image"]),
            "images_over_max_faces": summary["images_over_max_faces"],
            "computed": summary["computed"],
            "from_documents": summary["from_documents"],
            "resumed": summary["resumed"],
            "failed": summary["failed"],
            "failed_examples": MetadataValue.json(summary["failed_examples"]),
            "invalid_document_faces": summary["invalid_document_faces"],
            "images_per_second": summary["images_per_second"],
            "seconds": summary["seconds"],
            "model_id": summary["model_id"] or "none needed",
            "device": device,
            "settings": MetadataValue.json(config.model_dump() | {"profile": settings.profile}),
            "store": MetadataValue.path(str(face_root / "store")),
            "partitions": len(partitions),
            **fingerprint_metadata(fingerprints),
        },
    )


_DESCRIPTION = (
    "Faces of each image of {dataset}: MTCNN (facenet-pytorch's weights) finds them, FaceNet embeds up to "
    "max_faces of them, largest first, into the feature store at <data_root>/{dataset}/face_features/store/.{extra}"
)


@asset(
    key=["nytimes800k", STAGE],
    group_name="nytimes800k",
    partitions_def=nytimes_daily_partitions,
    backfill_policy=BACKFILL_POLICY,
    op_tags=GPU_OP_TAGS,
    code_version="1",
    deps=[AssetKey(["nytimes800k", "images"]), AssetKey(["nytimes800k", "articles"])],
    kinds={"pytorch"},
    description=_DESCRIPTION.format(
        dataset="nytimes800k", extra=" Captions that carry facenet_details keep those faces instead."
    ),
)
def nytimes800k_face_features(
    context: AssetExecutionContext, config: FaceFeaturesConfig, settings: PipelineSettings
) -> MaterializeResult:
    return materialize_face_features(context, config, settings, "nytimes800k")


@asset(
    key=["newsimages", STAGE],
    group_name="newsimages",
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    op_tags=GPU_OP_TAGS,
    code_version="1",
    deps=[AssetKey(["newsimages", "images"])],
    kinds={"pytorch"},
    description=_DESCRIPTION.format(dataset="newsimages", extra=""),
)
def newsimages_face_features(
    context: AssetExecutionContext, config: FaceFeaturesConfig, settings: PipelineSettings
) -> MaterializeResult:
    return materialize_face_features(context, config, settings, "newsimages")
