"""The region_features assets of both datasets, materialized with dagster.materialize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dagster import DagsterInstance, materialize

from assets.images import newsimages_images, nytimes800k_images
from assets.region_features import newsimages_region_features, nytimes800k_region_features
from model.manifest import read_manifest
from model.region_json import read_region_json
from model.regions import RegionFeatureReader
from pipelines.resources import PipelineSettings
from test_images_assets import (  # the same fixtures-as-functions, in this folder
    BATCH,
    RANGE_TAGS,
    add_cmyk_photo,
    metadata_of,
    newsimages_2025_rows,
    newsimages_instance,
    write_demo_articles,
    write_newsimages_articles,
)


def test_nytimes_demo_region_features(tmp_path):
    hashes, source, _ = write_demo_articles(tmp_path)
    days = sorted(hashes)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    run_config = {
        "ops": {
            "nytimes800k__images": {"config": {"source_dir": str(source), "download": False}},
            "nytimes800k__region_features": {"config": {"write_json": True, "loader_workers": 1, "batch_size": 2}},
        }
    }
    result = materialize(
        [nytimes800k_images, nytimes800k_region_features],
        resources={"settings": settings},
        run_config=run_config,
        tags={RANGE_TAGS[0]: days[0], RANGE_TAGS[1]: days[1]},
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    root = tmp_path / "nytimes800k"
    all_hashes = sorted(set(hashes[days[0]]) | set(hashes[days[1]]))
    for day in days:
        manifest = read_manifest(root, "region_features", day)
        assert manifest["done"] == sorted(set(hashes[day]))
        assert manifest["failed"] == []
        assert manifest["feature_dim"] == 256

    reader = RegionFeatureReader(root)
    assert reader.feature_dim == 256
    assert reader.keys() == all_hashes
    first = reader.get(all_hashes[0])
    assert first["roi_features"].shape == (36, 256)
    assert first["normalized_boxes"].shape == (36, 4)
    assert (first["image_width"], first["image_height"]) == (320, 240)
    from_json = read_region_json(root / "region_features" / "json" / f"{all_hashes[0]}.json")
    assert np.array_equal(from_json.roi_features, first["roi_features"])
    assert (tmp_path / "models" / "tiny" / "frcnn" / "model.pt").is_file()
    extractor = json.loads((root / "region_features" / "extractor.json").read_text())
    assert extractor["architecture"] == "tiny_convnet"

    metadata = metadata_of(result, "nytimes800k__region_features")
    assert metadata["images_done"] == len(all_hashes)
    assert metadata["images_failed"] == 0
    assert metadata["feature_dim"] == 256
    assert metadata["backend"] == "torchvision"
    assert metadata["images_per_second"] > 0
    assert set(metadata["weights_sha256"]) == {"config.json", "model.pt"}
    assert metadata["attributes"].startswith("none")

    # A second run finds everything stored and extracts nothing.
    again = materialize(
        [nytimes800k_region_features],
        resources={"settings": settings},
        run_config={"ops": {"nytimes800k__region_features": {"config": {"write_json": True, "loader_workers": 0}}}},
        partition_key=days[0],
        instance=DagsterInstance.ephemeral(),
    )
    repeat = metadata_of(again, "nytimes800k__region_features")
    assert repeat["images_done"] == 0
    assert repeat["images_skipped"] == len(set(hashes[days[0]]))


def test_base_profile_without_weights_fails(tmp_path):
    hashes, source, _ = write_demo_articles(tmp_path, n_days=1)
    day = sorted(hashes)[0]
    settings = PipelineSettings(data_root=str(tmp_path), profile="base", device="cpu")
    result = materialize(
        [nytimes800k_images, nytimes800k_region_features],
        resources={"settings": settings},
        run_config={"ops": {"nytimes800k__images": {"config": {"source_dir": str(source), "download": False}}}},
        partition_key=day,
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failures = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    error, messages = failures[0].step_failure_data.error, []
    while error is not None:  # Dagster wraps the asset's exception in its own
        messages.append(error.message)
        error = error.cause
    assert any("set the region_features 'weights' setting" in message for message in messages), messages
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "nytimes800k" / "region_features" / "store").exists()


def test_newsimages_2025_region_features(shared_data, tmp_path):
    rows, photos = newsimages_2025_rows(shared_data)
    source = tmp_path / "release" / "images"
    source.mkdir(parents=True)
    for row in rows:
        (source / f"{row['image_id']}.jpg").symlink_to(photos / f"{row['image_id']}.jpg")
    cmyk_key = add_cmyk_photo(photos, source, rows)
    write_newsimages_articles(tmp_path, rows)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    run_config = {
        "ops": {
            "newsimages__images": {"config": {"source_dir": str(source), "download": False}},
            "newsimages__region_features": {"config": {"loader_workers": 0, "batch_size": 4, "images_per_write": 4}},
        }
    }
    instance = newsimages_instance()
    result = materialize(
        [newsimages_images, newsimages_region_features],
        resources={"settings": settings},
        run_config=run_config,
        partition_key=BATCH,
        instance=instance,
    )
    assert result.success
    root = tmp_path / "newsimages"
    keys = sorted(row["image_id"] for row in rows)
    manifest = read_manifest(root, "region_features", BATCH)
    assert manifest["done"] == keys
    assert manifest["failed"] == []
    reader = RegionFeatureReader(root)
    cmyk = reader.get(cmyk_key)
    original = reader.get(rows[0]["image_id"])
    assert (cmyk["image_width"], cmyk["image_height"]) == (original["image_width"], original["image_height"])
    assert np.all(cmyk["normalized_boxes"] <= 1.0)

    # A photo damaged on disk after the images stage: recorded as a failure, the rest kept.
    damaged = keys[1]
    image_path = root / "images" / f"{damaged}.jpg"
    data = image_path.read_bytes()
    image_path.unlink()  # it may be a hard link to the release file: replace, never edit in place
    image_path.write_bytes(data[: len(data) // 3])
    retry = materialize(
        [newsimages_region_features],
        resources={"settings": settings},
        run_config={"ops": {"newsimages__region_features": {"config": {"overwrite": True, "loader_workers": 0}}}},
        partition_key=BATCH,
        instance=instance,
    )
    assert retry.success
    manifest = read_manifest(root, "region_features", BATCH)
    assert manifest["failed"][0]["image_hash"] == damaged
    assert "truncated" in manifest["failed"][0]["reason"]
    assert damaged not in manifest["done"]
    assert len(manifest["done"]) == len(keys) - 1
    metadata = metadata_of(retry, "newsimages__region_features")
    assert metadata["images_failed"] == 1
    assert metadata["failed_examples"][0]["image_hash"] == damaged


def test_precomputed_backend_asset(tmp_path):
    """Features from the original scripts (.jpg-named JSON files) fill the store unchanged."""
    hashes, source, _ = write_demo_articles(tmp_path, n_days=1)
    day = sorted(hashes)[0]
    first_root = tmp_path / "first"
    settings = PipelineSettings(data_root=str(first_root), profile="tiny", device="cpu")
    # Extract once with the tiny detector and keep the JSON layout as "original" files.
    import shutil

    shutil.copytree(tmp_path / "nytimes800k", first_root / "nytimes800k")
    config = {
        "nytimes800k__images": {"config": {"source_dir": str(source), "download": False}},
        "nytimes800k__region_features": {"config": {"write_json": True, "loader_workers": 0}},
    }
    materialize(
        [nytimes800k_images, nytimes800k_region_features],
        resources={"settings": settings},
        run_config={"ops": config},
        partition_key=day,
        instance=DagsterInstance.ephemeral(),
    )
    original = tmp_path / "original_features"
    original.mkdir()
    for path in (first_root / "nytimes800k" / "region_features" / "json").glob("*.json"):
        shutil.copy(path, original / f"{path.stem}.jpg")

    settings = PipelineSettings(data_root=str(tmp_path), profile="base", device="cpu")
    config["nytimes800k__region_features"] = {"config": {"backend": "precomputed", "precomputed_dir": str(original)}}
    result = materialize(
        [nytimes800k_images, nytimes800k_region_features],
        resources={"settings": settings},
        run_config={"ops": config},
        partition_key=day,
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    metadata = metadata_of(result, "nytimes800k__region_features")
    assert metadata["backend"] == "precomputed"
    assert metadata["images_done"] == len(set(hashes[day]))
    ours = RegionFeatureReader(tmp_path / "nytimes800k")
    reference = RegionFeatureReader(first_root / "nytimes800k")
    for key in reference.keys():
        assert np.array_equal(ours.get(key)["roi_features"], reference.get(key)["roi_features"])
        assert ours.get(key)["n_regions"] == reference.get(key)["n_regions"]
    assert not (tmp_path / "models").exists()
