"""The NewsImages assets: raw_articles -> articles -> translated_articles through Dagster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import DagsterInstance, Definitions, define_asset_job, materialize

from assets.newsimages import (
    newsimages_articles,
    newsimages_raw_articles,
    newsimages_translated_articles,
    register_newsimages_batches,
)
from model.demo_corpus import generate_demo_corpus, write_demo_files
from model.manifest import read_manifest
from pipelines.resources import MongoResource, PipelineSettings

ASSETS = [newsimages_raw_articles, newsimages_articles, newsimages_translated_articles]


def _resources(data_root: Path, profile: str = "tiny") -> dict:
    return {
        "settings": PipelineSettings(data_root=str(data_root), profile=profile, device="cpu"),
        "newsimages_mongo": MongoResource(data_root=str(data_root), database="newsimages", collection="articles"),
    }


def _run_config(source: Path, **translation) -> dict:
    return {
        "ops": {
            "newsimages__raw_articles": {"config": {"source_dir": str(source)}},
            "newsimages__translated_articles": {"config": {"num_beams": 1, **translation}},
        }
    }


def _metadata(result, asset_name: str) -> dict:
    (materialization,) = result.asset_materializations_for_node(asset_name)
    return {key: value.value for key, value in materialization.metadata.items()}


def test_demo_batches_end_to_end(tmp_path):
    data_root = tmp_path / "data"
    write_demo_files(generate_demo_corpus(n_articles=24, n_days=2), data_root / "demo")
    source = data_root / "demo" / "newsimages"
    instance = DagsterInstance.ephemeral()

    keys = register_newsimages_batches(instance, source)
    again = register_newsimages_batches(instance, source)
    result = materialize(
        ASSETS,
        partition_key=keys[0],
        run_config=_run_config(source, tiny_train_steps=25),
        resources=_resources(data_root),
        instance=instance,
    )

    assert keys == ["content2024-01-01", "content2024-01-02"]
    assert again == []
    assert result.success
    raw = _metadata(result, "newsimages__raw_articles")
    assert (raw["rows"], raw["inserted"], raw["failed_rows"]) == (12, 12, 0)
    assert raw["per_split"] == {"train": 9, "valid": 1, "test": 2}
    assert raw["encodings"] == {"content2024-01-01.tsv": "utf-8"}
    exported = _metadata(result, "newsimages__articles")
    assert exported["exported"] == 12

    dataset_root = data_root / "newsimages"
    items = read_manifest(dataset_root, "translated_articles", keys[0])["articles"]
    assert sorted(items) == sorted(read_manifest(dataset_root, "articles", keys[0])["articles"])
    assert len(items) == 12
    split, aid = items[0]
    document = json.loads((dataset_root / "translated_articles" / split / f"{aid}.json").read_text(encoding="utf-8"))
    assert document["title"].startswith("Neues aus")
    assert document["title_en"] and document["text_en"]
    assert document["translation"]["model_fingerprint"]
    assert document["batch"] == keys[0]

    translated = _metadata(result, "newsimages__translated_articles")
    assert translated["translated_documents"] == 12
    assert translated["chunks"] == 24
    assert translated["characters_translated"] > 0
    assert translated["generated_tokens_per_second"] > 0
    assert translated["tiny_trained_pairs"] > 0
    assert translated["tiny_training"]["steps"] == 25
    assert (data_root / "models" / "tiny" / "marian" / "tiny_marian.json").is_file()

    rerun = materialize(
        [newsimages_translated_articles],
        partition_key=keys[0],
        run_config={"ops": {"newsimages__translated_articles": {"config": {"num_beams": 1, "tiny_train_steps": 25}}}},
        resources=_resources(data_root),
        instance=instance,
    )
    repeated = _metadata(rerun, "newsimages__translated_articles")
    assert (repeated["reused"], repeated["translated_documents"], repeated["written"]) == (12, 0, 0)


def test_partition_range_in_one_run(tmp_path):
    data_root = tmp_path / "data"
    write_demo_files(generate_demo_corpus(n_articles=12, n_days=3), data_root / "demo")
    source = data_root / "demo" / "newsimages"
    instance = DagsterInstance.ephemeral()
    keys = register_newsimages_batches(instance, source)
    definitions = Definitions(assets=ASSETS, jobs=[define_asset_job("newsimages_range")], resources=_resources(data_root))

    result = definitions.resolve_job_def("newsimages_range").execute_in_process(
        instance=instance,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        run_config=_run_config(source, tiny_train_steps=5),
    )

    assert len(keys) == 3
    # One materialization per partition, each with the metadata of the whole run.
    raw = result.asset_materializations_for_node("newsimages__raw_articles")
    assert sorted(event.partition for event in raw) == keys
    assert raw[0].metadata["partitions"].value == 3
    assert raw[0].metadata["inserted"].value == 12
    translated = result.asset_materializations_for_node("newsimages__translated_articles")
    assert translated[0].metadata["partitions"].value == 3
    assert translated[0].metadata["documents"].value == 12
    for key in keys:
        assert len(read_manifest(data_root / "newsimages", "translated_articles", key)["articles"]) == 4


def test_real_files_end_to_end(tmp_path, shared_data):
    # A 25-row sample of the 2021 file keeps the untrained tiny translator quick; the 2025
    # file is read whole.
    source = tmp_path / "source"
    source.mkdir()
    lines = (shared_data / "newsimages-2021" / "content2019-01.tsv").read_bytes().split(b"\r\n")
    (source / "content2019-01-sample.tsv").write_bytes(b"\r\n".join(lines[:26]) + b"\r\n")
    (source / "newsarticles.csv").symlink_to(shared_data / "newsimages-2025" / "newsarticles.csv")
    data_root = tmp_path / "data"
    instance = DagsterInstance.ephemeral()
    keys = register_newsimages_batches(instance, source)
    run_config = _run_config(source, length_margin=5, length_ratio=1.0)

    results = {
        key: materialize(ASSETS, partition_key=key, run_config=run_config, resources=_resources(data_root), instance=instance)
        for key in keys
    }

    assert keys == ["content2019-01-sample", "newsarticles"]
    german = _metadata(results["content2019-01-sample"], "newsimages__translated_articles")
    english = _metadata(results["newsarticles"], "newsimages__translated_articles")
    assert _metadata(results["newsarticles"], "newsimages__raw_articles")["per_split"] == {"train": 700, "valid": 100, "test": 200}
    assert (german["documents"], german["translated_documents"], german["failed"]) == (25, 25, 0)
    assert german["chunks"] >= 50
    assert german["empty_chunk_outputs"] <= german["chunks"]
    assert (english["documents"], english["passed_through_english"], english["translated_documents"]) == (1000, 1000, 0)
    assert english["chunks"] == 0

    translated_root = data_root / "newsimages" / "translated_articles"
    split, aid = read_manifest(data_root / "newsimages", "translated_articles", "newsarticles")["articles"][0]
    document = json.loads((translated_root / split / f"{aid}.json").read_text(encoding="utf-8"))
    assert document["title_en"] == document["title"]
    assert document["text_en"] == ", ".join(document["tags"])
    assert document["image_file"] == f"{document['image_hash']}.jpg"


def test_base_profile_missing_model_names_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_root = tmp_path / "data"
    articles = data_root / "newsimages" / "articles"
    (articles / "train").mkdir(parents=True)
    (articles / "train" / "2021-1.json").write_text(json.dumps({"_id": "2021-1", "title": "Hallo", "text": "", "language": "de"}))
    (articles / "_manifests").mkdir()
    (articles / "_manifests" / "b.json").write_text(json.dumps({"articles": [["train", "2021-1"]]}))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", ["b"])

    with pytest.raises(Exception) as raised:
        materialize(
            [newsimages_translated_articles],
            partition_key="b",
            resources={"settings": PipelineSettings(data_root=str(data_root), profile="base", device="cpu")},
            instance=instance,
        )

    message = str(raised.value) + str(raised.value.__cause__)
    assert "Helsinki-NLP/opus-mt-de-en" in message
    assert "translated_articles config `model`" in message


def test_english_partition_needs_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_root = tmp_path / "data"
    articles = data_root / "newsimages" / "articles"
    (articles / "test").mkdir(parents=True)
    document = {"_id": "2025-1", "title": "Moose", "text": "maine", "title_en": "Moose", "text_en": "maine", "language": "en"}
    (articles / "test" / "2025-1.json").write_text(json.dumps(document))
    (articles / "_manifests").mkdir()
    (articles / "_manifests" / "newsarticles.json").write_text(json.dumps({"articles": [["test", "2025-1"]]}))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", ["newsarticles"])

    result = materialize(
        [newsimages_translated_articles],
        partition_key="newsarticles",
        resources={"settings": PipelineSettings(data_root=str(data_root), profile="base", device="cpu")},
        instance=instance,
    )

    metadata = _metadata(result, "newsimages__translated_articles")
    assert metadata["passed_through_english"] == 1
    assert metadata["model"].startswith("none needed")
    assert not (data_root / "models").exists()


def test_missing_source_folder_names_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("NEWSLXMERT_NEWSIMAGES_SOURCE", raising=False)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", ["b"])

    with pytest.raises(Exception) as raised:
        materialize([newsimages_raw_articles], partition_key="b", resources=_resources(tmp_path), instance=instance)

    message = str(raised.value) + str(raised.value.__cause__)
    assert "source_dir" in message
    assert "NEWSLXMERT_NEWSIMAGES_SOURCE" in message


def test_source_folder_from_environment(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_demo_files(generate_demo_corpus(n_articles=4, n_days=1), tmp_path / "demo")
    (tmp_path / "demo" / "newsimages").rename(source)
    monkeypatch.setenv("NEWSLXMERT_NEWSIMAGES_SOURCE", str(source))
    instance = DagsterInstance.ephemeral()
    (key,) = register_newsimages_batches(instance, source)

    result = materialize([newsimages_raw_articles], partition_key=key, resources=_resources(tmp_path), instance=instance)

    assert _metadata(result, "newsimages__raw_articles")["inserted"] == 4
