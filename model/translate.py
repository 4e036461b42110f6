"""German to English translation of NewsImages articles with MarianMT.

:class:`MarianTranslator` loads a MarianMT model by hub id (``Helsinki-NLP/opus-mt-de-en`` by
default) or from a local ``save_pretrained`` folder. Text is split at sentence boundaries
with spaCy's rule-based sentencizer. Sentences longer than the model's input limit are
split further at clause punctuation, then between words. Every piece is translated and the
results are rejoined in order, so nothing is cut. Pieces are translated in batches sorted
by length. The number of generated tokens is bounded by the input length
(``ceil(length_ratio * input_tokens + length_margin)``), so repetitive or ALL-CAPS input
cannot run to the model's maximum length. Text without any letter (empty, whitespace,
punctuation, numbers) is passed through unchanged rather than given to the model.

:func:`translate_articles` translates exported article files into a second folder and
records, per document, the model fingerprint and a fingerprint of the source text; a
document whose source and model are unchanged is not translated again.

The ``tiny`` profile uses :func:`ensure_tiny_marian`: a small MarianMT with a SentencePiece
tokenizer trained on the corpus, briefly trained on German-English pairs when they are
available, saved with ``save_pretrained`` and loaded through the same code path.

Run ``python -m model.translate --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from model.storage import atomic_write_text, canonical_json, remove_stale_temporaries, safe_join, write_json_if_changed

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Helsinki-NLP/opus-mt-de-en"
SPLITS = ("train", "valid", "test")
MAX_EXAMPLES = 10

# A field "needs translation" only when it contains at least one letter.
_LETTER = re.compile(r"[^\W\d_]")
# Clause boundaries used to split one over-long sentence: after , ; : or around a dash.
_CLAUSE_BREAK = re.compile(r"(?<=[,;:])\s+|\s+(?=[–—-]\s)")


def has_letters(text: str | None) -> bool:
    """True when ``text`` contains a letter in any script, so that a model has something to translate."""
    return bool(text) and _LETTER.search(text) is not None


class TranslationModelNotFound(RuntimeError):
    """The configured MarianMT model could not be loaded; the message names the setting."""


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class TranslationSettings:
    """Generation and batching settings. Those that change the output enter the fingerprint."""

    num_beams: int = 4
    batch_size: int = 16  # pieces per generate() call
    max_chunk_tokens: int = 0  # 0: the model's input limit
    length_ratio: float = 1.5  # max_new_tokens = ceil(length_ratio * input tokens + length_margin)
    length_margin: int = 10
    device: str = "cpu"
    source_language: str = "de"  # spaCy language code for sentence splitting

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.batch_size < 1:
            raise ValueError(f"num_beams and batch_size must be at least 1, got {self.num_beams} and {self.batch_size}")
        if self.length_ratio <= 0 or self.length_margin < 1:
            raise ValueError(f"length_ratio must be positive and length_margin at least 1, got {self.length_ratio} and {self.length_margin}")
        if self.max_chunk_tokens < 0:
            raise ValueError(f"max_chunk_tokens must be 0 (the model's limit) or positive, got {self.max_chunk_tokens}")

    def output_affecting(self) -> dict[str, Any]:
        return {
            "num_beams": self.num_beams,
            "max_chunk_tokens": self.max_chunk_tokens,
            "length_ratio": self.length_ratio,
            "length_margin": self.length_margin,
            "source_language": self.source_language,
        }


@dataclasses.dataclass
class TranslationStats:
    """Counters of one or more translate_texts() calls."""

    texts: int = 0
    characters: int = 0
    chunks: int = 0
    source_tokens: int = 0
    generated_tokens: int = 0
    generate_calls: int = 0
    generate_seconds: float = 0.0
    empty_chunk_outputs: int = 0
    capped_chunks: int = 0  # pieces whose output reached max_new_tokens

    def add(self, other: "TranslationStats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def generated_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    @property
    def source_tokens_per_second(self) -> float:
        return self.source_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


# --------------------------------------------------------------------------- sentence splitting


@functools.lru_cache(maxsize=4)
def _sentencizer(language: str):
    import spacy

    try:
        nlp = spacy.blank(language)
    except (ImportError, KeyError, ValueError):
        logger.warning("spaCy has no language %r; splitting sentences with its multi-language rules", language)
        nlp = spacy.blank("xx")
    nlp.add_pipe("sentencizer")
    return nlp


def split_sentences(text: str, language: str = "de") -> list[tuple[int, int]]:
    """Return the character spans ``(start, end)`` of the sentences of ``text``, in order.

    spaCy's tokenizer keeps abbreviations such as "Dr." or "z. B." together and splits
    "berichtet.Eine", so the rule-based sentencizer handles both.
    """
    nlp = _sentencizer(language)
    if len(text) >= nlp.max_length:
        nlp.max_length = len(text) + 1
    return [(sentence.start_char, sentence.end_char) for sentence in nlp(text).sents if sentence.text.strip()]


# --------------------------------------------------------------------------- the translator


def resolve_device(device: str) -> str:
    if device in ("", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_marian(name_or_path: str, setting: str = "model", download: bool = False):
    """Load a MarianMT tokenizer and model from a local folder or the Hugging Face cache.

    With ``download``, a model missing from the cache is downloaded from the hub. It is off
    by default because, without network access, the hub client retries each file for
    minutes before it fails. Raises TranslationModelNotFound naming ``setting`` when nothing loads;
    there is no fallback to random weights.
    """
    from transformers import MarianMTModel, MarianTokenizer

    local = Path(name_or_path).expanduser()
    attempts: list[dict[str, Any]] = []
    if local.is_dir():
        attempts.append({"pretrained_model_name_or_path": str(local)})
    elif _HUB_ID.match(name_or_path):
        attempts.append({"pretrained_model_name_or_path": name_or_path, "local_files_only": True})
        if download:
            attempts.append({"pretrained_model_name_or_path": name_or_path})
    errors = []
    for kwargs in attempts:
        try:
            tokenizer = MarianTokenizer.from_pretrained(**kwargs)
            model = MarianMTModel.from_pretrained(**kwargs)
            return tokenizer, model
        # transformers raises OSError, ValueError or, for a missing vocabulary file, TypeError.
        except Exception as error:  # noqa: BLE001
            first_line = str(error).splitlines()[0] if str(error) else ""
            where = "hub" if "local_files_only" not in kwargs and not local.is_dir() else "local files"
            errors.append(f"{where}: {type(error).__name__}: {first_line}")
    detail = "; ".join(errors) if errors else "no such folder, and not a hub id"
    hint = "" if download or local.is_dir() else " or allow downloading from the hub"
    raise TranslationModelNotFound(
        f"MarianMT model {name_or_path!r} could not be loaded ({detail}). Set `{setting}` to a local folder "
        f"saved with save_pretrained (source.spm, target.spm, vocab.json, config.json and the weights), "
        f"put the model into the Hugging Face cache{hint}; the 'tiny' profile builds a small local model instead."
    )


def model_fingerprint(tokenizer, model) -> str:
    """Hash the model's config, weights, tokenizer vocabulary and SentencePiece models with sha256."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False).encode())
    for attribute in ("spm_source", "spm_target"):
        processor = getattr(tokenizer, attribute, None)
        if processor is not None:
            digest.update(processor.serialized_model_proto())
    return digest.hexdigest()


@dataclasses.dataclass
class _Piece:
    text: str
    translate: bool


class MarianTranslator:
    """A loaded MarianMT model with sentence chunking, length-sorted batching and bounded output."""

    def __init__(
        self,
        name_or_path: str,
        settings: TranslationSettings = TranslationSettings(),
        setting: str = "model",
        download: bool = False,
    ):
        import torch

        self.name = name_or_path
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.tokenizer, self.model = load_marian(name_or_path, setting, download)
        self.model.to(self.device)
        self.model.eval()
        # Output length comes from max_new_tokens alone; a saved max_length would only trigger
        # a warning on every generate() call.
        self.model.generation_config.max_length = None
        self._torch = torch

        limits = [self.model.config.max_position_embeddings]
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 1_000_000:
            limits.append(self.tokenizer.model_max_length)
        self.model_limit = min(limits)
        self.input_limit = min(self.model_limit, settings.max_chunk_tokens) if settings.max_chunk_tokens else self.model_limit
        if self.input_limit < 4:
            raise ValueError(f"max_chunk_tokens {settings.max_chunk_tokens} leaves no room for text; use at least 4 or 0 for the model's limit")
        weights = model_fingerprint(self.tokenizer, self.model)
        settings_json = json.dumps(settings.output_affecting(), sort_keys=True)
        self.fingerprint = hashlib.sha256(f"{weights}:{settings_json}".encode()).hexdigest()[:32]

    # ---- chunking

    def token_count(self, text: str) -> int:
        """Count the encoder tokens of ``text``, end-of-sequence token included."""
        return len(self.tokenizer(text)["input_ids"])

    def plan(self, text: str) -> list[_Piece]:
        """Split ``text`` into pieces to translate and verbatim separators; joined they give ``text``."""
        if not has_letters(text):
            return [_Piece(text, False)]
        pieces: list[_Piece] = []
        position = 0
        for start, end in split_sentences(text, self.settings.source_language):
            if start > position:
                pieces.append(_Piece(text[position:start], False))
            elif pieces and pieces[-1].translate:
                pieces.append(_Piece(" ", False))  # sentences written without a space: "berichtet.Eine"
            sentence = text[start:end]
            if has_letters(sentence):
                pieces.extend(self._fit(sentence))
            else:
                pieces.append(_Piece(sentence, False))
            position = end
        if position < len(text):
            pieces.append(_Piece(text[position:], False))
        return pieces

    def _fit(self, sentence: str) -> list[_Piece]:
        """Split ``sentence`` into pieces of at most ``input_limit`` tokens: at clauses, then words, then characters."""
        if self.token_count(sentence) <= self.input_limit:
            return [_Piece(sentence, True)]
        for pattern in (_CLAUSE_BREAK, re.compile(r"\s+")):
            parts = _split_keep_separators(sentence, pattern)
            if len(parts) > 1:
                return self._pack(parts)
        return self._split_characters(sentence)

    def _pack(self, parts: list[tuple[str, str]]) -> list[_Piece]:
        """Greedily join ``(part, separator)`` pairs into pieces that fit; over-long parts are split further."""
        pieces: list[_Piece] = []
        current, current_separator = "", ""
        for part, separator in parts:
            candidate = current + current_separator + part if current else part
            if current and self.token_count(candidate) > self.input_limit:
                pieces.extend(self._fit(current))
                pieces.append(_Piece(current_separator, False))
                candidate = part
            current, current_separator = candidate, separator
        if current:
            pieces.extend(self._fit(current))
        if current_separator:
            pieces.append(_Piece(current_separator, False))
        return pieces

    def _split_characters(self, word: str) -> list[_Piece]:
        pieces = []
        while word:
            low, high = 1, len(word)
            while low < high:  # the longest prefix that fits
                middle = (low + high + 1) // 2
                if self.token_count(word[:middle]) <= self.input_limit:
                    low = middle
                else:
                    high = middle - 1
            pieces.append(_Piece(word[:low], True))
            word = word[low:]
        return pieces

    def max_new_tokens(self, input_tokens: int) -> int:
        bound = math.ceil(self.settings.length_ratio * input_tokens + self.settings.length_margin)
        return max(1, min(self.model_limit, bound))

    # ---- generation

    def translate_chunks(self, chunks: Sequence[str], stats: TranslationStats | None = None) -> list[str]:
        """Translate each chunk (each must fit ``input_limit``), in batches sorted by token length."""
        torch = self._torch
        stats = stats if stats is not None else TranslationStats()
        if not chunks:
            return []

        encoded = self.tokenizer(list(chunks))["input_ids"]
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > self.input_limit]
        if too_long:
            raise ValueError(f"chunk {too_long[0]} has {len(encoded[too_long[0]])} tokens, over the input limit {self.input_limit}")

        order = sorted(range(len(chunks)), key=lambda i: (-len(encoded[i]), i))
        outputs: list[str] = [""] * len(chunks)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.settings.batch_size):
            indexes = order[start : start + self.settings.batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in indexes]}, return_tensors="pt")
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            longest = max(len(encoded[i]) for i in indexes)
            limit = self.max_new_tokens(longest)

            began = time.perf_counter()
            with torch.inference_mode():
                generated = self.model.generate(**batch, num_beams=self.settings.num_beams, max_new_tokens=limit, do_sample=False)
            stats.generate_seconds += time.perf_counter() - began
            stats.generate_calls += 1
            stats.source_tokens += int(batch["attention_mask"].sum())

            for row, index in enumerate(indexes):
                # The batch shares the bound of its longest input. Cutting each row to its own
                # bound makes the output independent of which chunks share a batch.
                tokens = [token for token in generated[row, 1:].tolist() if token != pad]  # [0] starts decoding
                own_limit = self.max_new_tokens(len(encoded[index]))
                if len(tokens) >= own_limit:
                    tokens = tokens[:own_limit]
                    stats.capped_chunks += 1
                stats.generated_tokens += len(tokens)
                outputs[index] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

        stats.chunks += len(chunks)
        stats.empty_chunk_outputs += sum(1 for text in outputs if not text)
        return outputs

    def translate_texts(self, texts: Sequence[str], stats: TranslationStats | None = None) -> list[str]:
        """Translate whole texts: plan each into pieces, translate all pieces together, rejoin."""
        stats = stats if stats is not None else TranslationStats()
        plans = [self.plan(text) for text in texts]
        chunks = [piece.text for plan in plans for piece in plan if piece.translate]
        translated = iter(self.translate_chunks(chunks, stats))
        results = []
        for text, plan in zip(texts, plans):
            if any(piece.translate for piece in plan):
                stats.texts += 1
                stats.characters += len(text)
            results.append("".join(next(translated) if piece.translate else piece.text for piece in plan))
        return results


def _split_keep_separators(text: str, pattern: re.Pattern) -> list[tuple[str, str]]:
    """Split ``text`` at ``pattern`` into ``(part, separator after it)`` pairs."""
    parts, position = [], 0
    for match in pattern.finditer(text):
        if match.start() == 0 or match.end() == len(text):
            continue
        parts.append((text[position : match.start()], match.group(0)))
        position = match.end()
    parts.append((text[position:], ""))
    return [(part, separator) for part, separator in parts if part]


# --------------------------------------------------------------------------- documents

FIELDS = (("title", "title_en"), ("text", "text_en"))


def source_fingerprint(document: Mapping[str, Any]) -> str:
    """Hash what translation reads with sha256: title, text, language and any English the source gave."""
    payload = {
        "language": document.get("language"),
        **{field: document.get(field) or "" for field, _ in FIELDS},
        **{target: document.get(target) for _, target in FIELDS if document.get(target) is not None},
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:32]


def field_plan(document: Mapping[str, Any]) -> dict[str, str]:
    """Decide how each field gets its English: "given" by the source, "no_text" copied as is, or "translate"."""
    english = str(document.get("language") or "").lower().startswith("en")
    plan = {}
    for field, target in FIELDS:
        value = document.get(field) or ""
        if document.get(target) is not None:
            plan[field] = "given"
        elif english:
            plan[field] = "given"
        elif not has_letters(value):
            plan[field] = "no_text"
        else:
            plan[field] = "translate"
    return plan


def count_needing_model(items: Sequence[tuple[str, str]], articles_root: Path | str) -> int:
    """Count the readable article files among ``items`` that have a field to translate."""
    from model.documents import load_article

    count = 0
    for split, aid in items:
        try:
            document = load_article(articles_root, split, aid)
        except (OSError, ValueError):
            continue  # translate_articles() records the failure
        count += "translate" in field_plan(document).values()
    return count


@dataclasses.dataclass
class TranslationFailure:
    aid: str
    reason: str


@dataclasses.dataclass
class TranslationReport:
    """Counts, failures and throughput of one translate_articles() call."""

    documents: int = 0
    translated_documents: int = 0
    reused: int = 0  # source and model unchanged: the earlier translation was kept
    passed_through_english: int = 0  # every field already English
    fields_without_text: int = 0  # empty, whitespace or punctuation only: copied unchanged
    written: int = 0
    unchanged_files: int = 0
    moved_between_splits: int = 0
    stale_temporaries_removed: int = 0
    per_split: Counter = dataclasses.field(default_factory=Counter)
    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failures: list[TranslationFailure] = dataclasses.field(default_factory=list)
    stats: TranslationStats = dataclasses.field(default_factory=TranslationStats)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "documents": self.documents,
            "translated_documents": self.translated_documents,
            "reused": self.reused,
            "passed_through_english": self.passed_through_english,
            "fields_without_text": self.fields_without_text,
            "characters_translated": stats.characters,
            "texts_translated": stats.texts,
            "chunks": stats.chunks,
            "empty_chunk_outputs": stats.empty_chunk_outputs,
            "length_capped_chunks": stats.capped_chunks,
            "source_tokens": stats.source_tokens,
            "generated_tokens": stats.generated_tokens,
            "generated_tokens_per_second": round(stats.generated_tokens_per_second, 1),
            "source_tokens_per_second": round(stats.source_tokens_per_second, 1),
            "generate_seconds": round(stats.generate_seconds, 3),
            "written": self.written,
            "unchanged_files": self.unchanged_files,
            "moved_between_splits": self.moved_between_splits,
            "per_split": {split: self.per_split.get(split, 0) for split in SPLITS},
            "failed": len(self.failures),
            "failed_examples": [f"{f.aid}: {f.reason}" for f in self.failures[:MAX_EXAMPLES]],
            "seconds": round(self.seconds, 3),
        }


def _english_document(document: dict[str, Any], english: Mapping[str, str], record: dict[str, Any]) -> dict[str, Any]:
    output = dict(document)
    for field, target in FIELDS:
        output[target] = english[field]
    output["translation"] = record
    return output


def _reusable(previous: Mapping[str, Any] | None, fingerprint: str, model_fp: str | None) -> bool:
    if not previous:
        return False
    record = previous.get("translation") or {}
    return record.get("source_fingerprint") == fingerprint and record.get("model_fingerprint") == model_fp


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def translate_articles(
    items: Sequence[tuple[str, str]],
    articles_root: Path | str,
    out_root: Path | str,
    translator: MarianTranslator | None,
    group_size: int = 64,
    progress: Any = None,
) -> TranslationReport:
    """Translate the article files ``items`` (split, aid) from ``articles_root`` into ``out_root``.

    Items are handled in fixed groups of ``group_size`` documents: the pieces of a group's
    documents are translated together, then each document is written atomically. A run
    killed halfway keeps every finished document, and a re-run reuses each document whose
    source fingerprint and model fingerprint match its existing output. ``translator`` may
    be None when every document is English or has no text; a document that needs the model
    then fails. ``progress``, when given, is called with a message after each group.
    """
    from model.documents import article_path

    articles_root, out_root = Path(articles_root), Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    report = TranslationReport()
    report.stale_temporaries_removed = remove_stale_temporaries(out_root)
    started = time.perf_counter()
    model_fp = translator.fingerprint if translator else None
    model_record = {"model": translator.name, "model_fingerprint": model_fp, "num_beams": translator.settings.num_beams} if translator else {}

    for group_start in range(0, len(items), max(1, group_size)):
        group = items[group_start : group_start + max(1, group_size)]
        pending: list[tuple[str, str, dict[str, Any], dict[str, str], str, Path]] = []
        for split, aid in group:
            try:
                source_path = article_path(articles_root, split, aid)
                document = json.loads(source_path.read_text(encoding="utf-8"))
                target = safe_join(out_root, split, f"{aid}.json")
            except (OSError, ValueError) as error:
                report.failures.append(TranslationFailure(aid, f"cannot read the article: {error}"))
                continue
            report.documents += 1
            plan = field_plan(document)
            fingerprint = source_fingerprint(document)
            report.fields_without_text += sum(1 for how in plan.values() if how == "no_text")
            if "translate" not in plan.values():
                english = {field: _untranslated_english(document, field, target_field, plan[field]) for field, target_field in FIELDS}
                if all(how == "given" for how in plan.values()):
                    report.passed_through_english += 1
                record = {"fields": plan, "source_fingerprint": fingerprint, "model": None, "model_fingerprint": None}
                _write(report, out_root, split, aid, target, _english_document(document, english, record))
                continue
            previous = _read_json(target)
            if _reusable(previous, fingerprint, model_fp):
                report.reused += 1
                english = {field: previous.get(target_field, "") for field, target_field in FIELDS}
                _write(report, out_root, split, aid, target, _english_document(document, english, previous["translation"]))
                continue
            if translator is None:
                report.failures.append(TranslationFailure(aid, "German text but no translation model was given"))
                continue
            pending.append((split, aid, document, plan, fingerprint, target))

        if pending:
            texts = [document.get(field) or "" for _, _, document, plan, _, _ in pending for field, _ in FIELDS if plan[field] == "translate"]
            translated = iter(translator.translate_texts(texts, report.stats))
            for split, aid, document, plan, fingerprint, target in pending:
                english = {}
                for field, target_field in FIELDS:
                    if plan[field] == "translate":
                        english[field] = next(translated)
                    else:
                        english[field] = _untranslated_english(document, field, target_field, plan[field])
                record = {**model_record, "fields": plan, "source_fingerprint": fingerprint}
                _write(report, out_root, split, aid, target, _english_document(document, english, record))
                report.translated_documents += 1
        if progress is not None:
            progress(f"{group_start + len(group)} of {len(items)} documents handled, {report.translated_documents} translated")

    report.seconds = time.perf_counter() - started
    logger.info("translation into %s finished: %s", out_root, report.summary())
    return report


def _untranslated_english(document: Mapping[str, Any], field: str, target: str, how: str) -> str:
    """Return the English of a field that is not translated: the source's own English, else the field itself."""
    if how == "given" and document.get(target) is not None:
        return document[target]
    return document.get(field) or ""


def _write(report: TranslationReport, out_root: Path, split: str, aid: str, target: Path, document: dict[str, Any]) -> None:
    for other in SPLITS:
        if other != split:
            stale = out_root / other / f"{aid}.json"
            if stale.exists():
                stale.unlink()
                report.moved_between_splits += 1
    if write_json_if_changed(target, document):
        report.written += 1
    else:
        report.unchanged_files += 1
    report.per_split[split] += 1
    report.items.append((split, aid))


# --------------------------------------------------------------------------- tiny model


@dataclasses.dataclass(frozen=True)
class TinyMarianConfig:
    """Size and training of the tiny-profile MarianMT. Training is bounded by steps and by wall time."""

    vocab_size: int = 2000  # SentencePiece target; a small corpus yields fewer pieces
    d_model: int = 128
    layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 256
    max_positions: int = 256
    train_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    heldout_fraction: float = 0.1
    seed: int = 0
    max_train_seconds: float = 150.0


def read_parallel_pairs(path: Path | str) -> list[tuple[str, str]]:
    """German-English pairs from a JSON-lines file of ``{"de": ..., "en": ...}`` objects."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append((str(record["de"]), str(record["en"])))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: expected a JSON object with 'de' and 'en' strings ({error})") from None
    return pairs


def split_heldout(pairs: Sequence[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded share of the distinct German sentences, with all their pairs."""
    sources = sorted({de for de, _ in pairs}, key=lambda de: hashlib.sha256(f"{seed}:{de}".encode()).hexdigest())
    heldout_sources = set(sources[: int(len(sources) * fraction)])
    train = [pair for pair in pairs if pair[0] not in heldout_sources]
    heldout = [pair for pair in pairs if pair[0] in heldout_sources]
    return train, heldout


def evaluate_translations(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact-match rate (whitespace-normalized), and BLEU and chrF when sacrebleu is installed."""
    def norm(text: str) -> str:
        return " ".join(text.split())

    result: dict[str, Any] = {"pairs": len(references)}
    if not references:
        return result
    result["exact_match"] = round(sum(norm(h) == norm(r) for h, r in zip(hypotheses, references)) / len(references), 4)
    try:
        import sacrebleu
    except ImportError:
        result["bleu"] = None
        return result
    result["bleu"] = round(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score, 2)
    result["chrf"] = round(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score, 2)
    return result


def _train_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> None:
    """Train one SentencePiece model for both languages and write MarianTokenizer's files."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    prefix = folder / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        eos_id=0,
        unk_id=1,
        bos_id=-1,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    vocab["<pad>"] = len(vocab)  # Marian convention: the last id pads and starts decoding
    shutil.copyfile(f"{prefix}.model", folder / "source.spm")
    shutil.copyfile(f"{prefix}.model", folder / "target.spm")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    for suffix in (".model", ".vocab"):
        Path(f"{prefix}{suffix}").unlink()
    tokenizer = MarianTokenizer(
        source_spm=str(folder / "source.spm"),
        target_spm=str(folder / "target.spm"),
        vocab=str(folder / "vocab.json"),
        source_lang="de",
        target_lang="en",
    )
    tokenizer.save_pretrained(str(folder))


def _tiny_model(vocab_size: int, config: TinyMarianConfig):
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    pad = vocab_size - 1
    model_config = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=config.d_model,
        encoder_layers=config.layers,
        decoder_layers=config.layers,
        encoder_attention_heads=config.attention_heads,
        decoder_attention_heads=config.attention_heads,
        encoder_ffn_dim=config.ffn_dim,
        decoder_ffn_dim=config.ffn_dim,
        max_position_embeddings=config.max_positions,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
    )
    model = MarianMTModel(model_config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, eos_token_id=0, pad_token_id=pad, forced_eos_token_id=0,
        bad_words_ids=[[pad]], num_beams=4,
    )
    return model


def _train(model, tokenizer, pairs: list[tuple[str, str]], config: TinyMarianConfig) -> dict[str, Any]:
    """Train on ``pairs`` for ``train_steps`` steps or until ``max_train_seconds``; return the curve."""
    import torch

    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    model.train()
    order: list[int] = []
    losses = []
    started = time.perf_counter()
    stopped_early = False
    for step in range(config.train_steps):
        if time.perf_counter() - started > config.max_train_seconds:
            stopped_early = True
            logger.warning("tiny MarianMT training stopped after %d of %d steps: max_train_seconds=%s reached", step, config.train_steps, config.max_train_seconds)
            break
        if len(order) < config.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [pairs[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        encoded = tokenizer([de for de, _ in batch], text_target=[en for _, en in batch], padding=True, truncation=True,
                            max_length=config.max_positions, return_tensors="pt")
        encoded["labels"][encoded["labels"] == tokenizer.pad_token_id] = -100
        loss = model(**encoded).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    seconds = time.perf_counter() - started
    steps = len(losses)
    window = max(1, min(20, steps // 5 or 1))
    return {
        "steps": steps,
        "stopped_early": stopped_early,
        "seconds": round(seconds, 1),
        "first_loss": round(sum(losses[:window]) / window, 4) if losses else None,
        "final_loss": round(sum(losses[-window:]) / window, 4) if losses else None,
    }


def build_tiny_marian(
    folder: Path | str,
    pairs: Sequence[tuple[str, str]] = (),
    corpus_texts: Sequence[str] = (),
    config: TinyMarianConfig = TinyMarianConfig(),
) -> dict[str, Any]:
    """Build a small MarianMT in ``folder`` and return its build report (also saved as tiny_marian.json).

    The tokenizer is trained on both sides of ``pairs`` plus ``corpus_texts``. With pairs,
    the model is trained on all but a held-out share of the distinct German sentences and
    evaluated on that share. Without pairs it stays randomly initialized, so its output is
    meaningless and fit for pipeline tests only.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = list(pairs)
    texts = [de for de, _ in pairs] + [en for _, en in pairs] + [text for text in corpus_texts if text and text.strip()]
    if not texts:
        raise ValueError("the tiny MarianMT needs text to train its tokenizer: give parallel pairs or corpus texts")
    torch.manual_seed(config.seed)
    _train_tokenizer(folder, texts, config.vocab_size)

    from transformers import MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(str(folder))
    model = _tiny_model(len(tokenizer.get_vocab()), config)
    report: dict[str, Any] = {"config": dataclasses.asdict(config), "pairs": len(pairs), "vocab_size": len(tokenizer.get_vocab())}
    heldout: list[tuple[str, str]] = []
    if pairs:
        train, heldout = split_heldout(pairs, config.heldout_fraction, config.seed)
        report["train_pairs"], report["heldout_pairs"] = len(train), len(heldout)
        report["training"] = _train(model, tokenizer, train, config)
    else:
        report["training"] = None
    tokenizer.model_max_length = config.max_positions
    tokenizer.save_pretrained(str(folder))
    model.save_pretrained(str(folder))

    if heldout:
        translator = MarianTranslator(str(folder), TranslationSettings(num_beams=4, batch_size=32))
        hypotheses = translator.translate_texts([de for de, _ in heldout])
        report["heldout"] = evaluate_translations(hypotheses, [en for _, en in heldout])
        report["heldout_examples"] = [
            {"de": de, "reference": en, "output": out} for (de, en), out in list(zip(heldout, hypotheses))[:5]
        ]
    atomic_write_text(folder / "tiny_marian.json", canonical_json(report))
    return report


def pairs_fingerprint(pairs: Sequence[tuple[str, str]], config: TinyMarianConfig) -> str:
    payload = json.dumps({"pairs": list(pairs), "config": dataclasses.asdict(config)}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_marian(
    folder: Path | str,
    pairs_path: Path | str | None = None,
    corpus_texts: Iterable[str] = (),
    config: TinyMarianConfig = TinyMarianConfig(),
) -> tuple[Path, dict[str, Any]]:
    """Return the tiny MarianMT folder and its build report, building it first when needed.

    It is (re)built when the folder has no model yet, or when ``pairs_path`` exists and
    its pairs or ``config`` differ from those the model was built with. Builds happen in a
    temporary sibling folder that replaces the old one, under a file lock, so concurrent
    runs wait for one build instead of reading half-written files.
    """
    folder = Path(folder)
    pairs = read_parallel_pairs(pairs_path) if pairs_path and Path(pairs_path).is_file() else []
    expected = pairs_fingerprint(pairs, config) if pairs else None
    with _folder_lock(folder):
        existing = _read_json(folder / "tiny_marian.json")
        if existing is not None and (expected is None or existing.get("build_fingerprint") == expected):
            return folder, existing
        corpus = [] if pairs else list(corpus_texts)
        building = folder.with_name(f".{folder.name}.building")
        shutil.rmtree(building, ignore_errors=True)
        logger.info("building the tiny MarianMT in %s from %d parallel pairs and %d corpus texts", folder, len(pairs), len(corpus))
        report = build_tiny_marian(building, pairs, corpus, config)
        report["build_fingerprint"] = expected
        report["pairs_path"] = str(pairs_path) if pairs else None
        atomic_write_text(building / "tiny_marian.json", canonical_json(report))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
        return folder, report


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Translate NewsImages article files with MarianMT, or build the tiny model.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("translate", help="translate <articles>/<split>/<aid>.json files into another folder")
    run.add_argument("articles_root", type=Path, help="folder with <split>/<aid>.json article files")
    run.add_argument("out_root", type=Path, help="folder to write the translated <split>/<aid>.json files into")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder of a MarianMT model (default {DEFAULT_MODEL})")
    run.add_argument("--manifest", type=Path, help='JSON file {"articles": [[split, aid], ...]}; default: every article file')
    run.add_argument("--num-beams", type=int, default=4, help="beam size (default 4)")
    run.add_argument("--batch-size", type=int, default=16, help="sentence pieces per generate call (default 16)")
    run.add_argument("--group-size", type=int, default=64, help="documents translated between writes (default 64)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    run.add_argument("--download", action="store_true", help="let transformers download a model missing from the local cache")

    tiny = commands.add_parser("build-tiny", help="build the tiny MarianMT and print its held-out quality")
    tiny.add_argument("folder", type=Path, help="folder to save the model into")
    tiny.add_argument("--pairs", type=Path, required=True, help="JSON lines of {'de': ..., 'en': ...}")
    tiny.add_argument("--steps", type=int, default=TinyMarianConfig.train_steps, help="training steps")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "build-tiny":
        config = dataclasses.replace(TinyMarianConfig(), train_steps=args.steps, seed=args.seed)
        report = build_tiny_marian(args.folder, read_parallel_pairs(args.pairs), (), config)
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0

    if args.manifest:
        items = [tuple(item) for item in json.loads(args.manifest.read_text(encoding="utf-8"))["articles"]]
    else:
        items = [
            (split_dir.name, path.stem)
            for split_dir in sorted(args.articles_root.iterdir())
            if split_dir.is_dir() and not split_dir.name.startswith("_")
            for path in sorted(split_dir.glob("*.json"))
        ]
    settings = TranslationSettings(num_beams=args.num_beams, batch_size=args.batch_size, device=args.device)
    translator = MarianTranslator(args.model, settings, setting="--model", download=args.download)
    report = translate_articles(items, args.articles_root, args.out_root, translator, group_size=args.group_size, progress=logger.info)
    print(json.dumps(report.summary(), ensure_ascii=False))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
