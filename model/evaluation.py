"""Retrieval evaluation: pools, exact cross-encoder scoring, ranks, MRR@100 and R@k.

Entry point for the training command line's ``--test`` and for the evaluation assets::

    model, tokenizer = load_evaluation_model(checkpoint_folder, device)
    pools = {
        split: build_pool(split, load_index(parquet_path), size, articles=..., regions=...,
                          faces=..., tokenizer=tokenizer, data_config=PairDatasetConfig(...))
        for split, size in DEFAULT_POOL_SIZES.items()
    }
    report = evaluate_checkpoint(
        model,                      # NewsLxmertForPreTraining, or anything with the four methods below
        pools,                      # {"test": EvaluationPool, "valid": EvaluationPool}
        output_dir,                 # e.g. <data_root>/<dataset>/evaluation
        settings=ScoringSettings(), # method "fast" (default) or "naive", batch sizes
        device=None,                # default: the device of the model's parameters
        model_fingerprint=None,     # a string naming the checkpoint; enables reuse of saved scores
    )
    print(report.table_markdown)

``build_pool`` reads texts, regions and faces through ``model.dataset.NewsPairDataset``
with the lookups that training uses. ``pool_from_batch`` builds a pool from tensors that
are already collated under the standard input names.

For a pool of N pairs, every image is scored against every text with the match
probability softmax(logits)[1]. Image to text ranks the N texts for each image, text to
image ranks the N images for each text. A rank is 0-based and counts every other
candidate whose score is greater than or equal to the true partner's, so ties never
favour the true item.

The model must provide:

- ``encode_text(input_ids, attention_mask, token_type_ids) -> lang_hidden (B, T, H)``
- ``encode_visual(visual_feats, visual_pos, face_feats, face_mask) -> (vis_hidden (B, V, H), vis_mask (B, V))``
- ``cross_encode(lang_hidden, attention_mask, vis_hidden, vis_mask) -> (lang_out, vis_out, pooled)``
- ``match_logits(pooled) -> (B, 2)``, index 1 = match.

The language and object-relationship layers see one modality only, so ``fast`` scoring
runs them once per item and only the cross-modality layers once per pair. ``naive``
scoring runs all layers for every pair, as a plain forward pass does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from model.storage import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_RECALL_KS = (1, 5, 10, 20, 50, 100)
MRR_CUTOFF = 100
DEFAULT_POOL_SIZES = {"test": 1000, "valid": 500}
# The original NewsLXMERT code (src/lxmert.py, src/lxmert_metrics.py) requests 1,000 test
# and 500 valid items but takes whole batches of 64, so it scores 1,024 and 512.
ORIGINAL_POOL_SIZES = {"test": 1024, "valid": 512}
DIRECTIONS = ("image_to_text", "text_to_image")
DIRECTION_LABELS = {"image_to_text": "image → text", "text_to_image": "text → image"}

# Pool building stops when this many pairs in a row fail before any loads: then the cause
# is a missing stage rather than a few bad items.
MAX_FAILURES_BEFORE_FIRST_ITEM = 100

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
VISUAL_KEYS = ("visual_feats", "visual_pos", "face_feats", "face_mask")


# ---------------------------------------------------------------------------
# Metrics


def ranks_from_scores(scores: np.ndarray | torch.Tensor, true_index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Compute the 0-based rank of each query's true candidate.

    ``scores`` has shape (queries, candidates); ``true_index[q]`` is the column of query
    ``q``'s true partner (default: the diagonal). The rank counts the other candidates
    whose score is greater than or equal to the true score, so a tie ranks the true item
    last among the tied ones. A NaN score counts against the true item: a NaN candidate
    beats it, and a NaN true score gets the worst rank, candidates - 1.
    """
    scores = _as_numpy(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (queries, candidates) matrix, got shape {scores.shape}")
    n_queries, n_candidates = scores.shape
    if true_index is None:
        if n_queries > n_candidates:
            raise ValueError(f"diagonal ranks need at least as many candidates as queries, got shape {scores.shape}")
        true_index = np.arange(n_queries)
    true_index = np.asarray(true_index, dtype=np.int64)
    if true_index.shape != (n_queries,):
        raise ValueError(f"true_index must have one entry per query ({n_queries}), got shape {true_index.shape}")
    if n_queries and (true_index.min() < 0 or true_index.max() >= n_candidates):
        raise ValueError(f"true_index values must lie in [0, {n_candidates}), got {true_index.min()}..{true_index.max()}")

    rows = np.arange(n_queries)
    true_scores = scores[rows, true_index]
    beats_true = (scores >= true_scores[:, None]) | np.isnan(scores)
    beats_true[rows, true_index] = False
    ranks = beats_true.sum(axis=1).astype(np.int64)
    ranks[np.isnan(true_scores)] = n_candidates - 1
    return ranks


def retrieval_metrics(
    ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_RECALL_KS, mrr_cutoff: int = MRR_CUTOFF
) -> dict[str, float]:
    """Compute MRR@cutoff, R@k, median and mean rank from 0-based ranks.

    MRR@cutoff averages 1/(rank+1) over all queries, counting 0 for a rank >= cutoff.
    R@k is the share of queries whose true partner is among the top k. The median and
    mean ranks are 1-based, as usually reported.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-d array, got shape {ranks.shape}")
    if ranks.min() < 0:
        raise ValueError(f"ranks are 0-based and must be >= 0, got {ranks.min()}")
    reciprocal = np.where(ranks < mrr_cutoff, 1.0 / (ranks + 1.0), 0.0)
    metrics = {f"mrr@{mrr_cutoff}": float(reciprocal.mean())}
    for k in ks:
        metrics[f"r@{k}"] = float(np.mean(ranks < k))
    metrics["median_rank"] = float(np.median(ranks + 1))
    metrics["mean_rank"] = float(np.mean(ranks + 1))
    metrics["queries"] = int(ranks.size)
    return metrics


def random_baseline(n_candidates: int, ks: Sequence[int] = DEFAULT_RECALL_KS, mrr_cutoff: int = MRR_CUTOFF) -> dict[str, float]:
    """Return the expected metrics of a uniformly random ranking of ``n_candidates``.

    The true item's rank is then uniform on 0..N-1, so MRR@c = H(min(N, c)) / N with H
    the harmonic number, R@k = min(k, N) / N and the expected 1-based mean rank (N+1)/2.
    The median rank of a large pool is about (N+1)/2 as well.
    """
    if n_candidates < 1:
        raise ValueError(f"a pool needs at least one candidate, got {n_candidates}")
    top = min(n_candidates, mrr_cutoff)
    harmonic = float(np.sum(1.0 / np.arange(1, top + 1)))
    baseline = {f"mrr@{mrr_cutoff}": harmonic / n_candidates}
    for k in ks:
        baseline[f"r@{k}"] = min(k, n_candidates) / n_candidates
    baseline["median_rank"] = (n_candidates + 1) / 2
    baseline["mean_rank"] = (n_candidates + 1) / 2
    return baseline


# ---------------------------------------------------------------------------
# Pools


@dataclasses.dataclass(frozen=True)
class PoolSelection:
    """The index pairs chosen for a pool, and the counts of those passed over."""

    items: list[tuple[str, int]]
    requested: int | None
    available: int  # pairs in the split's index
    skipped_same_article: int
    failures: tuple[tuple[str, int, str], ...] = ()  # (aid, iid, reason) of pairs whose inputs failed to load

    @property
    def complete(self) -> bool:
        return self.requested is None or len(self.items) == self.requested

    def summary(self) -> dict[str, Any]:
        return {
            "size": len(self.items),
            "requested": self.requested,
            "available": self.available,
            "skipped_same_article": self.skipped_same_article,
            "failed": len(self.failures),
            "failed_examples": [list(failure) for failure in self.failures[:10]],
        }


def _walk_index(
    index_items: Sequence[tuple[str, int]],
    size: int | None,
    distinct_articles: bool,
    load: Callable[[int], Any] | None = None,
) -> tuple[PoolSelection, list[Any]]:
    """Take pairs in index order until ``size`` are chosen; ``load(position)`` may raise to skip one."""
    if size is not None and size < 2:
        raise ValueError(f"a retrieval pool needs at least 2 items, got pool size {size}")
    chosen: list[tuple[str, int]] = []
    loaded: list[Any] = []
    failures: list[tuple[str, int, str]] = []
    seen_articles: set[str] = set()
    skipped = 0
    for position, (aid, iid) in enumerate(index_items):
        if size is not None and len(chosen) == size:
            break
        aid, iid = str(aid), int(iid)
        if distinct_articles and aid in seen_articles:
            skipped += 1
            continue
        if load is not None:
            try:
                loaded.append(load(position))
            except (KeyError, IndexError, FileNotFoundError, ValueError) as error:
                failures.append((aid, iid, str(error)))
                if not loaded and len(failures) >= MAX_FAILURES_BEFORE_FIRST_ITEM:
                    raise ValueError(
                        f"the first {len(failures)} pairs of the index all failed to load, so a stage is probably "
                        f"missing; first failure: pair ({failures[0][0]}, {failures[0][1]}): {failures[0][2]}"
                    ) from error
                continue
        seen_articles.add(aid)
        chosen.append((aid, iid))
    selection = PoolSelection(
        items=chosen, requested=size, available=len(index_items), skipped_same_article=skipped, failures=tuple(failures)
    )
    return selection, loaded


def select_pool(index_items: Sequence[tuple[str, int]], size: int | None, *, distinct_articles: bool = True) -> PoolSelection:
    """Take the first ``size`` pairs of a split's index (all of them when ``size`` is None).

    With ``distinct_articles`` a pair whose article is already in the pool is passed over.
    Two images of one NYTimes800k article share its headline and snippet, so with a text
    mode without captions both texts would be identical. The true text would then tie
    with a copy of itself and lose the tie. NewsImages has one image per article, so
    nothing is skipped there. A split with fewer pairs gives a smaller pool, and
    ``complete`` is then False so the caller can report it.
    """
    selection, _ = _walk_index(index_items, size, distinct_articles)
    return selection


@dataclasses.dataclass
class TextInputs:
    """Tokenized texts of a pool, one row per item."""

    input_ids: torch.Tensor  # (N, T) int64
    attention_mask: torch.Tensor  # (N, T), 1 for real tokens
    token_type_ids: torch.Tensor  # (N, T) int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[index].to(device) for name in TEXT_KEYS}


@dataclasses.dataclass
class VisualInputs:
    """Region features (and faces) of a pool, one row per item."""

    visual_feats: torch.Tensor  # (N, 36, D)
    visual_pos: torch.Tensor  # (N, 36, 4), normalized boxes
    face_feats: torch.Tensor | None = None  # (N, 10, 512)
    face_mask: torch.Tensor | None = None  # (N, 10), 1 for real faces

    def __len__(self) -> int:
        return int(self.visual_feats.shape[0])

    def rows(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | None]:
        return {
            name: None if getattr(self, name) is None else getattr(self, name)[index].to(device) for name in VISUAL_KEYS
        }


@dataclasses.dataclass
class EvaluationPool:
    """The N matched pairs of one split that are scored all against all."""

    split: str
    items: list[tuple[str, int]]  # (aid, iid) of row i of both inputs
    texts: TextInputs
    visuals: VisualInputs
    selection: PoolSelection | None = None

    def __post_init__(self) -> None:
        if not (len(self.items) == len(self.texts) == len(self.visuals)):
            raise ValueError(
                f"pool {self.split!r}: {len(self.items)} items but {len(self.texts)} texts and "
                f"{len(self.visuals)} images; every item needs exactly one text and one image"
            )
        if len(self.items) < 2:
            raise ValueError(f"pool {self.split!r} has {len(self.items)} item(s); retrieval needs at least 2")

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """Hash the split and item list, to tell whether saved scores belong to this pool."""
        return hashlib.sha256(json.dumps([self.split, self.items]).encode("utf-8")).hexdigest()[:16]


def pool_from_batch(
    split: str, items: Sequence[tuple[str, int]], batch: Mapping[str, Any], selection: PoolSelection | None = None
) -> EvaluationPool:
    """Build a pool from collated model inputs with the standard names.

    ``batch`` contains ``input_ids``, ``attention_mask``, ``token_type_ids`` (N, T),
    ``visual_feats`` (N, 36, D), ``visual_pos`` (N, 36, 4) and optionally ``face_feats``
    (N, 10, 512) with ``face_mask`` (N, 10). Other keys, such as labels, are ignored.
    """
    missing = [name for name in ("input_ids", "visual_feats", "visual_pos") if name not in batch]
    if missing:
        raise KeyError(f"pool {split!r}: model inputs lack {missing}; present are {sorted(batch)}")
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    token_type_ids = batch.get("token_type_ids")
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    face_feats = batch.get("face_feats")
    face_mask = batch.get("face_mask")
    if face_feats is not None and face_mask is None:
        raise KeyError(f"pool {split!r}: face_feats given without face_mask; pass both or neither")
    texts = TextInputs(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    visuals = VisualInputs(batch["visual_feats"], batch["visual_pos"], face_feats, face_mask)
    return EvaluationPool(split=split, items=[(str(a), int(i)) for a, i in items], texts=texts, visuals=visuals, selection=selection)


def build_pool(
    split: str,
    index_items: Sequence[tuple[str, int]],
    size: int | None,
    *,
    articles: Callable[[str], Any],
    regions: Callable[[str], Mapping[str, Any]],
    tokenizer,
    data_config,
    faces: Callable[[str], Mapping[str, Any]] | None = None,
    distinct_articles: bool = True,
) -> EvaluationPool:
    """Load the model inputs of the first ``size`` usable pairs of a split's index.

    Texts, regions and faces come from ``model.dataset.NewsPairDataset`` with the
    lookups and ``data_config`` (a ``PairDatasetConfig``: dataset, mode, max_seq_len,
    use_faces) that training uses, without masking or negatives. A pair whose article,
    regions or faces fail to load is recorded in ``selection.failures`` and the next
    pair of the index takes its place.
    """
    from model.dataset import NewsPairDataset, collate_samples

    if not index_items:
        raise ValueError(f"the {split} index is empty; there is nothing to evaluate")
    # Sample building reads only the lookups below, so negatives are switched off: they
    # would need two articles and play no part here.
    dataset = NewsPairDataset(
        index_items,
        articles,
        regions,
        tokenizer,
        dataclasses.replace(data_config, negative_ratio=0.0),
        faces=faces,
        fixed_epoch=0,
    )

    def load(position: int) -> dict[str, np.ndarray]:
        text = dataset.text(position)
        found = dataset.image_regions(position)
        sample = {
            "input_ids": text.input_ids,
            "labels": np.full(len(text.input_ids), -100, dtype=np.int64),
            "visual_feats": found["roi_features"],
            "visual_pos": found["normalized_boxes"],
        }
        if data_config.use_faces:
            sample["face_feats"], sample["face_mask"] = dataset.image_faces(position)
        return sample

    selection, samples = _walk_index(index_items, size, distinct_articles, load)
    for aid, iid, reason in selection.failures[:10]:
        logger.warning("pool %s: pair (%s, %s) left out: %s", split, aid, iid, reason)
    if len(samples) < 2:
        raise ValueError(
            f"pool {split!r}: only {len(samples)} of {len(index_items)} pairs could be loaded "
            f"({len(selection.failures)} failed, first: {selection.failures[:1]}); a pool needs at least 2"
        )
    batch = collate_samples(samples, pad_token_id=tokenizer.pad_token_id or 0)
    return pool_from_batch(split, selection.items, batch, selection)


def load_split_pool(
    dataset_root: Path | str,
    dataset: str,
    split: str,
    size: int | None,
    *,
    tokenizer,
    data_config,
    distinct_articles: bool = True,
) -> EvaluationPool:
    """Build the pool of one split from the pipeline's folders under ``dataset_root``.

    Reads the index's Parquet twin ``index/<split>.parquet``, the article JSON files of the
    dataset's text stage, the region features and, when ``data_config.use_faces``, the
    face features.
    """
    from model.dataset import ArticleStore
    from model.documents import TEXT_STAGE
    from model.faces import FaceFeatureReader
    from model.index import index_folder, load_index
    from model.regions import RegionFeatureReader

    dataset_root = Path(dataset_root)
    index_items = load_index(index_folder(dataset_root) / f"{split}.parquet")
    faces = FaceFeatureReader(dataset_root, max_faces=data_config.max_faces).get if data_config.use_faces else None
    return build_pool(
        split,
        index_items,
        size,
        articles=ArticleStore(dataset_root / TEXT_STAGE[dataset] / split),
        regions=RegionFeatureReader(dataset_root).get,
        faces=faces,
        tokenizer=tokenizer,
        data_config=data_config,
        distinct_articles=distinct_articles,
    )


def load_evaluation_model(folder: Path | str, device: torch.device | str = "cpu"):
    """Load a checkpoint folder written by training: the model (in eval mode) and its tokenizer."""
    from transformers import AutoTokenizer

    from model.modeling import NewsLxmertForPreTraining

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint in {folder} (config.json missing); train the model first")
    model = NewsLxmertForPreTraining.from_pretrained(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


# ---------------------------------------------------------------------------
# Scoring


class CrossEncoder(Protocol):
    """The four methods of NewsLxmertForPreTraining that scoring uses."""

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor: ...

    def encode_visual(
        self,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        face_feats: torch.Tensor | None,
        face_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def cross_encode(
        self, lang_hidden: torch.Tensor, attention_mask: torch.Tensor, vis_hidden: torch.Tensor, vis_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def match_logits(self, pooled: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """Settings of the N x N scoring of a pool."""

    method: str = "fast"  # "fast": per-item encoders once, cross layers per pair; "naive": every layer per pair
    pair_batch_size: int = 128  # pairs per cross-encoder call
    encode_batch_size: int = 64  # items per encode_text / encode_visual call in fast scoring
    # Drop trailing positions that no pair in a batch attends to. Masked positions get
    # zero attention weight, so the scores are unchanged up to float rounding.
    trim_padding: bool = True
    log_every_s: float = 30.0

    def __post_init__(self) -> None:
        if self.method not in ("fast", "naive"):
            raise ValueError(f"scoring method must be 'fast' or 'naive', got {self.method!r}")
        if self.pair_batch_size < 1 or self.encode_batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got pair_batch_size={self.pair_batch_size}, "
                f"encode_batch_size={self.encode_batch_size}"
            )


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _used_length(mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past the last position with a non-zero mask (0 for an all-zero row)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask != 0) * positions).amax(dim=1)


def _pair_chunks(
    n_images: int, n_texts: int, text_order: torch.Tensor, pair_batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (image index, text index) batches covering all pairs, text-major in ``text_order``.

    Consecutive pairs share a text, so with texts sorted by length a batch contains texts of
    similar length and trimming removes most padding.
    """
    total = n_images * n_texts
    for start in range(0, total, pair_batch_size):
        flat = torch.arange(start, min(start + pair_batch_size, total))
        yield flat % n_images, text_order[flat // n_images]


class _Progress:
    def __init__(self, total: int, what: str, every_s: float, callback: Callable[[int, int], None] | None):
        self.total, self.what, self.every_s, self.callback = total, what, every_s, callback
        self.start = self.last = time.perf_counter()
        self.done = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.callback is not None:
            self.callback(self.done, self.total)
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info("%s: %d/%d pairs, %.0f pairs/s", self.what, self.done, self.total, rate)


def _match_probability(model: CrossEncoder, lang_hidden, attention_mask, vis_hidden, vis_mask) -> torch.Tensor:
    _, _, pooled = model.cross_encode(lang_hidden, attention_mask, vis_hidden, vis_mask)
    logits = model.match_logits(pooled)  # (B, 2)
    return torch.softmax(logits.float(), dim=-1)[:, 1]


@torch.inference_mode()
def naive_score_matrix(
    model: CrossEncoder,
    texts: TextInputs,
    visuals: VisualInputs,
    *,
    pair_batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    log_every_s: float = 30.0,
) -> torch.Tensor:
    """Score every (image, text) pair with the full network, every layer run per pair.

    Returns the match probabilities as a float32 (images, texts) matrix on the CPU.
    Each batch of pairs runs encode_text, encode_visual, cross_encode and match_logits,
    which is what the model's forward pass composes.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    n_images, n_texts = len(visuals), len(texts)
    scores = torch.empty(n_images, n_texts, dtype=torch.float32)
    tracker = _Progress(n_images * n_texts, "naive scoring", log_every_s, progress)
    for image_index, text_index in _pair_chunks(n_images, n_texts, torch.arange(n_texts), pair_batch_size):
        text_rows = texts.rows(text_index, device)
        visual_rows = visuals.rows(image_index, device)
        lang_hidden = model.encode_text(text_rows["input_ids"], text_rows["attention_mask"], text_rows["token_type_ids"])
        vis_hidden, vis_mask = model.encode_visual(
            visual_rows["visual_feats"], visual_rows["visual_pos"], visual_rows["face_feats"], visual_rows["face_mask"]
        )
        probability = _match_probability(model, lang_hidden, text_rows["attention_mask"], vis_hidden, vis_mask)
        scores[image_index, text_index] = probability.cpu()
        tracker.advance(len(image_index))
    return scores


@torch.inference_mode()
def encode_pool(
    model: CrossEncoder,
    texts: TextInputs,
    visuals: VisualInputs,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the single-modality layers once per item.

    Returns ``lang_hidden`` (N_texts, T, H), the text attention mask (N_texts, T),
    ``vis_hidden`` (N_images, V, H) and ``vis_mask`` (N_images, V), all on ``device``.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    lang_parts, vis_parts, vis_mask_parts = [], [], []
    for start in range(0, len(texts), batch_size):
        rows = texts.rows(torch.arange(start, min(start + batch_size, len(texts))), device)
        lang_parts.append(model.encode_text(rows["input_ids"], rows["attention_mask"], rows["token_type_ids"]))
    for start in range(0, len(visuals), batch_size):
        rows = visuals.rows(torch.arange(start, min(start + batch_size, len(visuals))), device)
        vis_hidden, vis_mask = model.encode_visual(rows["visual_feats"], rows["visual_pos"], rows["face_feats"], rows["face_mask"])
        vis_parts.append(vis_hidden)
        vis_mask_parts.append(vis_mask)
    lang_hidden = torch.cat(lang_parts)  # (N_texts, T, H)
    vis_hidden = torch.cat(vis_parts)  # (N_images, V, H)
    vis_mask = torch.cat(vis_mask_parts)  # (N_images, V)
    return lang_hidden, texts.attention_mask.to(device), vis_hidden, vis_mask


@torch.inference_mode()
def fast_score_matrix(
    model: CrossEncoder,
    texts: TextInputs,
    visuals: VisualInputs,
    *,
    pair_batch_size: int = 128,
    encode_batch_size: int = 64,
    trim_padding: bool = True,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    log_every_s: float = 30.0,
) -> torch.Tensor:
    """Score every (image, text) pair, running only the cross-modality layers per pair.

    Texts and images are encoded once (``encode_pool``) and their hidden states are
    gathered into pair batches for ``cross_encode`` and ``match_logits``. The result
    equals ``naive_score_matrix`` up to float rounding: a float32 (images, texts) matrix
    on the CPU.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    lang_hidden, text_mask, vis_hidden, vis_mask = encode_pool(
        model, texts, visuals, batch_size=encode_batch_size, device=device
    )
    text_length = _used_length(text_mask)  # (N_texts,)
    visual_length = _used_length(vis_mask)  # (N_images,)
    text_order = torch.argsort(text_length.cpu(), descending=True, stable=True)

    n_images, n_texts = len(visuals), len(texts)
    scores = torch.empty(n_images, n_texts, dtype=torch.float32)
    tracker = _Progress(n_images * n_texts, "fast scoring", log_every_s, progress)
    for image_index, text_index in _pair_chunks(n_images, n_texts, text_order, pair_batch_size):
        image_rows, text_rows = image_index.to(device), text_index.to(device)
        t_used = int(text_length[text_rows].max()) if trim_padding else lang_hidden.shape[1]
        v_used = int(visual_length[image_rows].max()) if trim_padding else vis_hidden.shape[1]
        probability = _match_probability(
            model,
            lang_hidden[text_rows, :t_used],  # (B, t, H)
            text_mask[text_rows, :t_used],  # (B, t)
            vis_hidden[image_rows, :v_used],  # (B, v, H)
            vis_mask[image_rows, :v_used],  # (B, v)
        )
        scores[image_index, text_index] = probability.cpu()
        tracker.advance(len(image_index))
    return scores


def score_pool(
    model: CrossEncoder,
    pool: EvaluationPool,
    settings: ScoringSettings = ScoringSettings(),
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Return the (images, texts) match-probability matrix of ``pool`` with the chosen method."""
    if settings.method == "naive":
        return naive_score_matrix(
            model,
            pool.texts,
            pool.visuals,
            pair_batch_size=settings.pair_batch_size,
            device=device,
            progress=progress,
            log_every_s=settings.log_every_s,
        )
    return fast_score_matrix(
        model,
        pool.texts,
        pool.visuals,
        pair_batch_size=settings.pair_batch_size,
        encode_batch_size=settings.encode_batch_size,
        trim_padding=settings.trim_padding,
        device=device,
        progress=progress,
        log_every_s=settings.log_every_s,
    )


# ---------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class DirectionResult:
    """Ranks and metrics of one retrieval direction over one pool."""

    direction: str
    ranks: np.ndarray  # (N,) 0-based rank of the true partner per query
    true_scores: np.ndarray  # (N,) match probability of the true pair
    top_candidates: np.ndarray  # (N,) pool position of each query's highest-scoring candidate
    metrics: dict[str, float]


@dataclasses.dataclass
class PoolResult:
    """Scores, ranks and metrics of one pool in both directions."""

    split: str
    items: list[tuple[str, int]]
    scores: np.ndarray  # (N images, N texts)
    directions: dict[str, DirectionResult]
    seconds: float
    method: str
    nan_scores: int
    selection: PoolSelection | None = None
    reused_scores: bool = False

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def pairs_per_second(self) -> float:
        return self.size * self.size / self.seconds if self.seconds > 0 else float("nan")


def results_from_scores(
    split: str,
    items: Sequence[tuple[str, int]],
    scores: np.ndarray | torch.Tensor,
    *,
    seconds: float = 0.0,
    method: str = "fast",
    selection: PoolSelection | None = None,
) -> PoolResult:
    """Rank both directions of an (images, texts) score matrix with the true pairs on its diagonal."""
    scores = _as_numpy(scores).astype(np.float32, copy=False)
    if scores.shape != (len(items), len(items)):
        raise ValueError(f"pool {split!r}: scores have shape {scores.shape}, expected ({len(items)}, {len(items)})")
    directions = {}
    for direction, matrix in (("image_to_text", scores), ("text_to_image", scores.T)):
        ranks = ranks_from_scores(matrix)
        directions[direction] = DirectionResult(
            direction=direction,
            ranks=ranks,
            true_scores=np.diagonal(matrix).copy(),
            top_candidates=np.argmax(np.where(np.isnan(matrix), -np.inf, matrix), axis=1),
            metrics=retrieval_metrics(ranks),
        )
    return PoolResult(
        split=split,
        items=list(items),
        scores=scores,
        directions=directions,
        seconds=seconds,
        method=method,
        nan_scores=int(np.isnan(scores).sum()),
        selection=selection,
    )


def evaluate_pool(
    model: CrossEncoder,
    pool: EvaluationPool,
    settings: ScoringSettings = ScoringSettings(),
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PoolResult:
    """Score ``pool`` all against all and rank both directions."""
    model_was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        start = time.perf_counter()
        scores = score_pool(model, pool, settings, device=device, progress=progress)
        seconds = time.perf_counter() - start
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(model_was_training)
    result = results_from_scores(pool.split, pool.items, scores, seconds=seconds, method=settings.method, selection=pool.selection)
    if result.nan_scores:
        logger.warning(
            "pool %s: %d of %d scores are NaN; they count against the true items",
            pool.split,
            result.nan_scores,
            result.scores.size,
        )
    return result


# ---------------------------------------------------------------------------
# Reports


_TABLE_COLUMNS = [f"mrr@{MRR_CUTOFF}"] + [f"r@{k}" for k in DEFAULT_RECALL_KS] + ["median_rank", "mean_rank"]


def _column_title(key: str) -> str:
    return {"median_rank": "median rank", "mean_rank": "mean rank"}.get(key, key.upper())


def _format_value(key: str, value: float) -> str:
    return f"{value:.1f}" if key.endswith("_rank") else f"{value:.4f}"


def metrics_table_markdown(results: Sequence[PoolResult]) -> str:
    """Return a markdown table: one row per pool and direction, then that pool's random baseline."""
    header = ["pool", "N", "direction"] + [_column_title(key) for key in _TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        for direction in DIRECTIONS:
            metrics = result.directions[direction].metrics
            cells = [result.split, str(result.size), DIRECTION_LABELS[direction]]
            cells += [_format_value(key, metrics[key]) for key in _TABLE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        baseline = random_baseline(result.size)
        cells = [result.split, str(result.size), "random ranking"] + [_format_value(key, baseline[key]) for key in _TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranks_table(results: Sequence[PoolResult]):
    """Return one row per query as a pyarrow Table: split, direction, query, aid, iid, rank, scores."""
    import pyarrow as pa

    columns: dict[str, list] = {
        name: []
        for name in ("split", "direction", "query", "aid", "iid", "rank", "true_score", "top_aid", "top_iid", "top_score")
    }
    for result in results:
        for direction in DIRECTIONS:
            outcome = result.directions[direction]
            matrix = result.scores if direction == "image_to_text" else result.scores.T
            for query, (aid, iid) in enumerate(result.items):
                top = int(outcome.top_candidates[query])
                columns["split"].append(result.split)
                columns["direction"].append(direction)
                columns["query"].append(query)
                columns["aid"].append(aid)
                columns["iid"].append(iid)
                columns["rank"].append(int(outcome.ranks[query]))
                columns["true_score"].append(float(outcome.true_scores[query]))
                columns["top_aid"].append(result.items[top][0])
                columns["top_iid"].append(result.items[top][1])
                columns["top_score"].append(float(matrix[query, top]))
    schema = pa.schema(
        [
            ("split", pa.string()),
            ("direction", pa.string()),
            ("query", pa.int32()),
            ("aid", pa.string()),
            ("iid", pa.int32()),
            ("rank", pa.int32()),
            ("true_score", pa.float32()),
            ("top_aid", pa.string()),
            ("top_iid", pa.int32()),
            ("top_score", pa.float32()),
        ]
    )
    return pa.table(columns, schema=schema)


def write_ranks_parquet(results: Sequence[PoolResult], path: Path | str) -> Path:
    """Write the per-query ranks of every pool and direction to one Parquet file, atomically."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(ranks_table(results), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_rank_histogram(results: Sequence[PoolResult], path: Path | str, title: str = "") -> Path:
    """Draw each pool's rank distribution for both directions and save it as a PNG, atomically.

    One panel per pool. The dashed line is the count per bin that a random ranking
    would give, since its ranks are uniform over 1..N.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for axis, result in zip(axes[0], results):
        n = result.size
        bin_count = min(50, n)
        edges = np.linspace(0.5, n + 0.5, bin_count + 1)
        for direction in DIRECTIONS:
            ranks_1_based = result.directions[direction].ranks + 1
            mrr = result.directions[direction].metrics[f"mrr@{MRR_CUTOFF}"]
            axis.hist(ranks_1_based, bins=edges, histtype="step", linewidth=1.5, label=f"{DIRECTION_LABELS[direction]} (MRR@100 {mrr:.3f})")
        axis.axhline(n / bin_count, color="grey", linestyle="--", linewidth=1, label="random ranking")
        if n > MRR_CUTOFF:
            axis.axvline(MRR_CUTOFF + 0.5, color="black", linestyle=":", linewidth=1, label="rank 100")
        axis.set_xlabel("rank of the true partner (1 = best)")
        axis.set_ylabel("queries")
        axis.set_title(f"{result.split} pool, N = {n}")
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------
# Saved scores, so that a rerun with the same checkpoint and pool skips the scoring


def _scores_path(output_dir: Path, split: str) -> Path:
    return output_dir / "scores" / f"{split}.npz"


def _load_saved_scores(output_dir: Path, pool: EvaluationPool, key: str) -> np.ndarray | None:
    path = _scores_path(output_dir, pool.split)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            scores = saved["scores"]
    except (OSError, KeyError, ValueError) as error:
        logger.warning("saved scores %s are unreadable (%s); scoring again", path, error)
        return None
    if scores.shape != (len(pool), len(pool)):
        return None
    return scores


def _save_scores(output_dir: Path, split: str, key: str, scores: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), scores=scores)
    atomic_write_bytes(_scores_path(output_dir, split), buffer.getvalue())


@dataclasses.dataclass
class EvaluationReport:
    """Everything ``evaluate_checkpoint`` produced."""

    results: dict[str, PoolResult]
    table_markdown: str
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> direction (or "random") -> metrics
    ranks_path: Path
    histogram_path: Path
    metrics_path: Path
    seconds: float


def evaluate_checkpoint(
    model: CrossEncoder,
    pools: Mapping[str, EvaluationPool],
    output_dir: Path | str,
    *,
    settings: ScoringSettings = ScoringSettings(),
    device: torch.device | str | None = None,
    model_fingerprint: str | None = None,
    title: str = "",
    progress: Callable[[str, int, int], None] | None = None,
) -> EvaluationReport:
    """Evaluate ``model`` on each pool and write the report files into ``output_dir``.

    Writes ``metrics.json`` and ``metrics.md`` (the table), ``ranks.parquet`` (one row
    per query and direction) and ``rank_histogram.png``. With ``model_fingerprint`` the
    score matrices are also saved under ``scores/``. A rerun with the same fingerprint,
    pool and method then reuses them, so an interrupted evaluation of several pools
    resumes at the first pool that was not finished. ``progress(split, done, total)`` is
    called with 0 pairs before each pool is scored and after every batch of pairs.
    """
    if not pools:
        raise ValueError("evaluate_checkpoint needs at least one pool, such as {'test': ...}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, PoolResult] = {}
    for name, pool in pools.items():
        key = f"{model_fingerprint}|{pool.fingerprint()}|{settings.method}" if model_fingerprint else None
        saved = _load_saved_scores(output_dir, pool, key) if key else None
        if saved is not None:
            logger.info("pool %s: reusing saved scores for checkpoint %s", name, model_fingerprint)
            result = results_from_scores(pool.split, pool.items, saved, method=settings.method, selection=pool.selection)
            result.reused_scores = True
        else:
            logger.info("pool %s: scoring %d x %d pairs (%s)", name, len(pool), len(pool), settings.method)
            callback = None
            if progress is not None:
                progress(name, 0, len(pool) * len(pool))
                callback = lambda done, total, split=name: progress(split, done, total)  # noqa: E731
            result = evaluate_pool(model, pool, settings, device=device, progress=callback)
            if key:
                _save_scores(output_dir, pool.split, key, result.scores)
        for direction in DIRECTIONS:
            metrics = result.directions[direction].metrics
            logger.info("pool %s %s: MRR@100 %.4f, R@1 %.4f, R@10 %.4f", name, direction, metrics["mrr@100"], metrics["r@1"], metrics["r@10"])
        results[name] = result

    ordered = list(results.values())
    table = metrics_table_markdown(ordered)
    metrics = {
        name: {**{d: result.directions[d].metrics for d in DIRECTIONS}, "random": random_baseline(result.size)}
        for name, result in results.items()
    }
    metrics_path = output_dir / "metrics.json"
    atomic_write_text(metrics_path, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    atomic_write_text(output_dir / "metrics.md", table)
    ranks_path = write_ranks_parquet(ordered, output_dir / "ranks.parquet")
    histogram_path = plot_rank_histogram(ordered, output_dir / "rank_histogram.png", title=title)
    return EvaluationReport(
        results=results,
        table_markdown=table,
        metrics=metrics,
        ranks_path=ranks_path,
        histogram_path=histogram_path,
        metrics_path=metrics_path,
        seconds=time.perf_counter() - started,
    )
