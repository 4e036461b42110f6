"""The bad-input corpus of ``tests/bad_inputs.py`` through every stage that reads it.

Each case must get its documented outcome: a clear error that names the item, or a
failure record while the run goes on. Tests that run a stage do so inside a data root
with a sibling folder next to it, and check that nothing outside the data root changed.

Cases that the stage owners' own tests already cover are not repeated here; see
docs/reliability.md for the full list with the test of each case.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import (
    BACKGROUND_COLOUR,
    FIVE_THOUSAND_WORDS,
    INVALID_UTF8_DOCUMENT,
    MARKER_NAME,
    TEXT_CASES,
    Accepted,
    Rejected,
    document_cases,
    face_feature_cases,
    foreign_index_pickle,
    image_cases,
    plain_foreign_index_pickle,
    region_feature_cases,
    region_json_content,
    snapshot,
    text_documents,
    write_article_files,
    write_image_cases,
)

IMAGE_CASES = {case.name: case for case in image_cases()}
REJECTED_IMAGES = sorted(name for name, case in IMAGE_CASES.items() if isinstance(case.expected, Rejected))
ACCEPTED_IMAGES = sorted(name for name, case in IMAGE_CASES.items() if isinstance(case.expected, Accepted))


class Sandbox:
    """A data root inside a parent folder whose other contents must not change."""

    def __init__(self, tmp_path: Path):
        self.parent = tmp_path / "parent"
        self.data_root = self.parent / "data"
        self.data_root.mkdir(parents=True)
        self.inputs = self.parent / "inputs"  # input files the stages read but must not change
        self.inputs.mkdir()
        (self.parent / "unrelated.txt").write_text("a file of another project\n")
        self._before: dict | None = None

    def seal(self) -> None:
        """Record the parent folder once the inputs are in place."""
        self._before = snapshot(self.parent, exclude=self.data_root)

    def assert_nothing_written_outside(self) -> None:
        assert self._before is not None, "call seal() before running the stage"
        after = snapshot(self.parent, exclude=self.data_root)
        changed = sorted(set(after.items()) ^ set(self._before.items()))
        assert changed == [], f"files outside the data root changed: {changed}"


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    return Sandbox(tmp_path)


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_image_decode_outcome(tmp_path, name):
    from model.image_io import ImageDecodeError, load_image

    case = IMAGE_CASES[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(case.data)

    if isinstance(case.expected, Rejected):
        with pytest.raises(ImageDecodeError) as raised:
            load_image(path)
        assert str(path) in str(raised.value)
        assert case.expected.reason in str(raised.value)
        return

    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == case.expected.size
    assert loaded.image.size == case.expected.size
    if case.expected.top_left is not None:
        np.testing.assert_allclose(loaded.image.getpixel((0, 0)), case.expected.top_left, atol=12)
    if name.startswith("exif_orientation_"):
        bottom_right = loaded.image.getpixel((loaded.width - 1, loaded.height - 1))
        np.testing.assert_allclose(bottom_right, BACKGROUND_COLOUR, atol=12)
        assert loaded.exif_orientation == int(name.rsplit("_", 1)[1])


def test_orientation_matches_pillow_exif_transpose(tmp_path):
    """The pipeline's upright image equals Pillow's own EXIF transpose for every orientation."""
    from PIL import Image, ImageOps

    from model.image_io import load_image

    for orientation in range(1, 9):
        path = tmp_path / f"{orientation}.jpg"
        path.write_bytes(IMAGE_CASES[f"exif_orientation_{orientation}"].data)
        with Image.open(path) as image:
            expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.int16)

        got = np.asarray(load_image(path).image, dtype=np.int16)

        assert got.shape == expected.shape, orientation
        assert np.abs(got - expected).max() <= 2, orientation


def test_images_stage_records_bad_files(sandbox):
    from model.download import FetchSettings, ImageTask, fetch_images

    source = write_image_cases(sandbox.inputs / "images")
    sandbox.seal()
    tasks = [ImageTask(image_hash=name, aid=f"article-{name}", url=None) for name in sorted(source)]

    report = fetch_images(tasks, sandbox.data_root / "images", FetchSettings(source_dir=sandbox.inputs / "images", download=False))

    rows = {row["image_hash"]: row for row in report.rows}
    assert sorted(row["image_hash"] for row in report.by_status("failed")) == REJECTED_IMAGES
    assert report.ok_hashes == ACCEPTED_IMAGES
    for name in REJECTED_IMAGES:
        assert "local file unusable" in rows[name]["error"], name
        assert IMAGE_CASES[name].expected.reason in rows[name]["error"], name
        assert f"{name}.jpg" in rows[name]["error"], name
        assert not (sandbox.data_root / "images" / f"{name}.jpg").exists()
    stored = sorted(path.stem for path in (sandbox.data_root / "images").glob("*.jpg"))
    assert stored == ACCEPTED_IMAGES
    sandbox.assert_nothing_written_outside()


@pytest.fixture(scope="module")
def tiny_region_backend(tmp_path_factory):
    from model.detectors.torchvision_frcnn import (
        TorchvisionBackend,
        build_tiny_detector,
    )

    return TorchvisionBackend(build_tiny_detector(tmp_path_factory.mktemp("frcnn") / "frcnn"))


def test_region_stage_records_bad_images(sandbox, tiny_region_backend):
    from model.feature_store import FeatureStore
    from model.regions import extract_regions

    source = write_image_cases(sandbox.inputs / "images")
    sandbox.seal()
    stage = sandbox.data_root / "region_features"

    report = extract_regions(source, tiny_region_backend, FeatureStore(stage / "store"), json_dir=stage / "json", batch_size=4)

    assert sorted(report.failed) == REJECTED_IMAGES
    for name in REJECTED_IMAGES:
        assert IMAGE_CASES[name].expected.reason in report.failed[name], name
        assert str(source[name]) in report.failed[name], name
    assert sorted(report.done) == ACCEPTED_IMAGES
    assert FeatureStore(stage / "store").keys() == ACCEPTED_IMAGES
    sandbox.assert_nothing_written_outside()


def test_face_stage_records_bad_images(sandbox, tiny_facenet_file):
    from model.faces import (
        FaceConfig,
        FaceExtractor,
        extract_face_features,
        load_facenet,
    )

    source = write_image_cases(sandbox.inputs / "images")
    sandbox.seal()
    config = FaceConfig(images_per_write=8)
    facenet, facenet_id = load_facenet(tiny_facenet_file)

    report = extract_face_features(sorted(source.items()), sandbox.data_root / "face_features", config, FaceExtractor(config, facenet, facenet_id))

    failures = dict(report.failures)
    assert sorted(failures) == REJECTED_IMAGES
    for name in REJECTED_IMAGES:
        assert IMAGE_CASES[name].expected.reason in failures[name], name
    # Images smaller than min_face_size (1x1, 8x8, 16x16) hold no detectable face: zero faces, no failure.
    assert sorted(report.done) == ACCEPTED_IMAGES
    sandbox.assert_nothing_written_outside()


# --------------------------------------------------------------------------- MongoDB documents


def _caption_image(document: dict, image_hash: str) -> dict:
    document = dict(document)
    sections = [dict(section) for section in document["parsed_section"]]
    sections[document["image_positions"][0]]["hash"] = image_hash
    document["parsed_section"] = sections
    return document


def test_export_and_images_assets_with_bad_documents(sandbox, tmp_path, monkeypatch):
    """Bad documents and bad images through the articles and images assets of one partition."""
    from dagster import DagsterInstance, materialize
    from pymongo import MongoClient

    from assets.images import nytimes800k_images
    from assets.nytimes_articles import nytimes800k_articles
    from model.manifest import read_manifest
    from model.mongo import EmbeddedMongo
    from pipelines.resources import MongoResource, PipelineSettings

    images = write_image_cases(sandbox.inputs / "images")
    cases = document_cases()
    image_documents = [
        {**_caption_image(cases[0].document, name), "_id": f"image-{name}"} for name in sorted(images)
    ]
    sandbox.seal()

    with EmbeddedMongo(tmp_path / "mongo") as server:
        client = MongoClient(server.uri)
        collection = client.nytimes.articles
        for case in cases:
            collection.insert_one(_caption_image(case.document, "mode_L"))
        collection.insert_many(image_documents)
        monkeypatch.setenv("NEWSLXMERT_MONGO_URI", server.uri)
        result = materialize(
            [nytimes800k_articles, nytimes800k_images],
            partition_key="2024-01-01",
            resources={
                "settings": PipelineSettings(data_root=str(sandbox.data_root), profile="tiny", device="cpu"),
                "nytimes_mongo": MongoResource(data_root=str(sandbox.data_root)),
            },
            run_config={"ops": {"nytimes800k__images": {"config": {"source_dir": str(sandbox.inputs / "images"), "download": False}}}},
            instance=DagsterInstance.ephemeral(),
        )
        client.close()

    assert result.success
    articles = {key: value.value for key, value in result.asset_materializations_for_node("nytimes800k__articles")[0].metadata.items()}
    failing = [case for case in cases if case.expected != "exported"]
    assert articles["failed"] == len(failing)
    assert articles["exported"] == len(cases) - len(failing) + len(image_documents)
    examples = "\n".join(articles["failed_examples"])
    for case in failing:
        assert case.expected in examples, case.name

    root = sandbox.data_root / "nytimes800k"
    manifest = read_manifest(root, "articles", "2024-01-01")["articles"]
    assert len(manifest) == len({tuple(item) for item in manifest}), "an article is listed twice"
    exported = {aid: json.loads((root / "articles" / split / f"{aid}.json").read_text()) for split, aid in manifest}
    assert "65a0000000000000000000aa" in exported  # the ObjectId as its hex string
    assert exported["bson-types"]["snippet"] == "12.50"  # Decimal128
    assert exported["bson-types"]["web_url"] == "AAFiaW5hcnn/"  # binary data as base64
    assert exported["bson-types"]["pub_date"] == "2024-01-01T12:00:00Z"
    assert exported["int64"]["abstract"] == 2**40
    assert exported["tz-date"]["pub_date"] == "2024-01-01T21:30:00Z"
    assert exported["val-split"]["split"] == "valid"
    assert not any("/" in aid or "\\" in aid or ".." in aid for _, aid in manifest)

    images_metadata = {key: value.value for key, value in result.asset_materializations_for_node("nytimes800k__images")[0].metadata.items()}
    image_manifest = read_manifest(root, "images", "2024-01-01")
    assert images_metadata["failed"] == len(REJECTED_IMAGES)
    assert sorted(failure["image_hash"] for failure in image_manifest["failed"]) == REJECTED_IMAGES
    assert image_manifest["images"] == ACCEPTED_IMAGES
    for failure in image_manifest["failed"]:
        assert failure["aid"] == f"image-{failure['image_hash']}"
        assert IMAGE_CASES[failure["image_hash"]].expected.reason in failure["reason"]
    sandbox.assert_nothing_written_outside()


# --------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def untrained_marian(tmp_path_factory) -> Path:
    from model.demo_corpus import generate_demo_corpus
    from model.translate import TinyMarianConfig, build_tiny_marian

    folder = tmp_path_factory.mktemp("marian") / "marian"
    texts = [de for de, _ in generate_demo_corpus(n_articles=12, seed=15).parallel_sentences]
    build_tiny_marian(folder, (), texts, TinyMarianConfig(vocab_size=300, d_model=32, ffn_dim=64, layers=1, attention_heads=2, max_positions=64))
    return folder


def test_translation_of_text_cases(sandbox, untrained_marian):
    from model.translate import (
        MarianTranslator,
        TranslationSettings,
        translate_articles,
    )

    articles = sandbox.inputs / "articles"
    items = write_article_files(articles, text_documents())
    (articles / "train" / "bad-utf8.json").write_bytes(INVALID_UTF8_DOCUMENT)
    items.append(("train", "bad-utf8"))
    sandbox.seal()
    out = sandbox.data_root / "newsimages" / "translated_articles"
    translator = MarianTranslator(str(untrained_marian), TranslationSettings(num_beams=1, batch_size=16))

    report = translate_articles(items, articles, out, translator, group_size=8)

    assert [failure.aid for failure in report.failures] == ["bad-utf8"]
    assert "cannot read the article" in report.failures[0].reason
    assert "utf-8" in report.failures[0].reason
    translated = {aid: json.loads((out / split / f"{aid}.json").read_text(encoding="utf-8")) for split, aid in report.items}
    assert sorted(translated) == sorted(f"text-{name}" for name in TEXT_CASES)
    for name in ("empty", "whitespace", "punctuation"):
        document = translated[f"text-{name}"]
        assert document["translation"]["fields"] == {"title": "no_text", "text": "no_text"}, name
        assert document["title_en"] == TEXT_CASES[name], name  # copied, not sent to the model
    for name in ("all_caps", "five_thousand_words"):
        document = translated[f"text-{name}"]
        assert document["translation"]["fields"] == {"title": "translate", "text": "translate"}, name
        assert document["text_en"].strip(), name
    # The 5,000 words are cut into pieces that fit the model, none dropped: every piece gets an output.
    assert report.stats.chunks >= 2 * len(FIVE_THOUSAND_WORDS.split()) // 64
    assert report.stats.empty_chunk_outputs == 0
    sandbox.assert_nothing_written_outside()


def test_entities_of_text_cases(sandbox):
    from model.entities import default_spacy_model, extract_entities

    articles = sandbox.inputs / "articles"
    documents = [
        {"_id": f"text-{name}", "split": "train", "title": text, "text": text, "title_en": text.replace("Wort", "Word"),
         "text_en": text, "image_hash": f"h-{name}"}
        for name, text in TEXT_CASES.items()
    ]
    items = write_article_files(articles, documents)
    (articles / "train" / "bad-utf8.json").write_bytes(INVALID_UTF8_DOCUMENT)
    items.append(("train", "bad-utf8"))
    sandbox.seal()
    out = sandbox.data_root / "newsimages" / "entities"

    report = extract_entities(articles, out, items, default_spacy_model("tiny"))

    assert [aid for aid, _ in report.failures] == ["bad-utf8"]
    assert "UnicodeDecodeError" in report.failures[0][1]
    assert sorted(aid for _, aid in report.items) == sorted(f"text-{name}" for name in TEXT_CASES)
    for name in ("empty", "whitespace", "punctuation"):
        fields = json.loads((out / f"text-{name}.json").read_text())["fields"]
        assert all(field["spans"] == [] for field in fields.values()), name
    long_text = json.loads((out / "text-five_thousand_words.json").read_text())["fields"]["text_en"]
    assert long_text["text"] == FIVE_THOUSAND_WORDS  # no truncation
    assert all(0 <= span["start"] < span["end"] <= len(FIVE_THOUSAND_WORDS) for span in long_text["spans"])
    sandbox.assert_nothing_written_outside()


def test_tokenizer_text_cases():
    """The training text path: special tokens only for empty text, truncation at max_seq_len."""
    from model.text import ComposedText, tokenize_text
    from model.tiny import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(list(TEXT_CASES.values()) + ["zwei rote kreise links im hafen von port elwood"], vocab_size=300)
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id]

    for name in ("empty", "whitespace"):
        tokens = tokenize_text(tokenizer, ComposedText(TEXT_CASES[name], ()), max_seq_len=100)
        assert tokens.input_ids.tolist() == special, name
    punctuation = tokenize_text(tokenizer, ComposedText(TEXT_CASES["punctuation"], ()), max_seq_len=100)
    long_text = tokenize_text(tokenizer, ComposedText(FIVE_THOUSAND_WORDS, ()), max_seq_len=100)
    caps = tokenize_text(tokenizer, ComposedText(TEXT_CASES["all_caps"], ()), max_seq_len=100)
    lower = tokenize_text(tokenizer, ComposedText(TEXT_CASES["all_caps"].lower(), ()), max_seq_len=100)

    assert len(punctuation.input_ids) > 2
    assert len(long_text.input_ids) == 100  # LXMERT's input length: the rest of the text is not read
    assert long_text.input_ids[-1] == tokenizer.sep_token_id
    assert caps.input_ids.tolist() == lower.input_ids.tolist()  # the uncased tokenizer lower-cases


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", sorted(region_feature_cases()))
def test_region_json_outcome(tmp_path, name):
    from model.region_json import RegionJsonError, read_region_json

    content, expected = region_feature_cases()[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())

    if expected is None:
        assert read_region_json(path, feature_dim=8).feature_dim == 8
        return
    # The feature size is known when the stage reads a file: from the store, the other files
    # of the folder or the file's own feature_dim key.
    with pytest.raises(RegionJsonError) as raised:
        read_region_json(path, feature_dim=8)
    assert str(path) in str(raised.value)
    assert expected in str(raised.value)


def test_cut_features_need_known_size(tmp_path):
    """Features cut to a whole number of shorter rows read as a narrower size when the size is unknown."""
    from model.region_json import read_region_json

    content, _ = region_feature_cases()["roi_features_cut"]
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(content))

    assert read_region_json(path).feature_dim == 4


def test_precomputed_stage_records_bad_files(sandbox):
    """One damaged file fails its own image; the others are stored."""
    from model.feature_store import FeatureStore
    from model.regions import BackendSettings, build_backend, extract_regions

    cases = region_feature_cases()
    folder = sandbox.inputs / "precomputed"
    folder.mkdir()
    for name, (content, _) in cases.items():
        (folder / f"{name}.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    valid = ["valid"]
    for seed in (1, 2):  # a real folder holds mostly valid files, which decide the feature size
        valid.append(f"valid_{seed}")
        (folder / f"valid_{seed}.json").write_text(json.dumps(region_json_content(seed=seed)))
    sandbox.seal()
    backend = build_backend(BackendSettings(backend="precomputed", precomputed_dir=str(folder)))
    items = {path.stem: sandbox.inputs / "no-pixels-needed.jpg" for path in folder.glob("*.json")}

    report = extract_regions(items, backend, FeatureStore(sandbox.data_root / "region_features" / "store"))

    assert backend.feature_dim == 8
    assert sorted(report.done) == valid
    assert sorted(report.failed) == sorted(name for name, (_, expected) in cases.items() if expected is not None)
    for name, reason in report.failed.items():
        assert cases[name][1] in reason, name
        assert f"{name}.json" in reason, name
    sandbox.assert_nothing_written_outside()


def test_training_reader_names_bad_region_file(tmp_path):
    from model.regions import RegionFeatureReader

    folder = tmp_path / "original_features"
    folder.mkdir()
    for name, (content, _) in region_feature_cases().items():
        (folder / f"{name}.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    reader = RegionFeatureReader(tmp_path / "dataset", json_dirs=[folder])

    # The first file read sets the feature size that the others must have.
    assert reader.get("valid")["roi_features"].shape == (36, 8)
    for name, (_, expected) in region_feature_cases().items():
        if expected is None:
            continue
        with pytest.raises(ValueError) as raised:
            reader.get(name)
        assert f"{name}.json" in str(raised.value), name


@pytest.mark.parametrize("name", sorted(face_feature_cases()))
def test_face_json_outcome(tmp_path, name):
    from model.faces import FaceFeatureReader, json_path

    content, expected = face_feature_cases()[name]
    path = json_path(tmp_path / "face_features", name)
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    reader = FaceFeatureReader(tmp_path)

    if expected is None:
        faces = reader.get(name)
        assert faces["n_faces"] == 2
        assert faces["embeddings"].dtype == np.float32
        assert faces["mask"].tolist() == [True, True] + [False] * 8
        return
    with pytest.raises(ValueError) as raised:
        reader.get(name)
    assert str(path) in str(raised.value)
    assert expected in str(raised.value)


def test_foreign_index_rejected_by_training_command(sandbox):
    """The training command refuses an index pickle that the pipeline did not write, and runs none of its code."""
    from model.cli import main
    from model.index import UntrustedIndexError
    from model.tiny import build_tiny_lxmert

    marker = sandbox.parent / MARKER_NAME
    index = sandbox.inputs / "train.pickle"
    index.write_bytes(foreign_index_pickle(marker))
    features = sandbox.inputs / "features"
    features.mkdir()
    content, _ = region_feature_cases()["valid"]
    (features / "image.json").write_text(json.dumps(content))
    lxmert = build_tiny_lxmert(sandbox.inputs / "lxmert", ["a few words of text"], visual_feat_dim=8)
    sandbox.seal()
    args = ["--trainDsDir", str(sandbox.inputs), "--trainIndex", str(index), "--validDsDir", str(sandbox.inputs),
            "--validIndex", str(index), "--featsDir", str(features), "--model", str(lxmert),
            "--output", str(sandbox.data_root / "run"), "--device", "cpu", "--progress", "False"]

    with pytest.raises(UntrustedIndexError, match="--trustIndex True"):
        main("nytimes800k", "train_nytimes", args)
    with pytest.raises(ValueError, match=r"not a plain \{i: \(aid, iid\)\} pickle: the index refers to pathlib.Path.write_text"):
        main("nytimes800k", "train_nytimes", [*args, "--trustIndex", "True"])

    assert not marker.exists(), "unpickling the foreign index ran its code"
    sandbox.assert_nothing_written_outside()


def test_forged_fingerprint_does_not_unpickle(tmp_path):
    """A sidecar that matches a foreign pickle's hash still does not get the pickle unpickled with globals."""
    import hashlib

    from model.index import load_index
    from model.storage import canonical_json

    marker = tmp_path / MARKER_NAME
    pickle_bytes = foreign_index_pickle(marker)
    path = tmp_path / "train.pickle"
    path.write_bytes(pickle_bytes)
    forged = {"writer": "newslxmert index", "pairs": 2, "pickle_sha256": hashlib.sha256(pickle_bytes).hexdigest(), "parquet_sha256": "0" * 64}
    (tmp_path / "train.pickle.sha256").write_text(canonical_json(forged))

    with pytest.raises(ValueError, match=r"not a plain \{i: \(aid, iid\)\} pickle: the index refers to pathlib.Path.write_text"):
        load_index(path)
    plain = tmp_path / "plain.pickle"
    plain.write_bytes(plain_foreign_index_pickle())

    assert load_index(plain, allow_foreign_pickle=True) == [("aid-1", 0), ("aid-2", 1)]
    assert not marker.exists()
