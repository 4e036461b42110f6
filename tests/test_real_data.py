"""The asset graph on real news data: newsimages-2025 photos and newsimages-2021 German text.

A seeded subset keeps each test within a few minutes on two cores; the whole 1,000 photos
run through ``python -m pipelines.real_data`` (see docs/results.md).
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from pipelines.demo import run_assets

SUBSET_SIZE = 100
SEED = 7


def _write_2025_subset(shared_data: Path, folder: Path, size: int, seed: int) -> Path:
    source = shared_data / "newsimages-2025" / "newsarticles.csv"
    text = source.read_text(encoding="utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    chosen = sorted(random.Random(seed).sample(range(len(rows)), size))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[i] for i in chosen)
    folder.mkdir(parents=True)
    target = folder / "newsarticles.csv"
    target.write_bytes("\ufeff".encode("utf-8") + buffer.getvalue().encode("utf-8"))
    return target


def _write_2021_subset(shared_data: Path, folder: Path, size: int, seed: int) -> Path:
    source = shared_data / "newsimages-2021" / "content2019-01.tsv"
    lines = source.read_bytes().split(b"\r\n")
    header, body = lines[0], [line for line in lines[1:] if line.strip()]
    chosen = sorted(random.Random(seed).sample(range(len(body)), size))
    folder.mkdir(parents=True)
    target = folder / "content2019-01.tsv"
    target.write_bytes(b"\r\n".join([header] + [body[i] for i in chosen]) + b"\r\n")
    return target


def _newsimages_keys(defs) -> list[AssetKey]:
    from dagster import DynamicPartitionsDefinition

    return [
        spec.key
        for spec in defs.resolve_all_asset_specs()
        if spec.key.path[0] == "newsimages" and isinstance(spec.partitions_def, DynamicPartitionsDefinition)
    ]


@pytest.fixture
def tiny_environment(tmp_path, monkeypatch):
    data_root = tmp_path / "data"
    monkeypatch.setenv("NEWSLXMERT_DATA_ROOT", str(data_root))
    monkeypatch.setenv("NEWSLXMERT_PROFILE", "tiny")
    return data_root


def _tiny_definitions(data_root: Path):
    """The code location's assets with resources bound to ``data_root`` and the tiny profile.

    The module-level definitions read the environment once, when first imported, which may
    have happened in an earlier test; so the resources are built here instead.
    """
    from dagster import Definitions

    from pipelines.definitions import defs as location
    from pipelines.resources import MongoResource, PipelineSettings

    return Definitions(
        assets=location.assets,
        asset_checks=location.asset_checks,
        resources={
            "settings": PipelineSettings(data_root=str(data_root), profile="tiny", device="cpu"),
            "nytimes_mongo": MongoResource(data_root=str(data_root), database="nytimes", collection="articles"),
            "newsimages_mongo": MongoResource(data_root=str(data_root), database="newsimages", collection="articles"),
        },
    )


def _run_batch(data_root: Path, source: Path, images_dir: Path | None) -> dict:
    from model.newsimages import discover_batches

    defs = _tiny_definitions(data_root)

    instance = DagsterInstance.get()
    keys = discover_batches(source)
    assert len(keys) == 1
    instance.add_dynamic_partitions("newsimages_batches", keys)
    image_config = {"source_dir": str(images_dir) if images_dir else None, "download": False}
    asset_config = {
        "newsimages/raw_articles": {"source_dir": str(source)},
        "newsimages/images": image_config,
    }
    return run_assets(
        defs, instance, _newsimages_keys(defs), {"dagster/partition": keys[0]}, f"NewsImages {keys[0]}", asset_config
    )


@pytest.mark.slow
def test_newsimages_2025_subset_article_stages(shared_data, tiny_environment, tmp_path):
    source = tmp_path / "source-2025"
    _write_2025_subset(shared_data, source, SUBSET_SIZE, SEED)

    reported = _run_batch(tiny_environment, source, shared_data / "newsimages-2025" / "images")

    assert reported["newsimages/raw_articles"]["documents"] == SUBSET_SIZE
    assert reported["newsimages/translated_articles"]["passed_through_english"] == SUBSET_SIZE
    assert reported["newsimages/images"]["failed"] == 0
    assert reported["newsimages/region_features"]["images_done"] == SUBSET_SIZE
    assert reported["newsimages/region_features"]["images_failed"] == 0
    assert reported["newsimages/face_features"]["failed"] == 0
    assert reported["newsimages/face_features"]["images_with_faces"] > 0
    assert reported["newsimages/entities"]["spans"] > 0


@pytest.mark.slow
def test_newsimages_2021_german_subset(shared_data, tiny_environment, tmp_path):
    source = tmp_path / "source-2021"
    _write_2021_subset(shared_data, source, 40, SEED)

    reported = _run_batch(tiny_environment, source, images_dir=None)

    assert reported["newsimages/raw_articles"]["documents"] == 40
    translated = reported["newsimages/translated_articles"]
    assert translated["translated_documents"] == 40
    assert translated["passed_through_english"] == 0
    # The 2021 release has only image URLs and this machine must not reach them, so every
    # image gets a failure record and the run goes on.
    assert reported["newsimages/images"]["failed"] == 40
    assert reported["newsimages/region_features"]["images_done"] == 0
    assert reported["newsimages/entities"]["articles"] == 40
