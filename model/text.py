"""The text a model reads for one (article, image) pair, by ``--mode``, and its tokenization.

Modes, as in the original NewsLXMERT:

    1 caption                      5 headline
    2 "caption headline"           6 snippet
    3 "caption snippet"            7 "snippet headline."
    4 "caption snippet headline."

Modes 1-4 need image captions, which only NYTimes800k has. For NewsImages the headline is
``title_en`` and the snippet ``text_en``.

Named-entity spans (character offsets per field) are carried into the composed text and
then mapped to tokens with the tokenizer's offset mapping, so that entity-aware masking can
find the tokens of each entity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from model.documents import ArticleText

MODES = {
    1: "caption",
    2: "caption headline",
    3: "caption snippet",
    4: "caption snippet headline.",
    5: "headline",
    6: "snippet",
    7: "snippet headline.",
}
CAPTION_MODES = frozenset({1, 2, 3, 4})
DATASETS_WITHOUT_CAPTIONS = frozenset({"newsimages"})
# The fields each mode joins, in order, and whether a final period follows.
_MODE_FIELDS: dict[int, tuple[tuple[str, ...], bool]] = {
    1: (("caption",), False),
    2: (("caption", "headline"), False),
    3: (("caption", "snippet"), False),
    4: (("caption", "snippet", "headline"), True),
    5: (("headline",), False),
    6: (("snippet",), False),
    7: (("snippet", "headline"), True),
}

Span = tuple[int, int]  # character offsets [start, end)


@dataclasses.dataclass(frozen=True)
class ComposedText:
    """The text of one pair and the character spans of its named entities."""

    text: str
    entity_spans: tuple[Span, ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """Token ids with [CLS] and [SEP], and per token whether it lies inside a named entity."""

    input_ids: np.ndarray  # (T,) int64
    entity_mask: np.ndarray  # (T,) bool
    special_mask: np.ndarray  # (T,) bool, True for [CLS] and [SEP]


def check_mode(mode: int, dataset: str) -> int:
    """Return ``mode`` if valid for ``dataset``; raise ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode} is invalid; choose one of {sorted(MODES)}: {MODES}")
    if mode in CAPTION_MODES and dataset in DATASETS_WITHOUT_CAPTIONS:
        raise ValueError(
            f"--mode {mode} ({MODES[mode]}) needs image captions, which {dataset} does not have; "
            "use mode 5 (headline), 6 (snippet) or 7 (snippet headline.)"
        )
    return mode


def _clean_spans(spans: Sequence[Any] | None, length: int) -> list[Span]:
    """Spans as (start, end) pairs inside [0, length]; entries of other shapes are skipped."""
    cleaned = []
    for span in spans or ():
        if isinstance(span, Mapping):
            start, end = span.get("start"), span.get("end")
        else:
            start, end = span[0], span[1]
        if isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= length:
            cleaned.append((start, end))
    return cleaned


def compose_text(
    text: ArticleText,
    iid: int,
    mode: int,
    entities: Mapping[str, Sequence[Any]] | None = None,
) -> ComposedText:
    """Join the fields of ``mode`` for image ``iid``; ``entities`` maps headline/snippet/caption to spans.

    Each field is stripped of surrounding whitespace and empty fields are left out, so a
    missing headline in mode 7 gives "snippet." rather than a dangling space.
    """
    fields, final_period = _MODE_FIELDS[mode]
    values = {
        "headline": text.headline or "",
        "snippet": text.snippet or "",
        "caption": text.captions[iid] if 0 <= iid < len(text.captions) else "",
    }
    pieces: list[str] = []
    spans: list[Span] = []
    offset = 0
    for field in fields:
        raw = values[field]
        stripped = raw.strip()
        if not stripped:
            continue
        if pieces:
            offset += 1  # the joining space
        lead = len(raw) - len(raw.lstrip())
        for start, end in _clean_spans((entities or {}).get(field), len(raw)):
            start, end = max(start - lead, 0), min(end - lead, len(stripped))
            if start < end:
                spans.append((offset + start, offset + end))
        pieces.append(stripped)
        offset += len(stripped)
    joined = " ".join(pieces)
    if final_period and joined:
        joined += "."
    return ComposedText(text=joined, entity_spans=tuple(spans))


def tokenize_text(tokenizer, composed: ComposedText, max_seq_len: int) -> TokenizedText:
    """Tokenize as [CLS] ... [SEP], truncated to ``max_seq_len`` tokens, and mark entity tokens.

    A token belongs to an entity when its character range overlaps an entity span.
    Needs a fast (Rust) tokenizer for the offset mapping.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} has no offset mapping; load a fast tokenizer (AutoTokenizer.from_pretrained)")
    if max_seq_len < 3:
        raise ValueError(f"--maxSeqLen {max_seq_len} is too small; it must hold [CLS], a token and [SEP]")
    encoding = tokenizer(
        composed.text,
        truncation=True,
        max_length=max_seq_len,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    input_ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    special = np.asarray(encoding["special_tokens_mask"], dtype=bool)
    entity = np.zeros(len(input_ids), dtype=bool)
    if composed.entity_spans:
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        for start, end in composed.entity_spans:
            entity |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        entity &= ~special
    return TokenizedText(input_ids=input_ids, entity_mask=entity, special_mask=special)
