"""The index and training assets, materialized with dagster.materialize on demo-like data (tiny profile, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance, materialize
from test_dataset import DemoData, region_features_of

from assets.index import newsimages_index, nytimes800k_index
from assets.training import newsimages_finetuned_model, nytimes800k_pretrained_model
from model.faces import FaceResult, json_path, original_json
from model.index import load_index, index_path
from model.manifest import write_manifest
from model.region_json import write_region_json
from model.storage import canonical_json
from pipelines.resources import PipelineSettings

QUICK_TRAINING = {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "num_workers": 0, "max_seq_len": 48}


def write_features(dataset_root: Path, demo: DemoData, hashes: list[str], partition: str) -> None:
    """Region and face features of ``hashes`` in the pipeline's JSON folders, with manifests."""
    for image_hash in hashes:
        write_region_json(dataset_root / "region_features" / "json", image_hash, region_features_of(demo.regions[image_hash]))
        faces = demo.faces[image_hash]
        n = int(faces["n_faces"])
        result = FaceResult(faces["embeddings"][:n], np.ones(n, np.float32), np.zeros((n, 4), np.float32), n, 100, 100)
        path = json_path(dataset_root / "face_features", image_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(original_json(result, "float32")), encoding="utf-8")
    write_manifest(dataset_root, "region_features", partition, {"done": sorted(hashes), "failed": [], "feature_dim": 32})
    write_manifest(dataset_root, "face_features", partition, {"done": sorted(hashes), "failed": []})


def write_nytimes(data_root: Path, demo: DemoData, with_features: float = 1.0) -> None:
    root = data_root / "nytimes800k"
    items = []
    for document in demo.documents:
        path = root / "articles" / document["split"] / f"{document['_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(document), encoding="utf-8")
        items.append([document["split"], document["_id"]])
    write_manifest(root, "articles", "2024-01-01", {"articles": items})
    hashes = sorted(demo.regions)
    write_features(root, demo, hashes[: int(len(hashes) * with_features)], "2024-01-01")


def write_newsimages(data_root: Path, demo: DemoData) -> None:
    """One NewsImages article per demo image: English title and text that describe it."""
    root = data_root / "newsimages"
    items = []
    for number, document in enumerate(demo.documents):
        record = demo.records[document["_id"]]
        translated = {
            "_id": f"ni{number:04d}",
            "split": document["split"],
            "title": "Neues",
            "text": "Text",
            "title_en": record.text.headline,
            "text_en": record.text.captions[0],
            "image_hash": record.image_hashes[0],
        }
        path = root / "translated_articles" / document["split"] / f"{translated['_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(translated), encoding="utf-8")
        items.append([document["split"], translated["_id"]])
    write_manifest(root, "translated_articles", "batch1", {"articles": items})
    write_features(root, demo, sorted({demo.records[d["_id"]].image_hashes[0] for d in demo.documents}), "batch1")


def metadata_of(result, key: str) -> dict:
    materializations = [m for m in result.asset_materializations_for_node(key)]
    assert materializations, key
    return {name: getattr(value, "value", value) for name, value in materializations[-1].metadata.items()}


@pytest.fixture(scope="module")
def demo() -> DemoData:
    return DemoData(n_articles=24, seed=4)


def test_index_asset_and_dropped_share_check(demo, tmp_path):
    write_nytimes(tmp_path, demo, with_features=0.5)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    result = materialize(
        [nytimes800k_index],
        resources={"settings": settings},
        run_config={"ops": {"nytimes800k__index": {"config": {"max_dropped_share": 0.2}}}},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    metadata = metadata_of(result, "nytimes800k__index")
    assert metadata["dropped_by_reason"]["no_region_features"] == metadata["dropped"] > 0
    assert metadata["pairs"] == sum(metadata["per_split"].values())
    evaluations = result.get_asset_check_evaluations()
    assert [(e.check_name, e.passed) for e in evaluations] == [("dropped_share", False)]
    assert load_index(index_path(tmp_path / "nytimes800k", "train")), "the index is written even when the check fails"


def test_pretrain_then_finetune_assets(demo, tmp_path):
    write_nytimes(tmp_path, demo)
    write_newsimages(tmp_path, demo)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    run_config = {
        "ops": {
            "nytimes800k__pretrained_model": {"config": {**QUICK_TRAINING, "mode": 4, "faces": True, "entities": True}},
            "newsimages__finetuned_model": {"config": {**QUICK_TRAINING, "mode": 7, "faces": True, "entities": False}},
        }
    }
    result = materialize(
        [nytimes800k_index, nytimes800k_pretrained_model, newsimages_index, newsimages_finetuned_model],
        resources={"settings": settings},
        run_config=run_config,
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success

    pretrained = metadata_of(result, "nytimes800k__pretrained_model")
    best = Path(pretrained["best_checkpoint"])
    assert (best / "model.safetensors").is_file()
    assert (best / "tokenizer.json").is_file()
    assert pretrained["epochs"] == 2
    assert pretrained["settings"]["mode"] == 4
    assert pretrained["settings"]["faces"] is True
    assert pretrained["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert set(pretrained["data_fingerprints"]) >= {"train_index", "valid_index", "region_manifests", "face_manifests"}
    assert "training_code" in pretrained["code_version"]
    assert (tmp_path / "models" / "tiny" / "lxmert" / "config.json").is_file()
    config = json.loads((best / "config.json").read_text())
    assert config["use_faces"] is True
    assert config["visual_feat_dim"] == 32

    finetuned = metadata_of(result, "newsimages__finetuned_model")
    assert finetuned["started_from"] == str(best)
    assert Path(finetuned["best_checkpoint"]).is_dir()
    assert finetuned["settings"]["dataset"] == "newsimages"
    current = json.loads((tmp_path / "newsimages" / "finetuned_model" / "current.json").read_text())
    assert current["best_checkpoint"] == finetuned["best_checkpoint"]

    # The same inputs again: the finished run is found and reused, not trained anew.
    again = materialize(
        [nytimes800k_pretrained_model],
        resources={"settings": settings},
        run_config={"ops": {"nytimes800k__pretrained_model": run_config["ops"]["nytimes800k__pretrained_model"]}},
        instance=DagsterInstance.ephemeral(),
    )
    repeated = metadata_of(again, "nytimes800k__pretrained_model")
    assert repeated["fingerprint"] == pretrained["fingerprint"]
    assert repeated["per_epoch"] == pretrained["per_epoch"]


def test_newsimages_caption_mode_fails_clearly(demo, tmp_path):
    write_nytimes(tmp_path, demo)
    write_newsimages(tmp_path, demo)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    result = materialize(
        [newsimages_index, newsimages_finetuned_model],
        resources={"settings": settings},
        run_config={"ops": {"newsimages__finetuned_model": {"config": {**QUICK_TRAINING, "mode": 1}}}},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    assert "needs image captions" in failure.event_specific_data.error.to_string()


def test_base_profile_without_weights_names_the_setting(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    write_nytimes(tmp_path, demo)
    settings = PipelineSettings(data_root=str(tmp_path), profile="base", device="cpu")
    with pytest.raises(Exception, match="lxmert_model"):
        materialize(
            [nytimes800k_index, nytimes800k_pretrained_model],
            resources={"settings": settings},
            run_config={"ops": {"nytimes800k__pretrained_model": {"config": {"lxmert_model": "unc-nlp/lxmert-base-uncased"}}}},
            instance=DagsterInstance.ephemeral(),
        )
