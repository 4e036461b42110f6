"""``<dataset>/images``: every article image as ``<data_root>/<dataset>/images/<hash>.jpg``."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import os
from pathlib import Path
from typing import Optional

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from assets.partitions import BACKFILL_POLICY, newsimages_batch_partitions, nytimes_daily_partitions
from model.documents import article_images, iter_articles
from model.download import FetchReport, FetchSettings, ImageTask, fetch_images, write_status_table
from model.fingerprint import image_files_fingerprint
from model.image_io import DEFAULT_MAX_PIXELS
from model.manifest import UNPARTITIONED, read_manifest, write_manifest
from model.storage import check_safe_id
from pipelines.resources import PipelineSettings

STAGE = "images"
STATUS_DIR = "_status"
EXAMPLES = 10


class ImagesConfig(Config):
    source_dir: Optional[str] = Field(
        default_factory=lambda: os.environ.get("NEWSLXMERT_IMAGE_SOURCE_DIR") or None,
        description=(
            "local folder holding the images: <hash>.jpg (NYTimes800k's images/ folder, the demo's images/), "
            "or the document's image_file name (NewsImages). Images not found there are downloaded from their URL."
        ),
    )
    download: bool = Field(default=True, description="download images that are not in source_dir from their http(s) URL")
    max_concurrent_downloads: int = Field(default=8, ge=1, description="downloads running at the same time")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="seconds to wait for a connection")
    read_timeout_s: float = Field(default=30.0, gt=0, description="seconds to wait for the next bytes of a response")
    total_timeout_s: float = Field(default=120.0, gt=0, description="seconds one download attempt may take in all")
    retries: int = Field(default=3, ge=0, description="extra attempts after timeouts, connection errors, HTTP 429 and 5xx")
    backoff_s: float = Field(default=1.0, ge=0, description="wait before retry k is backoff_s * 2**k seconds")
    max_bytes: int = Field(default=50 * 1024 * 1024, gt=0, description="largest accepted image file, in bytes")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="largest accepted image, in pixels (decompression-bomb guard)")
    link_local_files: bool = Field(
        default=True, description="hard-link files from source_dir instead of copying them (copies across file systems)"
    )

    def fetch_settings(self) -> FetchSettings:
        return FetchSettings(
            source_dir=Path(self.source_dir) if self.source_dir else None,
            download=self.download,
            max_workers=self.max_concurrent_downloads,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            total_timeout_s=self.total_timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            link=self.link_local_files,
        )


def partition_image_tasks(dataset_root: Path, partition: Optional[str]) -> tuple[list[ImageTask], list[dict]]:
    """Return the image tasks of a partition's articles, and failures of malformed documents."""
    items = [tuple(item) for item in read_manifest(dataset_root, "articles", partition)["articles"]]
    tasks, failures = [], []
    for split, document in iter_articles(dataset_root / "articles", items):
        try:
            refs = article_images(document)
        except ValueError as error:
            failures.append({"image_hash": "", "aid": str(document.get("_id", "")), "reason": str(error)})
            continue
        for ref in refs:
            tasks.append(ImageTask(image_hash=ref.image_hash, aid=ref.aid, url=ref.url, local_name=ref.local_name))
    return tasks, failures


def status_table_path(dataset_root: Path, partition: Optional[str]) -> Path:
    name = check_safe_id(partition or UNPARTITIONED)
    return dataset_root / STAGE / STATUS_DIR / f"{name}.parquet"


def materialize_images(
    context: AssetExecutionContext, config: ImagesConfig, settings: PipelineSettings, dataset: str
) -> MaterializeResult:
    dataset_root = settings.dataset_root(dataset)
    images_dir = dataset_root / STAGE
    fetch_settings = config.fetch_settings()
    if fetch_settings.source_dir is not None and not fetch_settings.source_dir.is_dir():
        raise FileNotFoundError(f"image source_dir {fetch_settings.source_dir} is not a folder; fix the images config")
    partitions = context.partition_keys if context.has_partition_key_range or context.has_partition_key else [None]

    all_rows, document_failures, seconds, status_paths = [], [], 0.0, []
    for partition in partitions:
        tasks, bad_documents = partition_image_tasks(dataset_root, partition)
        context.log.info(
            "gathering %d images of partition %s (source %s, downloads %s)",
            len(tasks), partition or UNPARTITIONED, fetch_settings.source_dir or "none", "on" if fetch_settings.download else "off",
        )
        report = fetch_images(tasks, images_dir, fetch_settings)
        failed = report.failures + bad_documents
        for failure in failed:
            context.log.warning("image %s of article %s failed: %s", failure["image_hash"] or "?", failure["aid"], failure["reason"])
        status_paths.append(write_status_table(status_table_path(dataset_root, partition), report.rows))
        write_manifest(dataset_root, STAGE, partition, {"images": report.ok_hashes, "failed": failed})
        all_rows += report.rows
        document_failures += bad_documents
        seconds += report.seconds

    merged = FetchReport(rows=all_rows, seconds=seconds)
    summary = merged.summary()
    failures = merged.failures + document_failures
    skipped_examples = [row["image_hash"] for row in merged.by_status("skipped")][:EXAMPLES]
    context.log.info(
        "%d images: %d fetched, %d already present, %d failed in %.1fs",
        summary["images"], summary["ok"], summary["skipped"], len(failures), seconds,
    )
    fingerprints = {partition: image_files_fingerprint(dataset_root, partition) for partition in partitions}
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            "images": summary["images"],
            "fetched": summary["ok"],
            "copied_local": summary["copied_local"],
            "downloaded": summary["downloaded"],
            "downloaded_bytes": summary["downloaded_bytes"],
            "skipped_existing": summary["skipped"],
            "skipped_examples": MetadataValue.json(skipped_examples),
            "failed": len(failures),
            "failed_examples": MetadataValue.json(failures[:EXAMPLES]),
            "seconds": summary["seconds"],
            "images_per_second": summary["images_per_second"],
            "path": MetadataValue.path(str(images_dir)),
            "status_table": MetadataValue.path(str(status_paths[-1])) if status_paths else "none",
            "partitions": len(partitions),
            "settings": MetadataValue.json(config.model_dump()),
            **fingerprint_metadata(fingerprints),
        },
    )


_DESCRIPTION = (
    "Images of the {dataset} articles as <data_root>/{dataset}/images/<hash>.jpg, copied from source_dir when "
    "the file is there, else downloaded from the document's URL (bounded concurrency, timeouts, retries, size "
    "and decode checks). Per-item status: images/_status/<partition>.parquet; the partition's images and "
    "failures: images/_manifests/<partition>.json. Files already present are skipped."
)


@asset(
    key=["nytimes800k", STAGE],
    group_name="nytimes800k",
    partitions_def=nytimes_daily_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    deps=[AssetKey(["nytimes800k", "articles"])],
    kinds={"image"},
    description=_DESCRIPTION.format(dataset="nytimes800k"),
)
def nytimes800k_images(context: AssetExecutionContext, config: ImagesConfig, settings: PipelineSettings) -> MaterializeResult:
    return materialize_images(context, config, settings, "nytimes800k")


@asset(
    key=["newsimages", STAGE],
    group_name="newsimages",
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    deps=[AssetKey(["newsimages", "articles"])],
    kinds={"image"},
    description=_DESCRIPTION.format(dataset="newsimages"),
)
def newsimages_images(context: AssetExecutionContext, config: ImagesConfig, settings: PipelineSettings) -> MaterializeResult:
    return materialize_images(context, config, settings, "newsimages")
