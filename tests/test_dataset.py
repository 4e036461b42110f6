"""Tests of the training data path, plus demo-like data that the training tests reuse.

Demo-like data: the demo corpus's articles, with region features made from the concepts
their captions name. Each colour, shape, place and person has a fixed random vector. Text
and image so carry the same information as drawn demo images seen by a detector.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from model.dataset import (
    ArticleStore,
    NewsPairDataset,
    PairDatasetConfig,
    collate_samples,
    model_inputs,
    open_region_reader,
    padded_regions,
    record_from_document,
)
from model.demo_corpus import COLOURS, PEOPLE, PLACES, SHAPES, generate_demo_corpus
from model.storage import canonical_json

FEATURE_DIM = 32
CONCEPTS = [*sorted(COLOURS), *sorted(SHAPES), *sorted(PLACES), *sorted(PEOPLE)]


def _concept_vectors(dim: int) -> np.ndarray:
    return np.random.default_rng(1234).normal(size=(len(CONCEPTS), dim)).astype(np.float32)


GROUP_PATTERN = re.compile(r"\b(one|two|three) (%s) (circle|square|triangle)s? (on the left|on the right|at the top|at the bottom|in the centre)" % "|".join(COLOURS))
COUNTS = {"one": 1, "two": 2, "three": 3}
POSITION_BOXES = {
    "on the left": (0.05, 0.3, 0.4, 0.7),
    "on the right": (0.6, 0.3, 0.95, 0.7),
    "at the top": (0.3, 0.05, 0.7, 0.4),
    "at the bottom": (0.3, 0.6, 0.7, 0.95),
    "in the centre": (0.3, 0.3, 0.7, 0.7),
}


def demo_region_features(caption: str, image_hash: str, dim: int = FEATURE_DIM) -> dict[str, np.ndarray]:
    """36 regions as a detector might see a drawn demo scene.

    One region per drawn shape (its colour and shape vectors, boxed at its position), two
    for a person's emblem, and background regions carrying the place's vector.
    """
    rng = np.random.default_rng(int(image_hash[:8], 16))
    vectors = dict(zip(CONCEPTS, _concept_vectors(dim)))
    rows: list[np.ndarray] = []
    boxes: list[tuple[float, ...]] = []
    ids: list[int] = []
    for count, colour, shape, position in GROUP_PATTERN.findall(caption):
        for _ in range(COUNTS[count]):
            rows.append(vectors[colour] + vectors[shape])
            boxes.append(POSITION_BOXES[position])
            ids.append(CONCEPTS.index(shape))
    person = next((name for name in PEOPLE if name in caption), None)
    if person:
        rows += [vectors[person]] * 2
        boxes += [(0.0, 0.0, 0.15, 0.2)] * 2
        ids += [CONCEPTS.index(person)] * 2
    place = next(name for name in PLACES if name in caption)
    while len(rows) < 36:
        rows.append(vectors[place])
        corner = rng.random(2) * 0.5
        boxes.append((corner[0], corner[1], corner[0] + 0.5, corner[1] + 0.5))
        ids.append(CONCEPTS.index(place))
    features = np.stack(rows).astype(np.float32) + rng.normal(scale=0.3, size=(36, dim)).astype(np.float32)
    obj_ids = np.asarray(ids, dtype=np.int64)
    return {"roi_features": features, "normalized_boxes": np.asarray(boxes, np.float32), "n_regions": 36, "obj_ids": obj_ids, "attr_ids": obj_ids.copy()}


def demo_face_features(image_hash: str, n_faces: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(image_hash[8:16], 16))
    embeddings = np.zeros((10, 512), dtype=np.float32)
    embeddings[:n_faces] = rng.normal(size=(n_faces, 512))
    return {"embeddings": embeddings, "mask": np.arange(10) < n_faces, "n_faces": n_faces}


def region_features_of(regions: dict[str, np.ndarray]):
    """The demo regions as the region stage's RegionFeatures, to write them in its formats."""
    from model.detectors.base import RegionFeatures

    return RegionFeatures(
        roi_features=regions["roi_features"],
        boxes=regions["normalized_boxes"] * 100,
        normalized_boxes=regions["normalized_boxes"],
        obj_ids=regions["obj_ids"],
        obj_probs=np.ones(36, np.float32),
        attr_ids=regions["attr_ids"],
        attr_probs=np.ones(36, np.float32),
        n_regions=36,
        image_width=100,
        image_height=100,
    )


class DemoData:
    """In-memory demo-like data: JSON documents, records, pairs per split and feature lookups."""

    def __init__(self, n_articles: int = 40, seed: int = 0, dim: int = FEATURE_DIM):
        corpus = generate_demo_corpus(n_articles=n_articles, seed=seed)
        self.documents = [json.loads(canonical_json(document)) for document in corpus.documents]
        self.records = {document["_id"]: record_from_document(document) for document in self.documents}
        self.pairs: dict[str, list[tuple[str, int]]] = {"train": [], "valid": [], "test": []}
        self.regions: dict[str, dict] = {}
        self.faces: dict[str, dict] = {}
        for document in self.documents:
            record = self.records[document["_id"]]
            for iid, image_hash in enumerate(record.image_hashes):
                self.pairs[document["split"]].append((record.aid, iid))
                self.regions[image_hash] = demo_region_features(record.text.captions[iid], image_hash, dim)
                person = "stands near" in record.text.captions[iid]
                self.faces[image_hash] = demo_face_features(image_hash, 1 if person else 0)

    def texts(self) -> list[str]:
        return [text for record in self.records.values() for text in (record.text.headline, record.text.snippet, *record.text.captions)]

    def dataset(self, split: str, tokenizer, config: PairDatasetConfig, fixed_epoch: int | None = None) -> NewsPairDataset:
        return NewsPairDataset(
            self.pairs[split],
            self.records.__getitem__,
            self.regions.__getitem__,
            tokenizer,
            config,
            faces=self.faces.__getitem__ if config.use_faces else None,
            fixed_epoch=fixed_epoch,
        )

    def write(self, root: Path) -> dict[str, Path]:
        """Write articles per split, original-layout region JSON files and trusted index files."""
        from model.index import IndexedPair, write_split_index
        from model.region_json import write_region_json

        articles = root / "nytimes800k" / "articles"
        for document in self.documents:
            path = articles / document["split"] / f"{document['_id']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(canonical_json(document), encoding="utf-8")
        feats = root / "feats"
        for image_hash, regions in self.regions.items():
            write_region_json(feats, image_hash, region_features_of(regions))
        index = root / "index"
        paths = {"articles": articles, "feats": feats}
        for split, pairs in self.pairs.items():
            indexed = [IndexedPair(aid, iid, self.records[aid].image_hashes[iid]) for aid, iid in pairs]
            write_split_index(index, split, indexed)
            paths[split] = index / f"{split}.pickle"
        return paths


@pytest.fixture(scope="module")
def demo() -> DemoData:
    return DemoData(n_articles=30)


@pytest.fixture(scope="module")
def tokenizer(demo):
    from model.tiny import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(demo.texts(), vocab_size=300)


def test_record_reads_entity_file_and_document_spans(demo):
    document = demo.documents[0]
    record = record_from_document(document)
    caption = record.text.captions[0]
    spans = record.entities["captions"][0]
    assert spans, "demo captions carry named_entities"
    assert all(caption[span["start"] : span["end"]] == span["text"] for span in spans)

    headline = record.text.headline
    place = next(name for name in PLACES if name in headline)
    start = headline.index(place)
    entity_file = {
        "fields": {"headline": {"text": headline, "spans": [{"text": place, "label": "GPE", "start": start, "end": start + len(place)}]}},
        "captions": [{"iid": 0, "text": caption, "spans": []}],
    }
    from_file = record_from_document(document, entity_file)
    assert from_file.entities["headline"][0]["text"] == place
    assert from_file.entities["captions"][0] == [], "the entities file overrides the document spans"


def test_record_drops_spans_that_do_not_match(demo):
    document = demo.documents[0]
    headline = record_from_document(document).text.headline
    entity_file = {"fields": {"headline": {"spans": [{"text": "nonsense", "label": "X", "start": 0, "end": 8}]}}}
    assert record_from_document(document, entity_file).entities["headline"] == []
    wrong_bounds = {"fields": {"headline": {"spans": [{"label": "X", "start": 0, "end": len(headline) + 5}]}}}
    assert record_from_document(document, wrong_bounds).entities["headline"] == []


def test_newsimages_record_uses_translated_fields():
    document = {"_id": "n1", "title": "Neues", "text": "Text", "title_en": "News from Vessingen", "text_en": "Two red circles.", "image_hash": "ab" * 32}
    spans = {"fields": {"title_en": {"spans": [{"text": "Vessingen", "label": "GPE", "start": 10, "end": 19}]}}}
    record = record_from_document(document, spans)
    assert record.text.headline == "News from Vessingen"
    assert record.image_hashes == ("ab" * 32,)
    assert record.entities["headline"][0]["text"] == "Vessingen"


def test_sample_is_deterministic_per_seed_epoch_index(demo, tokenizer):
    config = PairDatasetConfig(mode=4, use_faces=True)
    first = demo.dataset("train", tokenizer, config)[3]
    again = demo.dataset("train", tokenizer, config)[3]
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])

    other_epoch = demo.dataset("train", tokenizer, config)
    other_epoch.set_epoch(1)
    differs = [not np.array_equal(first[key], other_epoch[3][key]) for key in ("input_ids", "region_mask")]
    assert any(differs), "a new epoch draws new masks"


def test_fixed_epoch_ignores_set_epoch(demo, tokenizer):
    dataset = demo.dataset("valid", tokenizer, PairDatasetConfig(mode=1), fixed_epoch=0)
    before = dataset[0]
    dataset.set_epoch(5)
    np.testing.assert_array_equal(before["input_ids"], dataset[0]["input_ids"])


def test_negatives_come_from_another_article(demo, tokenizer):
    dataset = demo.dataset("train", tokenizer, PairDatasetConfig(mode=5, negative_ratio=1.0))
    for index in range(len(dataset)):
        rng = dataset.rng_for(index)
        rng.random()  # the draw that decided "negative"
        other = dataset._negative_index(index, rng)
        assert dataset.pairs[other][0] != dataset.pairs[index][0]
        assert dataset[index]["matched_label"] == 0


def test_negative_ratio_zero_keeps_true_text(demo, tokenizer):
    dataset = demo.dataset("train", tokenizer, PairDatasetConfig(mode=1, negative_ratio=0.0, masked_lm_ratio=0.0))
    sample = dataset[2]
    assert sample["matched_label"] == 1
    np.testing.assert_array_equal(sample["input_ids"], dataset.text(2).input_ids)


def test_single_article_cannot_draw_negatives(demo, tokenizer):
    aid = demo.pairs["train"][0][0]
    with pytest.raises(ValueError, match="two articles"):
        NewsPairDataset([(aid, 0)], demo.records.__getitem__, demo.regions.__getitem__, tokenizer, PairDatasetConfig())


def test_caption_modes_rejected_for_newsimages(demo, tokenizer):
    for mode in (1, 2, 3, 4):
        with pytest.raises(ValueError, match="captions"):
            demo.dataset("train", tokenizer, PairDatasetConfig(dataset="newsimages", mode=mode))
    demo.dataset("train", tokenizer, PairDatasetConfig(dataset="newsimages", mode=7))


def test_entity_tokens_are_marked(demo, tokenizer):
    dataset = demo.dataset("train", tokenizer, PairDatasetConfig(mode=1, use_entities=True))
    index = next(i for i, (aid, iid) in enumerate(dataset.pairs) if demo.records[aid].entities["captions"][iid])
    text = dataset.text(index)
    entity_tokens = tokenizer.convert_ids_to_tokens(text.input_ids[text.entity_mask].tolist())
    aid, iid = dataset.pairs[index]
    expected = " ".join(span["text"] for span in demo.records[aid].entities["captions"][iid]).lower()
    assert entity_tokens
    assert all(token.lstrip("#") in expected for token in entity_tokens)


def test_faces_sample_shapes_and_mask(demo, tokenizer):
    dataset = demo.dataset("train", tokenizer, PairDatasetConfig(mode=1, use_faces=True, masked_feats_ratio=1.0))
    with_face = next(i for i in range(len(dataset)) if demo.faces[dataset.image_hash(i)]["n_faces"] == 1)
    sample = dataset[with_face]
    assert sample["face_feats"].shape == (10, 512)
    assert sample["face_mask"].tolist() == [1.0] + [0.0] * 9
    assert sample["face_loss_mask"].tolist() == [1.0] + [0.0] * 9, "only real faces are masked"


def test_collate_pads_and_builds_model_inputs(demo, tokenizer):
    dataset = demo.dataset("train", tokenizer, PairDatasetConfig(mode=4, use_faces=True))
    samples = [dataset[i] for i in range(5)]
    batch = collate_samples(samples, tokenizer.pad_token_id)
    lengths = [len(sample["input_ids"]) for sample in samples]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    inputs = model_inputs(batch, "cpu")
    assert set(inputs["obj_labels"]) == {"feat", "obj", "attr", "faces_feat"}


def test_regions_are_padded_to_36():
    padded = padded_regions({"roi_features": np.ones((20, 8), np.float32), "normalized_boxes": np.ones((20, 4), np.float32), "obj_ids": np.zeros(20, np.int64)}, "h")
    assert padded["roi_features"].shape == (36, 8)
    assert padded["obj_ids"][20:].tolist() == [-1] * 16
    with pytest.raises(ValueError, match="at most 36"):
        padded_regions({"roi_features": np.ones((40, 8), np.float32), "normalized_boxes": np.ones((40, 4), np.float32)}, "h")


def test_article_store_and_original_json_features(demo, tmp_path):
    paths = demo.write(tmp_path)
    aid, iid = demo.pairs["train"][0]
    store = ArticleStore(paths["articles"] / "train")
    assert store(aid).image_hashes == demo.records[aid].image_hashes
    assert store(f"{aid}.json").aid == aid, "original indexes may name files"
    with pytest.raises(FileNotFoundError, match="rebuild the index"):
        store("0" * 24)

    reader = open_region_reader(paths["feats"])
    image_hash = demo.records[aid].image_hashes[iid]
    assert image_hash in reader
    assert reader.feature_dim == FEATURE_DIM
    np.testing.assert_array_equal(reader.get(image_hash)["roi_features"], demo.regions[image_hash]["roi_features"])
    with pytest.raises(KeyError):
        reader.get("f" * 64)
    with pytest.raises(FileNotFoundError, match="featsDir"):
        open_region_reader(tmp_path / "nowhere")


def test_dataloader_workers_give_same_batches(demo, tokenizer):
    import torch

    dataset = demo.dataset("train", tokenizer, PairDatasetConfig(mode=2))
    collate = lambda samples: collate_samples(samples, tokenizer.pad_token_id)  # noqa: E731
    batches = [[4, 1, 7], [0, 2]]
    single = list(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0))
    workers = list(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=2))
    for one, other in zip(single, workers):
        for key in one:
            assert torch.equal(one[key], other[key]), key
