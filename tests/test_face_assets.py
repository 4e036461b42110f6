"""The face_features assets of both datasets, materialized with dagster.materialize."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance, materialize

from assets.face_features import newsimages_face_features, nytimes800k_face_features
from model.demo_corpus import generate_demo_corpus
from model.faces import EMBEDDING_SIZE, FaceFeatureReader
from model.manifest import read_manifest, write_manifest
from model.storage import atomic_write_bytes, canonical_json
from pipelines.resources import PipelineSettings

PHOTOS_WITH_FACES = {
    "0016AB727ED58EC496D107D6D4EFB9B7": 4,
    "00701358E67D2970B2227DCF67886EAB": 2,
    "001A69D51E2C3F96D6AB808E3BD10C5B": 0,
}
BATCH = "newsimages-2025"


def _newsimages_root(shared_data: Path, data_root: Path) -> Path:
    """A NewsImages images folder with three real photos and one undecodable file."""
    photos = shared_data / "newsimages-2025" / "images"
    if not photos.is_dir():
        pytest.skip(f"newsimages-2025 photos not found at {photos}")
    images = data_root / "newsimages" / "images"
    images.mkdir(parents=True)
    for key in PHOTOS_WITH_FACES:
        shutil.copy(photos / f"{key}.jpg", images / f"{key}.jpg")
    (images / "BROKEN.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    write_manifest(data_root / "newsimages", "images", BATCH, {"images": sorted(PHOTOS_WITH_FACES) + ["BROKEN"], "failed": []})
    return data_root / "newsimages"


def _instance_with_batch() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", [BATCH])
    return instance


def _metadata(result, node: str) -> dict:
    return {key: value.value for key, value in result.asset_materializations_for_node(node)[0].metadata.items()}


def test_newsimages_faces_materialize(shared_data, tmp_path, link_tiny_facenet):
    root = _newsimages_root(shared_data, tmp_path)
    link_tiny_facenet(tmp_path)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")
    instance = _instance_with_batch()
    run_config = {"ops": {"newsimages__face_features": {"config": {"images_per_write": 2}}}}

    first = materialize([newsimages_face_features], resources={"settings": settings}, partition_key=BATCH,
                        instance=instance, run_config=run_config)
    second = materialize([newsimages_face_features], resources={"settings": settings}, partition_key=BATCH,
                         instance=instance, run_config=run_config)

    assert first.success and second.success
    metadata = _metadata(first, "newsimages__face_features")
    assert metadata["images"] == 3
    assert metadata["images_with_faces"] == 2
    assert metadata["faces"] == 6
    assert metadata["faces_per_image"] == {"0": 1, "2": 1, "4": 1}
    assert metadata["failed"] == 1
    assert "BROKEN" in metadata["failed_examples"][0]
    assert metadata["images_per_second"] > 0
    assert metadata["settings"]["min_face_size"] == 20
    manifest = read_manifest(root, "face_features", BATCH)
    assert manifest["done"] == sorted(PHOTOS_WITH_FACES)
    assert manifest["failed"][0]["image_hash"] == "BROKEN"
    assert (manifest["with_faces"], manifest["faces"]) == (2, 6)
    rerun = _metadata(second, "newsimages__face_features")
    assert rerun["resumed"] == 3
    assert rerun["computed"] == 0
    reader = FaceFeatureReader(root)
    for key, count in PHOTOS_WITH_FACES.items():
        item = reader.get(key)
        assert item["n_faces"] == count
        assert item["embeddings"].shape == (10, EMBEDDING_SIZE)
        assert int(item["mask"].sum()) == count


def test_base_profile_without_weights_fails_clearly(shared_data, tmp_path, monkeypatch):
    _newsimages_root(shared_data, tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv("NEWSLXMERT_FACENET_WEIGHTS", raising=False)
    settings = PipelineSettings(data_root=str(tmp_path), profile="base", device="cpu")

    result = materialize([newsimages_face_features], resources={"settings": settings}, partition_key=BATCH,
                         instance=_instance_with_batch(), raise_on_error=False)

    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    assert any("facenet_weights" in message and "vggface2" in message for message in messages), messages
    assert not (tmp_path / "models").exists()


def _write_demo_partition(data_root: Path, partition: str) -> tuple[list[dict], dict]:
    """Demo articles of one day as exported files, their images and both manifests."""
    corpus = generate_demo_corpus(n_articles=3, n_days=1, start_date=dt.date.fromisoformat(partition))
    root = data_root / "nytimes800k"
    documents = [json.loads(canonical_json(document)) for document in corpus.documents]
    for document in documents:
        atomic_write_bytes(root / "articles" / document["split"] / f"{document['_id']}.json", canonical_json(document).encode())
    for image_hash, data in corpus.images.items():
        atomic_write_bytes(root / "images" / f"{image_hash}.jpg", data)
    write_manifest(root, "articles", partition, {"articles": sorted([d["split"], d["_id"]] for d in documents)})
    write_manifest(root, "images", partition, {"images": sorted(corpus.images), "failed": []})
    return documents, corpus.images


def test_nytimes_demo_faces_with_document_details(tmp_path, link_tiny_facenet):
    partition = "2024-01-01"
    documents, images = _write_demo_partition(tmp_path, partition)
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(2, EMBEDDING_SIZE)).astype(np.float32)
    first = documents[0]
    caption = first["parsed_section"][first["image_positions"][0]]
    caption["facenet_details"] = {"n_faces": 2, "embeddings": embeddings.tolist(), "detect_probs": [0.99, 0.95]}
    path = tmp_path / "nytimes800k" / "articles" / first["split"] / f"{first['_id']}.json"
    atomic_write_bytes(path, canonical_json(first).encode())
    link_tiny_facenet(tmp_path)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny", device="cpu")

    result = materialize([nytimes800k_face_features], resources={"settings": settings}, partition_key=partition,
                         instance=DagsterInstance.ephemeral())

    assert result.success
    metadata = _metadata(result, "nytimes800k__face_features")
    assert metadata["images"] == len(images)
    assert metadata["from_documents"] == 1
    assert metadata["computed"] == len(images) - 1
    assert metadata["images_with_faces"] == 1  # drawn demo scenes have no faces
    assert metadata["faces"] == 2
    item = FaceFeatureReader(tmp_path / "nytimes800k").get(caption["hash"])
    np.testing.assert_array_equal(item["embeddings"][:2], embeddings)
    assert read_manifest(tmp_path / "nytimes800k", "face_features", partition)["with_faces"] == 1
