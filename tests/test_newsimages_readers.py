"""NewsImages readers: layouts, encodings, normalization, splits and upserts into SecantusDB."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from model.newsimages import (
    SourceDecodeError,
    SourceFormatError,
    SplitPolicy,
    assign_splits,
    decode_source,
    discover_batches,
    find_batches,
    load_batch,
    read_batch,
)

# The 2021 test batch: articles and images in two Latin-1 files, joined by the article URL.
TEST_ARTICLES = (
    "articleID\tarticleURL\ttitle\ttext\r\n"
    "7001\thttps://www.ksta.de/koeln/a-1\tGrüße aus Köln\tDie Straße am Dom wird gesperrt. Anwohner ärgern sich.\r\n"
    "7002\thttps://www.ksta.de/sport/b-2\tFC gewinnt 3:1\tDer 1. FC Köln siegt in Müngersdorf.\r\n"
    "7003\thttps://www.ksta.de/region/c-3\tOhne Bild\tZu diesem Artikel fehlt das Bild.\r\n"
)
TEST_IMAGES = (
    "imgURL\tiid\timgFile\tarticleURL\r\n"
    "https://www.ksta.de/image/1/a.jpg\t8001\t1aaaa.jpg\thttps://www.ksta.de/koeln/a-1\r\n"
    "https://www.ksta.de/image/2/b.jpg\t8002\t2bbbb.jpg\thttps://www.ksta.de/sport/b-2\r\n"
    "https://www.ksta.de/image/9/z.jpg\t8009\t9zzzz.jpg\thttps://www.ksta.de/elsewhere/z-9\r\n"
)


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _tsv_2021(rows: list[tuple[str, str, str]]) -> str:
    """A 2021-layout TSV with CRLF line ends from (aid, title, text) rows."""
    lines = ["article\taid\turl\timg\tiid\thashvalue\ttitle\ttext\timgFile"]
    for aid, title, text in rows:
        lines.append(
            f"9{aid}\t{aid}\thttps://www.ksta.de/a-{aid}\thttps://www.ksta.de/image/{aid}.jpg\t5{aid}\th{aid}x\t{title}\t{text}\th{aid}x.jpg"
        )
    return "\r\n".join(lines) + "\r\n"


def _test_batch(folder: Path) -> Path:
    _write(folder / "MediaEvalNewsImagesBatch04articles.tsv", TEST_ARTICLES, "latin-1")
    _write(folder / "MediaEvalNewsImagesBatch04images.tsv", TEST_IMAGES, "latin-1")
    return folder


# --------------------------------------------------------------------------- real files


def test_real_2021_files(shared_data):
    source = shared_data / "newsimages-2021"
    batches = find_batches(source)

    assert list(batches) == ["content2019-01", "content2019-02"]
    january = read_batch(batches["content2019-01"], source)
    february = read_batch(batches["content2019-02"], source)
    assert (len(january.documents), len(february.documents)) == (2539, 2604)
    assert january.failures == []
    assert february.failures == []
    assert january.encodings == {"content2019-01.tsv": "utf-8"}
    first = january.documents[0]
    assert first["_id"] == first["aid"] == "2021-118171"
    assert first["title"] == "Mann wird durch Böller schwer an der Hand verletzt"
    assert first["image_hash"] == "31811446c816ac031a5a0b3add7d47a3813aec62rC"
    assert first["image_file"] == "31811446c816ac031a5a0b3add7d47a3813aec62rC.jpg"
    assert first["image_id"] == "118805"
    assert first["image_url"].startswith("https://www.ksta.de/image/31811446/")
    assert first["source"]["article"] == "509005634"
    assert (first["edition"], first["language"], first["iid"]) == ("2021", "de", 0)
    assert not any("\r" in doc["text"] or "\r" in doc["title"] for doc in january.documents)


def test_real_2025_csv(shared_data):
    source = shared_data / "newsimages-2025"
    batches = find_batches(source)

    assert list(batches) == ["newsarticles"]
    result = read_batch(batches["newsarticles"], source)
    assert len(result.documents) == 1000
    assert result.failures == []
    assert result.encodings == {"newsarticles.csv": "utf-8-sig"}
    first = result.documents[0]
    assert first["_id"] == "2025-28"
    assert "article_id" in first["source"]  # the byte-order mark is not part of the first column name
    assert first["title_en"] == first["title"] == "New data finds subscriptions services first to go in cost-of-living crisis"
    assert first["tags"] == ["sentiment", "australian bureau of statistics"]
    assert first["text"] == first["text_en"] == "sentiment, australian bureau of statistics"
    assert first["image_hash"] == "1932004E13675BE560701B519177B818"
    images = {path.name for path in (source / "images").iterdir()}
    assert all(doc["image_file"] in images for doc in result.documents)


def test_discover_shared_folder(shared_data):
    assert discover_batches(shared_data) == ["content2019-01", "content2019-02", "newsarticles"]


def test_real_2021_splits_match_original(shared_data, mongo_client):
    collection = mongo_client["newsimages"]["articles"]
    source = shared_data / "newsimages-2021"

    january = load_batch(collection, source, "content2019-01")
    february = load_batch(collection, source, "content2019-02")

    assert january.inserted == 2539
    assert february.inserted == 2604
    totals = Counter(doc["split"] for doc in collection.find({}, {"split": 1}))
    assert totals == {"train": 3643, "valid": 500, "test": 1000}


# --------------------------------------------------------------------------- synthetic layouts


def test_test_batch_latin1_joined_by_url(tmp_path):
    source = _test_batch(tmp_path)
    batches = find_batches(source)

    assert list(batches) == ["MediaEvalNewsImagesBatch04"]
    batch = batches["MediaEvalNewsImagesBatch04"]
    assert batch.layout == "2021-test"
    result = read_batch(batch, source)

    # The images file is plain ASCII, which decodes the same as UTF-8.
    assert result.encodings == {"MediaEvalNewsImagesBatch04articles.tsv": "latin-1", "MediaEvalNewsImagesBatch04images.tsv": "utf-8"}
    assert [doc["_id"] for doc in result.documents] == ["2021-7001", "2021-7002"]
    first = result.documents[0]
    assert first["title"] == "Grüße aus Köln"
    assert first["text"] == "Die Straße am Dom wird gesperrt. Anwohner ärgern sich."
    assert (first["image_id"], first["image_hash"], first["image_file"]) == ("8001", "1aaaa", "1aaaa.jpg")
    assert first["image_url"] == "https://www.ksta.de/image/1/a.jpg"
    assert first["source"]["image.iid"] == "8001"
    assert first["source_image_file"] == "MediaEvalNewsImagesBatch04images.tsv"
    assert [failure.where for failure in result.failures] == ["MediaEvalNewsImagesBatch04articles.tsv:4"]
    assert "https://www.ksta.de/region/c-3" in result.failures[0].reason
    assert result.unmatched_images == 1


def test_test_batch_needs_url_column(tmp_path):
    _write(tmp_path / "Batch04articles.tsv", TEST_ARTICLES, "latin-1")
    _write(tmp_path / "Batch04images.tsv", "imgURL\tiid\timgFile\r\nhttps://x/a.jpg\t1\ta.jpg\r\n", "latin-1")
    batch = find_batches(tmp_path)["Batch04"]

    with pytest.raises(SourceFormatError) as raised:
        read_batch(batch, tmp_path)

    assert "Batch04images.tsv" in str(raised.value)
    assert "article URL" in str(raised.value)


def test_2023_with_english_columns(tmp_path):
    text = (
        "url\ttitle\ttags\timage\ttitleEN\ttextEN\r\n"
        "https://rt.de/a\tElch auf der Straße\tTiere, Verkehr\thttps://rt.de/img/a.jpg\tMoose on the road\tAnimals, traffic\r\n"
        "https://rt.de/b\tNur Deutsch\tPolitik\thttps://rt.de/img/b.jpg\t\t\r\n"
    )
    _write(tmp_path / "rt_2023.tsv", text)
    batch = find_batches(tmp_path)["rt_2023"]

    result = read_batch(batch, tmp_path)

    assert batch.edition == "2023"
    first, second = result.documents
    assert first["_id"] == "2023-url-" + hashlib.sha256(b"https://rt.de/a").hexdigest()[:24]
    assert (first["title_en"], first["text_en"]) == ("Moose on the road", "Animals, traffic")
    assert first["tags"] == ["Tiere", "Verkehr"]
    assert first["text"] == "Tiere, Verkehr"
    assert first["image_hash"] == hashlib.sha256(b"https://rt.de/img/a.jpg").hexdigest()
    assert first["image_file"] is None
    assert "title_en" not in second
    assert "text_en" not in second


def test_2023_without_english_columns(tmp_path):
    text = "url\ttitle\ttags\timage\nhttps://x.de/1\tTitel eins\tA;B\tbild1.jpg\n"
    _write(tmp_path / "gdelt.tsv", text)

    (document,) = read_batch(find_batches(tmp_path)["gdelt"], tmp_path).documents

    assert (document["image_hash"], document["image_file"], document["image_url"]) == ("bild1", "bild1.jpg", None)
    assert document["tags"] == ["A", "B"]
    assert "title_en" not in document


def test_quoted_tsv_reparsed(tmp_path):
    text = 'url\ttitle\ttags\timage\r\nhttps://x.de/1\t"Titel mit\tTab"\tA\thttps://x.de/1.jpg\r\nhttps://x.de/2\tZwei\tB\thttps://x.de/2.jpg\r\n'
    _write(tmp_path / "quoted.tsv", text)

    result = read_batch(find_batches(tmp_path)["quoted"], tmp_path)

    assert [doc["title"] for doc in result.documents] == ["Titel mit\tTab", "Zwei"]
    assert result.failures == []


def test_malformed_row_recorded(tmp_path):
    text = _tsv_2021([("1", "Eins", "Text eins."), ("2", "Zwei", "Text zwei.")])
    text += "3\tnur drei\tFelder\r\n"
    _write(tmp_path / "content2019-03.tsv", text)

    result = read_batch(find_batches(tmp_path)["content2019-03"], tmp_path)

    assert [doc["_id"] for doc in result.documents] == ["2021-1", "2021-2"]
    assert [failure.where for failure in result.failures] == ["content2019-03.tsv:4"]
    assert "3 fields" in result.failures[0].reason


def test_duplicate_rows_keep_first(tmp_path):
    _write(tmp_path / "dup.tsv", _tsv_2021([("1", "Eins", "a"), ("1", "Noch mal", "b")]))

    result = read_batch(find_batches(tmp_path)["dup"], tmp_path)

    assert [doc["title"] for doc in result.documents] == ["Eins"]
    assert "duplicate article 2021-1" in result.failures[0].reason


def test_unknown_files_skipped_and_keys_unique(tmp_path):
    _write(tmp_path / "notes.txt", "just some notes\n")
    _write(tmp_path / "a" / "content.tsv", _tsv_2021([("1", "Eins", "a")]))
    assert discover_batches(tmp_path) == ["content"]

    _write(tmp_path / "b" / "content.tsv", _tsv_2021([("2", "Zwei", "b")]))
    with pytest.raises(SourceFormatError) as raised:
        find_batches(tmp_path)
    assert "content" in str(raised.value)
    assert "rename" in str(raised.value)


def test_missing_source_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        discover_batches(tmp_path / "absent")

    assert "absent" in str(raised.value)


# --------------------------------------------------------------------------- encodings


def test_decode_detects_encodings(tmp_path):
    path = tmp_path / "f.tsv"

    assert decode_source(path, "Köln".encode("utf-8")) == ("Köln", "utf-8")
    assert decode_source(path, "\ufeffKöln".encode("utf-8")) == ("Köln", "utf-8-sig")
    assert decode_source(path, "Köln".encode("latin-1")) == ("Köln", "latin-1")
    assert decode_source(path, "„Köln“ – ok".encode("cp1252")) == ("„Köln“ – ok", "cp1252")


def test_configured_encoding_error_names_line(tmp_path):
    data = "title\r\nKöln\r\nMünchen\r\n".encode("latin-1")

    with pytest.raises(SourceDecodeError) as raised:
        decode_source(tmp_path / "batch.tsv", data, "utf-8")

    message = str(raised.value)
    assert "batch.tsv" in message
    assert "line 2" in message
    assert "encoding" in message


def test_mixed_encodings_rejected(tmp_path):
    data = "title\nKöln\n".encode("utf-8") + "München\n".encode("latin-1")

    with pytest.raises(SourceDecodeError) as raised:
        decode_source(tmp_path / "mixed.tsv", data)

    assert "mixed.tsv, line 3" in str(raised.value)


def test_file_encoding_override(tmp_path):
    _write(tmp_path / "content2019-05.tsv", _tsv_2021([("1", "Grüße", "Text")]), "latin-1")
    batch = find_batches(tmp_path)["content2019-05"]

    with pytest.raises(SourceDecodeError):
        read_batch(batch, tmp_path, file_encodings={"content2019-05.tsv": "utf-8"})
    result = read_batch(batch, tmp_path, encoding="utf-8", file_encodings={"content2019-05.tsv": "latin-1"})

    assert result.documents[0]["title"] == "Grüße"
    assert result.encodings == {"content2019-05.tsv": "latin-1"}


# --------------------------------------------------------------------------- splits


def test_assign_splits_counts_and_seed():
    ids = [f"2021-{i}" for i in range(2539)]

    splits = assign_splits(ids, {}, SplitPolicy())
    again = assign_splits(list(reversed(ids)), {}, SplitPolicy())
    other_seed = assign_splits(ids, {}, SplitPolicy(seed=7))

    assert Counter(splits.values()) == {"test": 507, "valid": 254, "train": 1778}
    assert again == splits
    assert other_seed != splits


def test_assign_splits_fills_remaining_quota():
    ids = [f"x{i}" for i in range(5000)]

    splits = assign_splits(ids, {"test": 990, "valid": 500, "train": 3000}, SplitPolicy())

    assert Counter(splits.values()) == {"test": 10, "train": 4990}


def test_assign_splits_small_batch_keeps_train():
    splits = assign_splits([f"d{i}" for i in range(40)], {}, SplitPolicy())

    assert Counter(splits.values()) == {"test": 8, "valid": 4, "train": 28}


def test_split_policy_rejects_bad_values():
    with pytest.raises(ValueError):
        SplitPolicy(test_size=-1)
    with pytest.raises(ValueError):
        SplitPolicy(max_heldout_fraction=1.5)


# --------------------------------------------------------------------------- loading


def test_load_is_upsert_and_splits_stay(tmp_path, mongo_client):
    collection = mongo_client["newsimages"]["articles"]
    policy = SplitPolicy(test_size=10, valid_size=5, seed=3, max_heldout_fraction=0.5)
    _write(tmp_path / "content2019-01.tsv", _tsv_2021([(str(i), f"Titel {i}", f"Text {i}.") for i in range(1, 31)]))

    first = load_batch(collection, tmp_path, "content2019-01", policy)
    splits_before = {doc["_id"]: doc["split"] for doc in collection.find({}, {"split": 1})}
    second = load_batch(collection, tmp_path, "content2019-01", policy)
    _write(tmp_path / "content2019-02.tsv", _tsv_2021([(str(i), f"Titel {i}", f"Text {i}.") for i in range(31, 51)]))
    third = load_batch(collection, tmp_path, "content2019-02", policy)

    assert (first.inserted, first.updated, first.unchanged) == (30, 0, 0)
    assert first.summary()["per_split"] == {"train": 15, "valid": 5, "test": 10}
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 30)
    assert (third.inserted, third.updated, third.unchanged) == (20, 0, 0)
    assert third.summary()["per_split"] == {"train": 20, "valid": 0, "test": 0}
    assert collection.count_documents({}) == 50
    assert collection.count_documents({"batch": "content2019-02"}) == 20
    splits_after = {doc["_id"]: doc["split"] for doc in collection.find({"batch": "content2019-01"}, {"split": 1})}
    assert splits_after == splits_before


def test_changed_row_updates_fields_not_split(tmp_path, mongo_client):
    collection = mongo_client["newsimages"]["articles"]
    _write(tmp_path / "b.tsv", _tsv_2021([("1", "Alt", "Text."), ("2", "Zwei", "Text.")]))
    load_batch(collection, tmp_path, "b")
    split = collection.find_one({"_id": "2021-1"})["split"]

    _write(tmp_path / "b.tsv", _tsv_2021([("1", "Neu", "Text."), ("2", "Zwei", "Text.")]))
    report = load_batch(collection, tmp_path, "b")

    stored = collection.find_one({"_id": "2021-1"})
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 1)
    assert stored["title"] == "Neu"
    assert stored["split"] == split
    assert stored["batch"] == "b"


def test_article_in_two_batches_kept_once(tmp_path, mongo_client):
    collection = mongo_client["newsimages"]["articles"]
    _write(tmp_path / "one.tsv", _tsv_2021([("1", "Eins", "a")]))
    _write(tmp_path / "two.tsv", _tsv_2021([("1", "Eins", "a"), ("2", "Zwei", "b")]))

    load_batch(collection, tmp_path, "one")
    report = load_batch(collection, tmp_path, "two")

    assert report.inserted == 1
    assert report.in_other_batch == ["2021-1 (batch one)"]
    assert collection.find_one({"_id": "2021-1"})["batch"] == "one"


def test_unknown_batch_key(tmp_path, mongo_client):
    _write(tmp_path / "one.tsv", _tsv_2021([("1", "Eins", "a")]))

    with pytest.raises(KeyError) as raised:
        load_batch(mongo_client["n"]["a"], tmp_path, "two")

    assert "one" in str(raised.value)


def test_malformed_row_with_quote_keeps_plain_parse(tmp_path):
    text = _tsv_2021([("1", '"Zitat" am Anfang', "Text eins."), ("2", "Zwei", 'Er sagte "Ja.')])
    text += "3\tnur drei\tFelder\r\n"
    _write(tmp_path / "quotes.tsv", text)

    result = read_batch(find_batches(tmp_path)["quotes"], tmp_path)

    assert [doc["title"] for doc in result.documents] == ['"Zitat" am Anfang', "Zwei"]
    assert result.documents[1]["text"] == 'Er sagte "Ja.'
    assert [failure.where for failure in result.failures] == ["quotes.tsv:4"]
