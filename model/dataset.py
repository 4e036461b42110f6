"""The training data path: (article, image) pairs from an index, turned into masked samples.

``NewsPairDataset`` reads each pair through three lookups, so that it can be tested alone
and fed from any storage:

- ``articles(aid) -> ArticleRecord``: texts, image hashes and entity spans of one article
  (``ArticleStore`` reads a split folder of article JSON files);
- ``regions(image_hash) -> {"roi_features" (36, D), "normalized_boxes" (36, 4), ...}``,
  optionally with ``obj_ids`` and ``attr_ids`` (36,) for the object and attribute losses;
- ``faces(image_hash) -> {"embeddings" (F, 512), "mask" (F,)}`` when faces are on.

Each sample's randomness (negative text, token, region and face masks) comes from a
generator seeded with (seed, epoch, index), so that results do not depend on the number of
DataLoader workers or on the order in which samples are built.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from model.documents import ArticleText, article_images, article_text
from model.masking import mask_features, mask_tokens
from model.modeling import FACE_FEAT_DIM, MAX_FACES, NUM_REGIONS
from model.storage import check_safe_id, safe_join
from model.text import TokenizedText, check_mode, compose_text, tokenize_text

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ArticleRecord:
    """The texts, image hashes, entity spans and stored faces of one article document."""

    aid: str
    text: ArticleText
    image_hashes: tuple[str, ...]  # by iid
    # Character spans by field: "headline" and "snippet" lists, "captions" {iid: list}.
    entities: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # FaceNet embeddings stored inside the document by iid (the original NYTimes800k layout).
    document_faces: Mapping[int, np.ndarray] = dataclasses.field(default_factory=dict)


def _valid_spans(spans: Any, text: str) -> list[dict[str, Any]]:
    """Spans that lie inside ``text`` and, when they carry their text, match it."""
    valid = []
    for span in spans or ():
        if not isinstance(span, Mapping):
            continue
        start, end = span.get("start"), span.get("end")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
            continue
        if "text" in span and text[start:end] != span["text"]:
            continue
        valid.append(span)
    return valid


def _stage_spans(entities: Mapping[str, Any]) -> tuple[dict[str, Any], dict[int, Any]]:
    """Spans by field name and caption spans by iid from an entities-stage file.

    The file (``model.entities.load_entities``) contains ``fields: {name: {"spans": [...]}}``
    and ``captions: [{"iid": i, "spans": [...]}]``.
    """
    fields = {
        name: field.get("spans")
        for name, field in (entities.get("fields") or {}).items()
        if isinstance(field, Mapping)
    }
    captions = {
        int(caption["iid"]): caption.get("spans")
        for caption in entities.get("captions") or []
        if isinstance(caption, Mapping) and "iid" in caption
    }
    return fields, captions


def record_from_document(document: Mapping[str, Any], entities: Mapping[str, Any] | None = None) -> ArticleRecord:
    """Build an ArticleRecord; ``entities`` is the article's file from the entities stage.

    Without such a file, NYTimes800k captions use the ``named_entities`` stored in
    ``parsed_section``. Spans that do not match the text they point into are dropped.
    """
    from model.entities import SpanCheck, align_document_spans

    aid = str(document.get("_id", ""))
    text = article_text(document)
    images = article_images(document)
    is_newsimages = "image_positions" not in document
    field_spans, caption_spans = _stage_spans(entities or {})

    if is_newsimages:
        headline_spans = field_spans.get("title_en") if document.get("title_en") else field_spans.get("title")
        snippet_spans = field_spans.get("text_en") if document.get("text_en") else field_spans.get("text")
    else:
        headline_spans = field_spans.get("headline")
        snippet_spans = field_spans.get("snippet") if document.get("snippet") else field_spans.get("abstract")

    captions: dict[int, list] = {}
    document_faces: dict[int, np.ndarray] = {}
    sections = document.get("parsed_section") or []
    for ref in images:
        caption = text.captions[ref.iid] if ref.iid < len(text.captions) else ""
        spans = caption_spans.get(ref.iid)
        if not is_newsimages:
            section = sections[document["image_positions"][ref.iid]]
            if spans is None and section.get("named_entities"):
                spans = align_document_spans(caption, section["named_entities"], f"{aid}/{ref.iid}", SpanCheck())
            details = section.get("facenet_details") or {}
            if details.get("embeddings"):
                document_faces[ref.iid] = np.asarray(details["embeddings"], dtype=np.float32).reshape(-1, FACE_FEAT_DIM)
        captions[ref.iid] = _valid_spans(spans, caption)

    return ArticleRecord(
        aid=aid,
        text=text,
        image_hashes=tuple(ref.image_hash for ref in images),
        entities={
            "headline": _valid_spans(headline_spans, text.headline),
            "snippet": _valid_spans(snippet_spans, text.snippet),
            "captions": captions,
        },
        document_faces=document_faces,
    )


class ArticleStore:
    """Looks up ArticleRecords by aid in one split folder of ``<aid>.json`` files, with a cache.

    ``entity_loader(aid)`` returns the entities-stage file of the article (see ``record_from_document``), or raises
    FileNotFoundError / KeyError when the entities stage has none for that article.
    """

    def __init__(
        self,
        split_dir: str | Path,
        entity_loader: Callable[[str], Mapping[str, Any]] | None = None,
        cache_size: int = 4096,
    ):
        self.split_dir = Path(split_dir)
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"article folder {self.split_dir} not found; pass the split folder, e.g. <data_root>/nytimes800k/articles/train")
        self.entity_loader = entity_loader
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, ArticleRecord] = collections.OrderedDict()

    def __call__(self, aid: str) -> ArticleRecord:
        aid = aid[: -len(".json")] if aid.endswith(".json") else aid  # the original index may name files
        record = self._cache.get(aid)
        if record is not None:
            self._cache.move_to_end(aid)
            return record
        path = safe_join(self.split_dir, f"{check_safe_id(aid)}.json")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"article {aid} is in the index but {path} does not exist; rebuild the index") from None
        entities = None
        if self.entity_loader is not None:
            try:
                entities = self.entity_loader(aid)
            except (FileNotFoundError, KeyError):
                entities = None
        record = record_from_document(document, entities)
        self._cache[aid] = record
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return record


@dataclasses.dataclass(frozen=True)
class PairDatasetConfig:
    """Sample-building settings; the defaults are the original NewsLXMERT's."""

    dataset: str = "nytimes800k"  # nytimes800k or newsimages
    mode: int = 7
    max_seq_len: int = 100
    masked_lm_ratio: float = 0.15
    masked_feats_ratio: float = 0.15
    entity_mask_ratio: float = 0.30
    use_entities: bool = False
    use_faces: bool = False
    max_faces: int = MAX_FACES
    negative_ratio: float = 0.5
    seed: int = 0


def padded_regions(regions: Mapping[str, Any], image_hash: str) -> dict[str, np.ndarray]:
    """Region arrays padded to 36 rows (zero features, object id -1); more than 36 is an error."""
    features = np.asarray(regions["roi_features"], dtype=np.float32)
    boxes = np.asarray(regions["normalized_boxes"], dtype=np.float32)
    count = features.shape[0]
    if count > NUM_REGIONS or boxes.shape != (count, 4):
        raise ValueError(
            f"image {image_hash}: expected at most {NUM_REGIONS} regions with (n, 4) boxes, got features "
            f"{features.shape} and boxes {boxes.shape}; re-extract its region features"
        )
    padding = NUM_REGIONS - count
    result = {
        "roi_features": np.pad(features, ((0, padding), (0, 0))),
        "normalized_boxes": np.pad(boxes, ((0, padding), (0, 0))),
    }
    for key in ("obj_ids", "attr_ids"):
        if regions.get(key) is not None:
            result[key] = np.pad(np.asarray(regions[key], dtype=np.int64), (0, padding), constant_values=-1)
    return result


class NewsPairDataset(torch.utils.data.Dataset):
    """Masked pre-training samples over the pairs ``[(aid, iid), ...]`` of one split.

    ``fixed_epoch`` pins the randomness (validation: the same masks and negatives every
    epoch); otherwise call ``set_epoch`` before each training epoch.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, int]],
        articles: Callable[[str], ArticleRecord],
        regions: Callable[[str], Mapping[str, Any]],
        tokenizer,
        config: PairDatasetConfig,
        faces: Callable[[str], Mapping[str, Any]] | None = None,
        fixed_epoch: int | None = None,
    ):
        check_mode(config.mode, config.dataset)
        self.pairs = [(str(aid), int(iid)) for aid, iid in pairs]
        if not self.pairs:
            raise ValueError("the index is empty; there are no (article, image) pairs to train on")
        self.articles = articles
        self.regions = regions
        self.faces = faces
        self.tokenizer = tokenizer
        self.config = config
        self.fixed_epoch = fixed_epoch
        self.epoch = 0 if fixed_epoch is None else fixed_epoch

        article_codes: dict[str, int] = {}
        self._article_of = np.array([article_codes.setdefault(aid, len(article_codes)) for aid, _ in self.pairs], dtype=np.int64)
        if config.negative_ratio > 0 and len(article_codes) < 2:
            raise ValueError("negative pairs need texts of at least two articles, but the index contains one article; add articles to the split")
        special_ids = set(tokenizer.all_special_ids)
        self._replacement_ids = np.array([i for i in range(len(tokenizer)) if i not in special_ids], dtype=np.int64)
        self._text_cache: dict[int, TokenizedText] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is None:
            self.epoch = epoch

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.epoch, index])

    # ------------------------------------------------------------------ lookups

    def image_hash(self, index: int) -> str:
        aid, iid = self.pairs[index]
        hashes = self.articles(aid).image_hashes
        if not 0 <= iid < len(hashes):
            raise IndexError(f"pair {index} ({aid}, {iid}): the article has {len(hashes)} images; rebuild the index")
        return hashes[iid]

    def text(self, index: int) -> TokenizedText:
        """Return the tokenized text of pair ``index`` (cached per worker)."""
        cached = self._text_cache.get(index)
        if cached is not None:
            return cached
        aid, iid = self.pairs[index]
        record = self.articles(aid)
        entities = None
        if self.config.use_entities:
            entities = {
                "headline": record.entities.get("headline"),
                "snippet": record.entities.get("snippet"),
                "caption": (record.entities.get("captions") or {}).get(iid),
            }
        composed = compose_text(record.text, iid, self.config.mode, entities)
        tokenized = tokenize_text(self.tokenizer, composed, self.config.max_seq_len)
        self._text_cache[index] = tokenized
        return tokenized

    def image_regions(self, index: int) -> dict[str, np.ndarray]:
        image_hash = self.image_hash(index)
        try:
            found = self.regions(image_hash)
        except KeyError:
            aid, iid = self.pairs[index]
            raise KeyError(f"pair ({aid}, {iid}): no region features for image {image_hash}; rebuild the index") from None
        return padded_regions(found, image_hash)

    def image_faces(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (F, 512), mask (F,)) of the pair's image; zeros when it has no faces."""
        limit = self.config.max_faces
        embeddings = np.zeros((limit, FACE_FEAT_DIM), dtype=np.float32)
        mask = np.zeros(limit, dtype=np.float32)
        if self.faces is not None:
            image_hash = self.image_hash(index)
            try:
                found = self.faces(image_hash)
            except KeyError:
                aid, iid = self.pairs[index]
                raise KeyError(f"pair ({aid}, {iid}): no face features for image {image_hash}; rebuild the index with faces on") from None
            rows = np.asarray(found["embeddings"], dtype=np.float32)[:limit]
            valid = np.asarray(found["mask"], dtype=np.float32)[:limit]
        else:
            aid, iid = self.pairs[index]
            rows = self.articles(aid).document_faces.get(iid, np.zeros((0, FACE_FEAT_DIM), dtype=np.float32))[:limit]
            valid = np.ones(len(rows), dtype=np.float32)
        embeddings[: len(rows)] = rows
        mask[: len(valid)] = valid
        return embeddings, mask

    # ------------------------------------------------------------------ samples

    def _negative_index(self, index: int, rng: np.random.Generator) -> int:
        own = self._article_of[index]
        for _ in range(64):
            other = int(rng.integers(len(self.pairs)))
            if self._article_of[other] != own:
                return other
        candidates = np.flatnonzero(self._article_of != own)
        return int(candidates[rng.integers(len(candidates))])

    def _random_region_row(self, rng: np.random.Generator) -> np.ndarray:
        other = self.image_regions(int(rng.integers(len(self.pairs))))["roi_features"]
        return other[int(rng.integers(len(other)))]

    def _random_face_row(self, rng: np.random.Generator) -> np.ndarray | None:
        for _ in range(8):
            embeddings, mask = self.image_faces(int(rng.integers(len(self.pairs))))
            real = np.flatnonzero(mask > 0)
            if len(real):
                return embeddings[real[int(rng.integers(len(real)))]]
        return None

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        config = self.config
        rng = self.rng_for(index)

        matched = 1
        text_index = index
        if rng.random() < config.negative_ratio:
            matched = 0
            text_index = self._negative_index(index, rng)
        text = self.text(text_index)
        input_ids, labels = mask_tokens(
            text.input_ids,
            rng,
            mask_token_id=self.tokenizer.mask_token_id,
            replacement_ids=self._replacement_ids,
            special_mask=text.special_mask,
            entity_mask=text.entity_mask if config.use_entities else None,
            lm_ratio=config.masked_lm_ratio,
            entity_ratio=config.entity_mask_ratio,
        )

        regions = self.image_regions(index)
        visual_feats, region_mask = mask_features(
            regions["roi_features"], rng, ratio=config.masked_feats_ratio, replacement=self._random_region_row
        )
        sample = {
            "index": np.int64(index),
            "input_ids": input_ids,
            "labels": labels,
            "visual_feats": visual_feats,
            "visual_pos": regions["normalized_boxes"],
            "feat_target": regions["roi_features"],
            "region_mask": region_mask,
            "matched_label": np.int64(matched),
        }
        for key in ("obj_ids", "attr_ids"):
            if key in regions:
                sample[key] = regions[key]

        if config.use_faces:
            embeddings, face_mask = self.image_faces(index)
            masked_faces, face_loss_mask = mask_features(
                embeddings, rng, ratio=config.masked_feats_ratio, valid=face_mask > 0, replacement=self._random_face_row
            )
            sample.update(face_feats=masked_faces, face_mask=face_mask, face_target=embeddings, face_loss_mask=face_loss_mask)
        return sample


def collate_samples(samples: Sequence[Mapping[str, np.ndarray]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack samples, padding texts to the longest in the batch (pad id, attention 0, label -100)."""
    length = max(len(sample["input_ids"]) for sample in samples)
    batch_size = len(samples)
    input_ids = np.full((batch_size, length), pad_token_id, dtype=np.int64)
    labels = np.full((batch_size, length), -100, dtype=np.int64)
    attention = np.zeros((batch_size, length), dtype=np.int64)
    for row, sample in enumerate(samples):
        count = len(sample["input_ids"])
        input_ids[row, :count] = sample["input_ids"]
        labels[row, :count] = sample["labels"]
        attention[row, :count] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention),
        "token_type_ids": torch.zeros((batch_size, length), dtype=torch.long),
    }
    keys = set(samples[0]) - {"input_ids", "labels"}
    for key in sorted(keys):
        if all(key in sample for sample in samples):
            batch[key] = torch.from_numpy(np.stack([np.asarray(sample[key]) for sample in samples]))
    return batch


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, Any]:
    """Keyword arguments of ``NewsLxmertForPreTraining.forward`` for a collated batch."""
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    obj_labels = {"feat": (moved["feat_target"], moved["region_mask"])}
    for key, source in (("obj", "obj_ids"), ("attr", "attr_ids")):
        if source in moved:
            obj_labels[key] = (moved[source], moved["region_mask"])
    inputs = {
        "input_ids": moved["input_ids"],
        "attention_mask": moved["attention_mask"],
        "token_type_ids": moved["token_type_ids"],
        "visual_feats": moved["visual_feats"],
        "visual_pos": moved["visual_pos"],
        "labels": moved["labels"],
        "matched_label": moved["matched_label"],
        "obj_labels": obj_labels,
    }
    if "face_feats" in moved:
        inputs["face_feats"] = moved["face_feats"]
        inputs["face_mask"] = moved["face_mask"]
        obj_labels["faces_feat"] = (moved["face_target"], moved["face_loss_mask"])
    return inputs


# ---------------------------------------------------------------------------- feature sources


def open_region_reader(feats_dir: str | Path):
    """A ``model.regions.RegionFeatureReader`` for ``--featsDir``.

    A pipeline folder ``<dataset_root>/region_features`` is read as the pipeline writes it:
    the fast store first, then its JSON copies. Any other folder is read as per-image JSON
    files in the original layout (``<hash>.json`` or ``<hash>.jpg``).
    """
    from model.regions import RegionFeatureReader

    feats_dir = Path(feats_dir)
    if not feats_dir.is_dir():
        raise FileNotFoundError(f"region feature folder {feats_dir} not found (--featsDir)")
    if feats_dir.name == "region_features":
        return RegionFeatureReader(feats_dir.parent)
    return RegionFeatureReader(feats_dir, json_dirs=[feats_dir])
