"""BERT-style masking of tokens, regions and faces for NewsLXMERT pre-training.

Tokens: each is chosen with probability ``lm_ratio`` (0.15), or ``entity_ratio`` (0.30) when
it lies inside a named entity and entity masking is on. A chosen token becomes [MASK] 80% of
the time, a random token 10% and stays 10%; its label is the original id, other labels -100.

Regions and faces: each is chosen with probability ``ratio`` (0.15). A chosen one is zeroed
80% of the time, replaced by a feature of another item 10%, and kept 10%. Only the real
faces of an image can be chosen, never its padded face slots.

Every function takes a ``numpy.random.Generator`` so that a sample's masks depend only on
the seed it was built from, not on which DataLoader worker built it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MASK_SHARE = 0.8  # of the chosen tokens: replaced by [MASK] or zeroed
RANDOM_SHARE = 0.1  # replaced by a random token or another item's feature; the rest stay


def mask_tokens(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_token_id: int,
    replacement_ids: np.ndarray,
    special_mask: np.ndarray | None = None,
    entity_mask: np.ndarray | None = None,
    lm_ratio: float = 0.15,
    entity_ratio: float = 0.30,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (masked input ids, labels); special tokens ([CLS], [SEP]) are never chosen.

    ``replacement_ids`` are the ids a randomly replaced token may take (the vocabulary
    without special tokens). ``entity_mask`` None means no entity-aware masking.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    length = len(input_ids)
    probability = np.full(length, lm_ratio, dtype=np.float64)
    if entity_mask is not None:
        probability = np.where(entity_mask, entity_ratio, probability)
    if special_mask is not None:
        probability = np.where(special_mask, 0.0, probability)

    chosen = rng.random(length) < probability
    action = rng.random(length)
    random_tokens = rng.choice(replacement_ids, size=length)

    masked = input_ids.copy()
    to_mask = chosen & (action < MASK_SHARE)
    to_random = chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    masked[to_mask] = mask_token_id
    masked[to_random] = random_tokens[to_random]
    labels = np.where(chosen, input_ids, -100).astype(np.int64)
    return masked, labels


def mask_features(
    features: np.ndarray,
    rng: np.random.Generator,
    *,
    ratio: float = 0.15,
    valid: np.ndarray | None = None,
    replacement: Callable[[np.random.Generator], np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (masked features (n, D), mask (n,) float32 with 1 at chosen rows).

    ``valid`` limits the choice to real rows (padded face slots are never chosen).
    ``replacement(rng)`` returns a (D,) feature of another item, or None when there is none;
    then the row is kept, which still counts as chosen.
    """
    features = np.asarray(features, dtype=np.float32)
    count = features.shape[0]
    chosen = rng.random(count) < ratio
    if valid is not None:
        chosen &= np.asarray(valid, dtype=bool)
    action = rng.random(count)

    masked = features.copy()
    masked[chosen & (action < MASK_SHARE)] = 0.0
    if replacement is not None:
        for row in np.flatnonzero(chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)):
            other = replacement(rng)
            if other is not None:
                masked[row] = other
    return masked, chosen.astype(np.float32)
