"""Asset checks on stage outputs, over real feature stores, manifests and index files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dagster import AssetCheckSeverity, AssetSelection, DagsterInstance, Definitions, define_asset_job

from assets import checks
from assets.face_features import nytimes800k_face_features
from assets.images import nytimes800k_images
from assets.partitions import nytimes_daily_partitions
from assets.region_features import nytimes800k_region_features
from model.feature_store import FeatureStore
from model.index import IndexedPair, write_split_index
from model.manifest import write_manifest
from model.quality import (
    count_faces,
    failure_share,
    images_in_several_splits,
    scan_nonfinite,
    translation_coverage,
)
from model.storage import canonical_json
from pipelines.resources import PipelineSettings

DAY = "2024-01-02"


def _face_record(key: str, n_faces: int, value: float = 0.5) -> dict:
    embeddings = np.zeros((10, 512), np.float32)
    embeddings[: min(n_faces, 10)] = value
    return {"key": key, "embeddings": embeddings, "n_faces": np.int64(n_faces)}


def _region_record(key: str, value: float = 0.25) -> dict:
    return {"key": key, "roi_features": np.full((36, 8), value, np.float32), "n_regions": np.int64(36)}


def _run_checks(tmp_path, assets_def, check_names: list[str]):
    """Run only the named checks of ``assets_def`` for DAY; return {check name: evaluation}."""
    selected = [item for item in checks.nytimes800k_checks if item.check_key.name in check_names and item.check_key.asset_key == assets_def.key]
    job = define_asset_job("checks_only", selection=AssetSelection.checks(*selected), partitions_def=nytimes_daily_partitions)
    defs = Definitions(
        assets=[assets_def], asset_checks=selected, jobs=[job], resources={"settings": PipelineSettings(data_root=str(tmp_path))}
    )
    # NOTE: execute_in_process(partition_key=...) rejects a run that selects checks but no
    # asset (Dagster 1.13 looks for the partitions on the selected assets), so the run
    # gets its partition through the tag that partition_key would set.
    result = defs.resolve_job_def("checks_only").execute_in_process(
        tags={"dagster/partition": DAY}, instance=DagsterInstance.ephemeral(), raise_on_error=False
    )
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def test_failure_share_counts_examples():
    manifests = [
        {"done": ["a", "b", "c"], "failed": [{"image_hash": "d", "reason": "decode error"}]},
        {"done": ["e"], "failed": []},
    ]

    share = failure_share(manifests, "region_features")

    assert (share.done, share.failed, share.total) == (4, 1, 5)
    assert share.share == pytest.approx(0.2)
    assert share.examples == ["d: decode error"]


def test_failure_share_rejects_unknown_manifest():
    with pytest.raises(ValueError, match="re-materialize"):
        failure_share([{"images": ["a"]}], "region_features")


def test_scan_nonfinite_finds_nan_and_missing(tmp_path):
    store = FeatureStore(tmp_path / "store")
    bad = _region_record("bad")
    bad["roi_features"][3, 1] = np.nan
    store.write([_region_record("good"), bad])

    scan = scan_nonfinite(tmp_path / "store", ["good", "bad", "absent"])

    assert scan.checked == 2
    assert scan.nonfinite == ["bad: roi_features"]
    assert scan.missing == ["absent"]
    assert not scan.passed


def test_count_faces_flags_out_of_range(tmp_path):
    FeatureStore(tmp_path / "store").write([_face_record("a", 0), _face_record("b", 2), _face_record("c", 12)])

    counts = count_faces(tmp_path / "store", ["a", "b", "c"], max_faces=10)

    assert counts.histogram == {0: 1, 2: 1, 12: 1}
    assert counts.out_of_range == ["c: 12"]
    assert counts.mean == pytest.approx(14 / 3)


def test_images_in_several_splits_reads_index(tmp_path):
    write_split_index(tmp_path, "train", [IndexedPair("a1", 0, "h1"), IndexedPair("a2", 0, "h2")])
    write_split_index(tmp_path, "test", [IndexedPair("a3", 0, "h2")])

    assert images_in_several_splits(tmp_path) == {"h2": ["test", "train"]}


def test_translation_coverage_reads_documents(tmp_path):
    root = tmp_path / "translated_articles"
    (root / "train").mkdir(parents=True)
    (root / "train" / "x1.json").write_text(canonical_json({"_id": "x1", "title_en": "A", "text_en": "B"}))
    (root / "train" / "x2.json").write_text(canonical_json({"_id": "x2", "title_en": "A"}))

    coverage = translation_coverage([("train", "x1"), ("train", "x2"), ("train", "x3")], [("train", "x1"), ("train", "x2")], root)

    assert (coverage.articles, coverage.translated) == (3, 2)
    assert coverage.untranslated_examples == ["x3"]
    assert coverage.without_english == ["x2: no text_en"]


def test_checks_are_in_definitions_with_blocking_flags():
    from pipelines.definitions import all_asset_checks

    specs = {spec.key.to_user_string(): spec for checks_def in all_asset_checks for spec in checks_def.check_specs}
    blocking = {name for name, spec in specs.items() if spec.blocking}

    assert "nytimes800k/region_features:features_finite" in blocking
    assert "nytimes800k/face_features:faces_per_image" in blocking
    assert "nytimes800k/images:missing_images_share" in specs
    assert "nytimes800k/images:missing_images_share" not in blocking


def test_missing_images_check_warns_over_threshold(tmp_path):
    root = tmp_path / "nytimes800k"
    failed = [{"image_hash": f"f{i}", "aid": "a", "reason": "HTTP 404"} for i in range(2)]
    write_manifest(root, "images", DAY, {"images": [f"h{i}" for i in range(18)], "failed": failed})

    evaluations = _run_checks(tmp_path, nytimes800k_images, ["missing_images_share"])
    evaluation = evaluations["missing_images_share"]

    assert not evaluation.passed
    assert evaluation.severity == AssetCheckSeverity.WARN
    assert evaluation.metadata["failed"].value == 2
    assert evaluation.metadata["total"].value == 20


def test_region_checks_pass_on_clean_features(tmp_path):
    root = tmp_path / "nytimes800k"
    FeatureStore(root / "region_features" / "store").write([_region_record("h1"), _region_record("h2")])
    write_manifest(root, "region_features", DAY, {"done": ["h1", "h2"], "failed": [], "feature_dim": 8})

    evaluations = _run_checks(tmp_path, nytimes800k_region_features, ["features_finite", "failed_items_share"])

    assert evaluations["features_finite"].passed
    assert evaluations["failed_items_share"].passed
    assert evaluations["features_finite"].metadata["images_checked"].value == 2


def test_nan_features_fail_with_error(tmp_path):
    root = tmp_path / "nytimes800k"
    FeatureStore(root / "region_features" / "store").write([_region_record("h1"), _region_record("h2", value=np.inf)])
    write_manifest(root, "region_features", DAY, {"done": ["h1", "h2"], "failed": [], "feature_dim": 8})

    evaluation = _run_checks(tmp_path, nytimes800k_region_features, ["features_finite"])["features_finite"]

    assert not evaluation.passed
    assert evaluation.severity == AssetCheckSeverity.ERROR
    assert evaluation.metadata["nonfinite_examples"].value == ["h2: roi_features"]


def test_faces_per_image_check_blocks_overfull_images(tmp_path):
    root = tmp_path / "nytimes800k"
    FeatureStore(root / "face_features" / "store").write([_face_record("h1", 1), _face_record("h2", 11)])
    write_manifest(root, "face_features", DAY, {"done": ["h1", "h2"], "failed": [], "with_faces": 2, "faces": 12})

    evaluation = _run_checks(tmp_path, nytimes800k_face_features, ["faces_per_image"])["faces_per_image"]

    assert not evaluation.passed
    assert evaluation.severity == AssetCheckSeverity.ERROR
    assert json.loads(json.dumps(evaluation.metadata["out_of_range_examples"].value)) == ["h2: 11"]
