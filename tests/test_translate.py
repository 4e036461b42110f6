"""MarianMT translation: chunking, pass-through, bounded output, batching, resumability, tiny model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.demo_corpus import generate_demo_corpus
from model.storage import canonical_json
from model.translate import (
    TinyMarianConfig,
    TranslationModelNotFound,
    TranslationSettings,
    TranslationStats,
    MarianTranslator,
    build_tiny_marian,
    ensure_tiny_marian,
    evaluate_translations,
    has_letters,
    split_heldout,
    translate_articles,
)

REPO = Path(__file__).resolve().parents[1]

# Twelve demo sentences the "overfit" model learns by heart, so its output can be compared
# with the reference sentence by sentence.
OVERFIT_CONFIG = TinyMarianConfig(
    d_model=64, ffn_dim=128, train_steps=150, learning_rate=5e-3, batch_size=12, heldout_fraction=0.0, max_train_seconds=240
)


def _demo_sentences(count: int) -> list[tuple[str, str]]:
    pairs = generate_demo_corpus(240).parallel_sentences
    return sorted({pair for pair in pairs if pair[0].endswith(".")})[:count]


@pytest.fixture(scope="session")
def overfit_pairs() -> list[tuple[str, str]]:
    return _demo_sentences(12)


@pytest.fixture(scope="session")
def overfit_model(tmp_path_factory, overfit_pairs) -> Path:
    """A tiny MarianMT trained until it translates the twelve demo sentences exactly."""
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("overfit") / "marian"
    build_tiny_marian(folder, overfit_pairs, (), OVERFIT_CONFIG)
    return folder


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A randomly initialized tiny MarianMT whose tokenizer is trained on German demo text."""
    folder = tmp_path_factory.mktemp("untrained") / "marian"
    texts = [de for de, _ in generate_demo_corpus(60, seed=3).parallel_sentences]
    build_tiny_marian(folder, (), texts, TinyMarianConfig())
    return folder


def test_has_letters_cases():
    assert not has_letters("")
    assert not has_letters("   \t\n")
    assert not has_letters("— … !?")
    assert not has_letters("2019, 3:1")
    assert has_letters("Köln")
    assert has_letters("»Ja«")


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "—", "...", "!!! ???", "2019", "« – »"])
def test_no_letter_fields_pass_through(untrained_model, text):
    translator = MarianTranslator(str(untrained_model), TranslationSettings(num_beams=1))
    stats = TranslationStats()

    result = translator.translate_texts([text], stats)

    assert result == [text]
    assert stats.chunks == 0
    assert stats.generate_calls == 0


def test_plan_splits_sentences_and_keeps_text(untrained_model):
    translator = MarianTranslator(str(untrained_model), TranslationSettings(num_beams=1))
    text = "Dr. Müller kam am 3. Januar nach Köln. Es regnete! Warum? Die „Bild“ berichtet.Eine Frau sah zu."

    plan = translator.plan(text)
    pieces = [piece.text for piece in plan if piece.translate]

    assert pieces == [
        "Dr. Müller kam am 3. Januar nach Köln.",
        "Es regnete!",
        "Warum?",
        "Die „Bild“ berichtet.",
        "Eine Frau sah zu.",
    ]
    # Joined, the plan is the input, except the space added after "berichtet.".
    assert "".join(piece.text for piece in plan) == text.replace("berichtet.Eine", "berichtet. Eine")


def test_overlong_sentence_split_to_fit(untrained_model):
    translator = MarianTranslator(str(untrained_model), TranslationSettings(num_beams=1, max_chunk_tokens=24))
    words = [de.rstrip(".") for de, _ in generate_demo_corpus(30, seed=5).parallel_sentences]
    sentence = ", ".join(words) + " " + "Donaudampfschifffahrtsgesellschaftskapitänsmützenabzeichen" * 3 + "."

    plan = translator.plan(sentence)
    pieces = [piece.text for piece in plan if piece.translate]

    assert len(pieces) > 5
    assert all(translator.token_count(piece) <= 24 for piece in pieces)
    assert "".join(piece.text for piece in plan) == sentence


def test_output_length_bounded_by_input(untrained_model):
    # An untrained model rarely emits end-of-sequence, so it runs into the bound every time.
    settings = TranslationSettings(num_beams=2, batch_size=4, length_ratio=1.5, length_margin=10)
    translator = MarianTranslator(str(untrained_model), settings)
    chunks = ["HALLO HALLO HALLO HALLO", "ES IST ALLES GANZ GROSS GESCHRIEBEN", "ja ja ja ja ja ja ja ja ja ja ja ja ja ja ja ja"]
    stats = TranslationStats()

    outputs = translator.translate_chunks(chunks, stats)

    bounds = [translator.max_new_tokens(translator.token_count(chunk)) for chunk in chunks]
    assert all(bound < translator.model_limit for bound in bounds)
    assert stats.generated_tokens <= sum(bounds)
    for output, bound in zip(outputs, bounds):
        assert len(translator.tokenizer(text_target=output, add_special_tokens=False)["input_ids"]) <= bound + 2
    assert stats.capped_chunks == len(chunks)


def test_several_sentences_all_translated(overfit_model, overfit_pairs):
    translator = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=4))
    german = " ".join(de for de, _ in overfit_pairs[:4])

    (english,) = translator.translate_texts([german])

    assert english == " ".join(en for _, en in overfit_pairs[:4])


def test_three_thousand_words_every_chunk(overfit_model, overfit_pairs):
    translator = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=1, batch_size=16))
    rng = random.Random(7)
    chosen = []
    while sum(len(de.split()) for de, _ in chosen) < 3000:
        chosen.append(rng.choice(overfit_pairs))
    article = " ".join(de for de, _ in chosen)
    stats = TranslationStats()

    (english,) = translator.translate_texts([article], stats)

    assert len(article.split()) >= 3000
    assert stats.chunks == len(chosen)
    assert stats.empty_chunk_outputs == 0
    assert english == " ".join(en for _, en in chosen)


def test_batched_equals_one_at_a_time(overfit_model, overfit_pairs):
    # The model ends the sentences it has learned before the length bound. With beam search,
    # an output cut at the bound may depend on the batch, which shares its longest row's bound.
    texts = [de for de, _ in overfit_pairs]
    batched = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=4, batch_size=8))
    single = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=4, batch_size=1))
    stats = TranslationStats()

    assert batched.translate_texts(texts, stats) == single.translate_texts(texts)
    assert stats.generate_calls == 2


def test_missing_model_names_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    with pytest.raises(TranslationModelNotFound) as raised:
        MarianTranslator("Helsinki-NLP/opus-mt-de-en", setting="translated_articles config `model`")

    assert "translated_articles config `model`" in str(raised.value)
    assert "Helsinki-NLP/opus-mt-de-en" in str(raised.value)
    assert time.perf_counter() - started < 30


def test_missing_folder_names_setting(tmp_path):
    with pytest.raises(TranslationModelNotFound) as raised:
        MarianTranslator(str(tmp_path / "absent"), setting="--model")

    assert "--model" in str(raised.value)


# --------------------------------------------------------------------------- documents


def _write_articles(root: Path, documents: list[dict]) -> list[tuple[str, str]]:
    items = []
    for document in documents:
        path = root / document["split"] / f"{document['_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(document), encoding="utf-8")
        items.append((document["split"], document["_id"]))
    return items


def _german_documents(pairs: list[tuple[str, str]], count: int) -> list[dict]:
    documents = []
    for index in range(count):
        de, _ = pairs[index % len(pairs)]
        documents.append(
            {
                "_id": f"2021-{1000 + index}",
                "aid": f"2021-{1000 + index}",
                "split": ("train", "valid", "test")[index % 3],
                "language": "de",
                "title": pairs[(index + 1) % len(pairs)][0] if index % 2 else "—",
                "text": de,
                "image_hash": f"h{index}",
            }
        )
    return documents


def test_documents_translated_once(tmp_path, overfit_model, overfit_pairs):
    articles, out = tmp_path / "articles", tmp_path / "translated"
    documents = _german_documents(overfit_pairs, 6)
    items = _write_articles(articles, documents)
    translator = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=1))

    first = translate_articles(items, articles, out, translator, group_size=4)
    second = translate_articles(items, articles, out, translator, group_size=4)
    documents[0]["text"] = overfit_pairs[5][0]
    _write_articles(articles, documents[:1])
    third = translate_articles(items, articles, out, translator, group_size=4)

    assert first.translated_documents == 6
    assert first.written == 6
    assert first.fields_without_text == 3
    assert second.translated_documents == 0
    assert second.reused == 6
    assert second.written == 0
    assert third.translated_documents == 1
    assert third.reused == 5
    saved = json.loads((out / "train" / "2021-1000.json").read_text(encoding="utf-8"))
    assert saved["text_en"] == overfit_pairs[5][1]
    assert saved["title_en"] == "—"
    assert saved["translation"]["fields"] == {"title": "no_text", "text": "translate"}
    assert saved["translation"]["model_fingerprint"] == translator.fingerprint
    assert saved["translation"]["source_fingerprint"]


def test_changed_settings_translate_again(tmp_path, overfit_model, overfit_pairs):
    articles, out = tmp_path / "articles", tmp_path / "translated"
    items = _write_articles(articles, _german_documents(overfit_pairs, 3))
    greedy = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=1))
    beams = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=3))

    translate_articles(items, articles, out, greedy)
    report = translate_articles(items, articles, out, beams)

    assert greedy.fingerprint != beams.fingerprint
    assert report.translated_documents == 3
    assert report.reused == 0


def test_english_documents_pass_through(tmp_path):
    articles, out = tmp_path / "articles", tmp_path / "translated"
    documents = [
        {"_id": "2025-28", "split": "test", "language": "en", "title": "Moose on the road", "text": "maine, moose",
         "title_en": "Moose on the road", "text_en": "maine, moose", "image_hash": "A1"},
        {"_id": "2023-url-1", "split": "train", "language": "de", "title": "Elch auf der Straße", "text": "",
         "title_en": "Moose on the street", "text_en": "", "image_hash": "B2"},
        {"_id": "2025-29", "split": "valid", "language": "en", "title": "No tags", "text": "", "image_hash": "C3"},
    ]
    items = _write_articles(articles, documents)

    report = translate_articles(items, articles, out, translator=None)

    assert report.passed_through_english == 3
    assert report.translated_documents == 0
    assert report.failures == []
    first = json.loads((out / "test" / "2025-28.json").read_text(encoding="utf-8"))
    second = json.loads((out / "train" / "2023-url-1.json").read_text(encoding="utf-8"))
    third = json.loads((out / "valid" / "2025-29.json").read_text(encoding="utf-8"))
    assert (first["title_en"], first["text_en"]) == ("Moose on the road", "maine, moose")
    assert (second["title_en"], second["text_en"]) == ("Moose on the street", "")
    assert (third["title_en"], third["text_en"]) == ("No tags", "")
    assert first["translation"]["model"] is None


def test_german_without_model_fails_per_document(tmp_path):
    articles, out = tmp_path / "articles", tmp_path / "translated"
    items = _write_articles(articles, [{"_id": "2021-1", "split": "train", "language": "de", "title": "Hallo", "text": "", "image_hash": "h"}])

    report = translate_articles(items, articles, out, translator=None)

    assert [failure.aid for failure in report.failures] == ["2021-1"]
    assert not (out / "train" / "2021-1.json").exists()


def test_sigkill_then_rerun_matches(tmp_path, overfit_model, overfit_pairs):
    articles = tmp_path / "articles"
    items = _write_articles(articles, _german_documents(overfit_pairs, 30))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"articles": [list(item) for item in items]}), encoding="utf-8")
    reference = tmp_path / "reference"
    translator = MarianTranslator(str(overfit_model), TranslationSettings(num_beams=1, batch_size=4))
    translate_articles(items, articles, reference, translator, group_size=1)

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "model.translate", "translate", str(articles), str(interrupted), "--model", str(overfit_model),
               "--manifest", str(manifest), "--group-size", "1", "--num-beams", "1", "--batch-size", "4"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(interrupted.rglob("*.json"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)

    finished = sorted(interrupted.rglob("*.json"))
    assert 3 <= len(finished) < len(items), "the run was not stopped halfway"
    for path in finished:
        json.loads(path.read_text(encoding="utf-8"))  # every visible file is complete JSON

    rerun = subprocess.run(command, cwd=REPO, env=environment, check=True, capture_output=True, text=True, timeout=600)
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])

    assert summary["reused"] == len(finished)
    assert summary["translated_documents"] == len(items) - len(finished)
    assert list(interrupted.rglob("*.tmp")) == []
    reference_files = sorted(path.relative_to(reference) for path in reference.rglob("*.json"))
    assert sorted(path.relative_to(interrupted) for path in interrupted.rglob("*.json")) == reference_files
    for relative in reference_files:
        assert (interrupted / relative).read_bytes() == (reference / relative).read_bytes(), relative


# --------------------------------------------------------------------------- tiny model


def test_tiny_build_reused_and_rebuilt(tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs = _demo_sentences(6)
    pairs_path.write_text("".join(json.dumps({"de": de, "en": en}) + "\n" for de, en in pairs), encoding="utf-8")
    config = TinyMarianConfig(d_model=32, ffn_dim=64, train_steps=3, heldout_fraction=0.0)
    folder = tmp_path / "models" / "tiny" / "marian"

    _, first = ensure_tiny_marian(folder, pairs_path, (), config)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    _, again = ensure_tiny_marian(folder, pairs_path, (), config)
    pairs_path.write_text("".join(json.dumps({"de": de, "en": en}) + "\n" for de, en in pairs[:4]), encoding="utf-8")
    _, rebuilt = ensure_tiny_marian(folder, pairs_path, (), config)

    assert first["pairs"] == 6
    assert first["training"]["steps"] == 3
    assert again == first
    assert (folder / "model.safetensors").stat().st_mtime_ns != stamp or rebuilt["pairs"] == 4
    assert rebuilt["pairs"] == 4
    assert {"source.spm", "target.spm", "vocab.json", "config.json"} <= {path.name for path in folder.iterdir()}
    assert not list(folder.parent.glob(".marian.building"))


def test_tiny_model_learns_demo_pairs(overfit_model):
    report = json.loads((overfit_model / "tiny_marian.json").read_text(encoding="utf-8"))

    assert report["training"]["steps"] == OVERFIT_CONFIG.train_steps
    assert report["training"]["final_loss"] < report["training"]["first_loss"] / 5


def test_heldout_split_keeps_sentences_apart():
    pairs = [(f"Satz {i % 7}.", f"Sentence {i % 7}.") for i in range(40)]

    train, heldout = split_heldout(pairs, 0.3, seed=1)

    assert {de for de, _ in train}.isdisjoint({de for de, _ in heldout})
    assert len({de for de, _ in heldout}) == 2
    assert len(train) + len(heldout) == 40


def test_evaluate_translations_scores():
    scores = evaluate_translations(["There are two red circles.", "News from Vessingen"], ["There are two red circles.", "News from Lindenfeld"])

    assert scores["pairs"] == 2
    assert scores["exact_match"] == 0.5
    assert 0 < scores["bleu"] < 100
