"""The images assets of both datasets, materialized with dagster.materialize."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize
from PIL import Image

from assets.images import newsimages_images, nytimes800k_images
from model.demo_corpus import generate_demo_corpus, write_demo_files
from model.manifest import read_manifest, write_manifest
from model.storage import atomic_write_bytes, canonical_json
from pipelines.resources import PipelineSettings

RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")
BATCH = "batch-1"


def metadata_of(result, node: str) -> dict:
    events = result.asset_materializations_for_node(node)
    return {key: value.value for key, value in events[0].metadata.items()}


def write_demo_articles(data_root: Path, n_days: int = 2) -> tuple[dict[str, list[str]], Path, dict]:
    """Export demo articles of ``n_days`` days as files with manifests; return image hashes by day."""
    corpus = generate_demo_corpus(n_articles=3 * n_days, n_days=n_days, seed=5, start_date=dt.date(2024, 1, 1))
    paths = write_demo_files(corpus, data_root / "demo")
    root = data_root / "nytimes800k"
    by_day: dict[str, list] = {}
    hashes: dict[str, list[str]] = {}
    for document in corpus.documents:
        document = json.loads(canonical_json(document))
        day = document["pub_date"][:10]
        atomic_write_bytes(root / "articles" / document["split"] / f"{document['_id']}.json", canonical_json(document).encode())
        by_day.setdefault(day, []).append([document["split"], document["_id"]])
        hashes.setdefault(day, []).extend(section["hash"] for section in document["parsed_section"] if "hash" in section)
    for day, items in by_day.items():
        write_manifest(root, "articles", day, {"articles": sorted(items)})
    return hashes, paths["images"], {d["_id"]: d for d in (json.loads(canonical_json(x)) for x in corpus.documents)}


def test_nytimes_demo_images_range(tmp_path):
    hashes, source, documents = write_demo_articles(tmp_path)
    days = sorted(hashes)
    missing = hashes[days[1]][0]
    (source / f"{missing}.jpg").unlink()  # one image the source folder lacks
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    run_config = {"ops": {"nytimes800k__images": {"config": {"source_dir": str(source), "download": False}}}}

    result = materialize(
        [nytimes800k_images],
        resources={"settings": settings},
        run_config=run_config,
        tags={RANGE_TAGS[0]: days[0], RANGE_TAGS[1]: days[1]},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    root = tmp_path / "nytimes800k"
    first = read_manifest(root, "images", days[0])
    assert first["images"] == sorted(set(hashes[days[0]]))
    assert first["failed"] == []
    second = read_manifest(root, "images", days[1])
    assert missing not in second["images"]
    assert len(second["failed"]) == 1
    failure = second["failed"][0]
    assert failure["image_hash"] == missing
    assert failure["aid"] in documents
    assert "not in source folder" in failure["reason"]
    assert "downloads are off" in failure["reason"]
    for image_hash in first["images"] + second["images"]:
        assert (root / "images" / f"{image_hash}.jpg").is_file()

    table = pq.read_table(root / "images" / "_status" / f"{days[1]}.parquet").to_pylist()
    assert {row["image_hash"] for row in table} == set(hashes[days[1]])
    assert {row["status"] for row in table} == {"ok", "failed"}

    metadata = metadata_of(result, "nytimes800k__images")
    total = len(set(hashes[days[0]])) + len(set(hashes[days[1]]))
    assert metadata["images"] == total
    assert metadata["fetched"] == total - 1
    assert metadata["copied_local"] == total - 1
    assert metadata["failed"] == 1
    assert metadata["failed_examples"][0]["image_hash"] == missing
    assert metadata["partitions"] == 2
    assert metadata["images_per_second"] > 0

    again = materialize(
        [nytimes800k_images],
        resources={"settings": settings},
        run_config=run_config,
        partition_key=days[0],
        instance=DagsterInstance.ephemeral(),
    )
    repeat = metadata_of(again, "nytimes800k__images")
    assert repeat["fetched"] == 0
    assert repeat["skipped_existing"] == len(set(hashes[days[0]]))
    assert read_manifest(root, "images", days[0]) == first


class PhotoServer:
    """Serves the given files by name on 127.0.0.1; every other path is a 404."""

    def __init__(self, files: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_newsimages_articles(data_root: Path, rows: list[dict]) -> None:
    """NewsImages documents as the NewsImages ingestion writes them: one image each."""
    root = data_root / "newsimages"
    items = []
    for row in rows:
        document = {
            "_id": row["article_id"],
            "split": "test",
            "title": row.get("article_title", ""),
            "image_hash": row["image_id"],
            "image_url": row["image_url"],
        }
        if row.get("image_file"):
            document["image_file"] = row["image_file"]
        atomic_write_bytes(root / "articles" / "test" / f"{row['article_id']}.json", canonical_json(document).encode())
        items.append(["test", row["article_id"]])
    write_manifest(root, "articles", BATCH, {"articles": sorted(items)})


def newsimages_instance() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", [BATCH])
    return instance


def test_newsimages_demo_download_and_regions(tmp_path):
    """Demo photos served over HTTP become NewsImages images, then region features."""
    from assets.region_features import newsimages_region_features
    from model.regions import RegionFeatureReader

    corpus = generate_demo_corpus(n_articles=3, seed=2)
    photos = dict(list(corpus.images.items())[:2])
    server = PhotoServer({f"{key}.jpg": data for key, data in photos.items()} | {"page.jpg": b"<html>moved</html>"})
    try:
        rows = [{"article_id": f"a{i}", "image_id": key, "image_url": server.base + f"{key}.jpg"} for i, key in enumerate(photos)]
        rows.append({"article_id": "a404", "image_id": "GONE", "image_url": server.base + "gone.jpg"})
        rows.append({"article_id": "ahtml", "image_id": "PAGE", "image_url": server.base + "page.jpg"})
        write_newsimages_articles(tmp_path, rows)
        settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
        result = materialize(
            [newsimages_images, newsimages_region_features],
            resources={"settings": settings},
            run_config={
                "ops": {
                    "newsimages__images": {"config": {"retries": 0, "read_timeout_s": 5.0}},
                    "newsimages__region_features": {"config": {"loader_workers": 0}},
                }
            },
            partition_key=BATCH,
            instance=newsimages_instance(),
        )
    finally:
        server.close()
    assert result.success
    manifest = read_manifest(tmp_path / "newsimages", "images", BATCH)
    assert manifest["images"] == sorted(photos)
    reasons = {failure["image_hash"]: failure for failure in manifest["failed"]}
    assert "HTTP 404" in reasons["GONE"]["reason"]
    assert reasons["GONE"]["aid"] == "a404"
    assert "HTML page" in reasons["PAGE"]["reason"]
    for key, data in photos.items():
        assert (tmp_path / "newsimages" / "images" / f"{key}.jpg").read_bytes() == data
    metadata = metadata_of(result, "newsimages__images")
    assert metadata["downloaded"] == 2
    assert metadata["downloaded_bytes"] == sum(len(d) for d in photos.values())
    assert metadata["failed"] == 2
    regions = read_manifest(tmp_path / "newsimages", "region_features", BATCH)
    assert regions["done"] == sorted(photos)
    reader = RegionFeatureReader(tmp_path / "newsimages")
    assert reader.get(sorted(photos)[0])["roi_features"].shape == (36, reader.feature_dim)


def newsimages_2025_rows(shared_data: Path, count: int = 10) -> tuple[list[dict], Path]:
    """A seeded sample of the real NewsImages 2025 rows whose photos are present."""
    folder = shared_data / "newsimages-2025"
    photos = folder / "images"
    if not (folder / "newsarticles.csv").is_file() or not photos.is_dir():
        pytest.skip(f"newsimages-2025 CSV or photos not found in {folder}")
    with open(folder / "newsarticles.csv", encoding="utf-8-sig", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if (photos / f"{row['image_id']}.jpg").is_file()]
    cmyk = [row for row in rows if Image.open(photos / f"{row['image_id']}.jpg").mode == "CMYK"]
    sample = random.Random(0).sample(rows, count)
    return sample + [row for row in cmyk if row not in sample], photos


def add_cmyk_photo(shared_photos: Path, source: Path, rows: list[dict]) -> str:
    """Add a CMYK JPEG made from a real photo, so that the CMYK path runs whatever the sample holds."""
    image = Image.open(shared_photos / f"{rows[0]['image_id']}.jpg").convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    (source / "CMYKCOPY.jpg").write_bytes(buffer.getvalue())
    rows.append({"article_id": "cmyk-copy", "image_id": "CMYKCOPY", "image_url": "http://127.0.0.1:9/unused.jpg"})
    return "CMYKCOPY"


def test_newsimages_2025_images(shared_data, tmp_path):
    rows, photos = newsimages_2025_rows(shared_data)
    # The source folder keeps the release's own names; image_file maps a document to its photo.
    source = tmp_path / "release" / "images"
    source.mkdir(parents=True)
    for row in rows:
        (source / f"{row['image_id']}.jpg").symlink_to(photos / f"{row['image_id']}.jpg")
        row["image_file"] = f"{row['image_id']}.jpg"
    cmyk_key = add_cmyk_photo(photos, source, rows)
    write_newsimages_articles(tmp_path, rows)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    result = materialize(
        [newsimages_images],
        resources={"settings": settings},
        run_config={"ops": {"newsimages__images": {"config": {"source_dir": str(source), "download": False}}}},
        partition_key=BATCH,
        instance=newsimages_instance(),
    )
    assert result.success
    manifest = read_manifest(tmp_path / "newsimages", "images", BATCH)
    assert manifest["failed"] == []
    assert manifest["images"] == sorted(row["image_id"] for row in rows)
    assert cmyk_key in manifest["images"]
    metadata = metadata_of(result, "newsimages__images")
    assert metadata["copied_local"] == len(rows)
    assert metadata["downloaded"] == 0
