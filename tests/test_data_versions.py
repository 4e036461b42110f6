"""Data versions of the assets, and the staleness Dagster derives from them.

Each test materializes real assets (tiny profile, a handful of demo articles) into one
Dagster instance and queries Dagster's own stale-status resolver, which the UI uses too.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

from dagster import AssetKey, DagsterInstance, materialize
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleCauseCategory, StaleStatus
from dagster._time import get_current_datetime
from PIL import Image

from assets.images import nytimes800k_images
from assets.index import nytimes800k_index
from assets.newsimages import newsimages_articles, newsimages_raw_articles, register_newsimages_batches
from assets.nytimes_articles import nytimes800k_articles
from assets.region_features import nytimes800k_region_features
from model.demo_corpus import generate_demo_corpus, insert_demo_documents, write_demo_files
from model.documents import article_images
from model.fingerprint import image_files_fingerprint
from model.manifest import read_manifest, write_manifest
from model.storage import atomic_write_bytes, canonical_json
from pipelines.resources import MongoResource, PipelineSettings
from test_images_assets import RANGE_TAGS, metadata_of, write_demo_articles

DAY = "2024-01-01"
NYT_ARTICLES = AssetKey(["nytimes800k", "articles"])
NYT_IMAGES = AssetKey(["nytimes800k", "images"])
NYT_REGIONS = AssetKey(["nytimes800k", "region_features"])
NYT_INDEX = AssetKey(["nytimes800k", "index"])
RAW_ARTICLES = AssetKey(["newsimages", "raw_articles"])
NEWSIMAGES_ARTICLES = AssetKey(["newsimages", "articles"])


def stale_resolver(instance: DagsterInstance, assets: list) -> CachingStaleStatusResolver:
    """A new resolver (it caches results) over ``assets``, as the UI builds one per request."""
    asset_graph = AssetGraph.from_assets(assets)
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


def current_version(instance: DagsterInstance, assets: list, key: AssetKey, partition: str | None) -> str:
    return stale_resolver(instance, assets).get_current_data_version(key, partition).value


def status(instance: DagsterInstance, assets: list, key: AssetKey, partition: str | None) -> StaleStatus:
    return stale_resolver(instance, assets).get_status(key, partition)


def data_causes(instance: DagsterInstance, assets: list, key: AssetKey, partition: str | None) -> list:
    """The upstream assets whose new data makes ``key`` stale."""
    causes = stale_resolver(instance, assets).get_stale_causes(key, partition)
    return [cause.dependency.asset_key for cause in causes if cause.category == StaleCauseCategory.DATA]


def op_config(selection: list, configs: dict) -> dict:
    """The run config of the selected assets only: Dagster rejects config for ops outside the run."""
    names = {asset.op.name for asset in selection}
    return {"ops": {name: {"config": config} for name, config in configs.items() if name in names}}


def materialize_tiny(assets: list, selection: list, instance, data_root, configs: dict, partition_key=None, resources=None):
    """Materialize ``selection`` of ``assets`` with the tiny profile on the CPU, assert success and return the result."""
    result = materialize(
        assets,
        selection=selection,
        resources={"settings": PipelineSettings(data_root=str(data_root), profile="tiny", device="cpu"), **(resources or {})},
        run_config=op_config(selection, configs),
        partition_key=partition_key,
        instance=instance,
    )
    assert result.success
    return result


def fingerprint_of(result, node: str) -> str:
    return metadata_of(result, node)["data_fingerprint"]


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- NYTimes800k


def test_new_article_marks_images_stale(tmp_path):
    corpus = generate_demo_corpus(n_articles=6, n_days=2, seed=5, start_date=dt.date(2024, 1, 1))
    source = write_demo_files(corpus, tmp_path / "demo")["images"]
    first_day = [document for document in corpus.documents if document["pub_date"].date().isoformat() == DAY]
    late_article = first_day[-1]
    with MongoResource(data_root=str(tmp_path)).open_collection() as collection:
        insert_demo_documents(collection, [document for document in corpus.documents if document is not late_article])
    assets = [nytimes800k_articles, nytimes800k_images]
    instance = DagsterInstance.ephemeral()

    def run(selection):
        return materialize_tiny(
            assets, selection, instance, tmp_path,
            {"nytimes800k__images": {"source_dir": str(source), "download": False}},
            partition_key=DAY,
            resources={"nytimes_mongo": MongoResource(data_root=str(tmp_path))},
        )

    first = run(assets)
    articles_version = current_version(instance, assets, NYT_ARTICLES, DAY)
    images_version = current_version(instance, assets, NYT_IMAGES, DAY)

    # An export of the same documents records the same version, so images stay fresh.
    again = run([nytimes800k_articles])
    assert fingerprint_of(first, "nytimes800k__articles") == articles_version
    assert fingerprint_of(again, "nytimes800k__articles") == articles_version
    assert current_version(instance, assets, NYT_ARTICLES, DAY) == articles_version
    assert status(instance, assets, NYT_IMAGES, DAY) == StaleStatus.FRESH

    # One more article that day: a new version, and images become stale.
    with MongoResource(data_root=str(tmp_path)).open_collection() as collection:
        insert_demo_documents(collection, [late_article])
    grown = run([nytimes800k_articles])
    assert metadata_of(grown, "nytimes800k__articles")["exported"] == len(first_day)
    assert current_version(instance, assets, NYT_ARTICLES, DAY) != articles_version
    assert status(instance, assets, NYT_IMAGES, DAY) == StaleStatus.STALE
    assert data_causes(instance, assets, NYT_IMAGES, DAY) == [NYT_ARTICLES]

    # Materializing images again takes the new article's images and makes them fresh.
    run([nytimes800k_images])
    assert current_version(instance, assets, NYT_IMAGES, DAY) != images_version
    assert status(instance, assets, NYT_IMAGES, DAY) == StaleStatus.FRESH


def test_changed_image_marks_regions_stale(tmp_path):
    hashes, source, _ = write_demo_articles(tmp_path, n_days=1)
    assets = [nytimes800k_images, nytimes800k_region_features]
    instance = DagsterInstance.ephemeral()

    def run(selection, overwrite=False):
        configs = {
            "nytimes800k__images": {"source_dir": str(source), "download": False},
            "nytimes800k__region_features": {"loader_workers": 0, "overwrite": overwrite},
        }
        return materialize_tiny(assets, selection, instance, tmp_path, configs, partition_key=DAY)

    first = run(assets)
    images_version = current_version(instance, assets, NYT_IMAGES, DAY)
    regions_version = current_version(instance, assets, NYT_REGIONS, DAY)
    assert fingerprint_of(first, "nytimes800k__images") == images_version
    assert fingerprint_of(first, "nytimes800k__region_features") == regions_version

    # Unchanged images and stored regions record the same versions, and regions stay fresh.
    run([nytimes800k_images])
    skipped = run([nytimes800k_region_features])
    assert metadata_of(skipped, "nytimes800k__region_features")["images_skipped"] == len(set(hashes[DAY]))
    assert current_version(instance, assets, NYT_IMAGES, DAY) == images_version
    assert current_version(instance, assets, NYT_REGIONS, DAY) == regions_version
    assert status(instance, assets, NYT_REGIONS, DAY) == StaleStatus.FRESH

    # The source replaces one photo under the same hash and the old copy is removed.
    replaced = read_manifest(tmp_path / "nytimes800k", "images", DAY)["images"][0]
    atomic_write_bytes(source / f"{replaced}.jpg", jpeg((200, 30, 30)))
    (tmp_path / "nytimes800k" / "images" / f"{replaced}.jpg").unlink()
    run([nytimes800k_images])
    assert current_version(instance, assets, NYT_IMAGES, DAY) != images_version
    assert status(instance, assets, NYT_REGIONS, DAY) == StaleStatus.STALE
    assert data_causes(instance, assets, NYT_REGIONS, DAY) == [NYT_IMAGES]

    # Extracting the regions again writes new rows: a new version, and fresh again.
    run([nytimes800k_region_features], overwrite=True)
    assert current_version(instance, assets, NYT_REGIONS, DAY) != regions_version
    assert status(instance, assets, NYT_REGIONS, DAY) == StaleStatus.FRESH


def test_range_run_records_one_version(tmp_path):
    hashes, source, _ = write_demo_articles(tmp_path, n_days=2)
    days = sorted(hashes)
    instance = DagsterInstance.ephemeral()

    result = materialize(
        [nytimes800k_images],
        resources={"settings": PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")},
        run_config={"ops": {"nytimes800k__images": {"config": {"source_dir": str(source), "download": False}}}},
        tags={RANGE_TAGS[0]: days[0], RANGE_TAGS[1]: days[1]},
        instance=instance,
    )

    assert result.success
    metadata = metadata_of(result, "nytimes800k__images")
    per_day = {day: image_files_fingerprint(tmp_path / "nytimes800k", day) for day in days}
    assert metadata["partition_fingerprints"] == per_day
    assert per_day[days[0]] != per_day[days[1]]
    # Dagster stores the run's one version on both partitions.
    recorded = {day: current_version(instance, [nytimes800k_images], NYT_IMAGES, day) for day in days}
    assert recorded == {day: metadata["data_fingerprint"] for day in days}

    # A run of one of those days alone records that day's own fingerprint, although nothing changed.
    materialize_tiny(
        [nytimes800k_images], [nytimes800k_images], instance, tmp_path,
        {"nytimes800k__images": {"source_dir": str(source), "download": False}},
        partition_key=days[0],
    )
    assert current_version(instance, [nytimes800k_images], NYT_IMAGES, days[0]) == per_day[days[0]]
    assert per_day[days[0]] != metadata["data_fingerprint"]


def test_index_version_follows_pairs(tmp_path):
    root = tmp_path / "nytimes800k"
    items, hashes = [], []
    for document in generate_demo_corpus(n_articles=6, seed=3).documents:
        document = json.loads(canonical_json(document))
        atomic_write_bytes(root / "articles" / document["split"] / f"{document['_id']}.json", canonical_json(document).encode())
        items.append([document["split"], document["_id"]])
        hashes += [ref.image_hash for ref in article_images(document)]
    write_manifest(root, "articles", DAY, {"articles": sorted(items)})
    write_manifest(root, "face_features", DAY, {"done": sorted(hashes), "failed": []})
    write_manifest(root, "region_features", DAY, {"done": sorted(hashes), "failed": [], "feature_dim": 32})
    instance = DagsterInstance.ephemeral()

    def run():
        assets = [nytimes800k_index]
        materialize_tiny(assets, assets, instance, tmp_path, {"nytimes800k__index": {"max_dropped_share": 1.0}})
        return current_version(instance, assets, NYT_INDEX, None)

    first = run()
    rebuilt = run()
    failed = sorted(hashes)[0]
    region_manifest = {"done": sorted(hashes)[1:], "failed": [{"image_hash": failed, "reason": "decode"}], "feature_dim": 32}
    write_manifest(root, "region_features", DAY, region_manifest)
    one_pair_dropped = run()

    assert rebuilt == first
    assert one_pair_dropped != first


# --------------------------------------------------------------------------- NewsImages


def test_new_source_row_marks_export_stale(tmp_path):
    write_demo_files(generate_demo_corpus(n_articles=4, n_days=1), tmp_path / "demo")
    source = tmp_path / "demo" / "newsimages"
    (tsv,) = sorted(source.glob("*.tsv"))
    full_text = tsv.read_bytes()
    atomic_write_bytes(tsv, full_text[: full_text.rstrip(b"\r\n").rfind(b"\r\n") + 2])  # the last row comes later
    assets = [newsimages_raw_articles, newsimages_articles]
    instance = DagsterInstance.ephemeral()
    (batch,) = register_newsimages_batches(instance, source)

    def run(selection):
        return materialize_tiny(
            assets, selection, instance, tmp_path,
            {"newsimages__raw_articles": {"source_dir": str(source)}},
            partition_key=batch,
            resources={"newsimages_mongo": MongoResource(data_root=str(tmp_path), database="newsimages", collection="articles")},
        )

    first = run(assets)
    assert metadata_of(first, "newsimages__raw_articles")["documents"] == 3
    raw_version = current_version(instance, assets, RAW_ARTICLES, batch)
    assert fingerprint_of(first, "newsimages__raw_articles") == raw_version

    # Loading the same file again changes nothing, so the export stays fresh.
    run([newsimages_raw_articles])
    assert current_version(instance, assets, RAW_ARTICLES, batch) == raw_version
    assert status(instance, assets, NEWSIMAGES_ARTICLES, batch) == StaleStatus.FRESH

    # The batch file gains its last row.
    atomic_write_bytes(tsv, full_text)
    grown = run([newsimages_raw_articles])
    assert metadata_of(grown, "newsimages__raw_articles")["inserted"] == 1
    assert current_version(instance, assets, RAW_ARTICLES, batch) != raw_version
    assert status(instance, assets, NEWSIMAGES_ARTICLES, batch) == StaleStatus.STALE
    assert data_causes(instance, assets, NEWSIMAGES_ARTICLES, batch) == [RAW_ARTICLES]
