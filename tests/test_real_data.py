"""The asset graph on real news data: newsimages-2025 photos and newsimages-2021 German text.

A seeded subset keeps each test within a few minutes on two cores; all 1,000 photos of
newsimages-2025 run through ``python -m pipelines.real_data`` (see docs/results.md).
"""

from __future__ import annotations

import functools
import json
import math
import random
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from pipelines.demo import graph_definitions, prepare_corpus, run_assets, run_graph
from pipelines.real_data import run_real_data, write_csv_subset

SUBSET_SIZE = 100
SEED = 7


def _write_2021_subset(shared_data: Path, folder: Path, size: int, seed: int) -> Path:
    source = shared_data / "newsimages-2021" / "content2019-01.tsv"
    lines = source.read_bytes().split(b"\r\n")
    header, body = lines[0], [line for line in lines[1:] if line.strip()]
    chosen = sorted(random.Random(seed).sample(range(len(body)), size))
    folder.mkdir(parents=True)
    target = folder / "content2019-01.tsv"
    target.write_bytes(b"\r\n".join([header] + [body[i] for i in chosen]) + b"\r\n")
    return target


def _newsimages_keys(defs) -> list[AssetKey]:
    from dagster import DynamicPartitionsDefinition

    return [
        spec.key
        for spec in defs.resolve_all_asset_specs()
        if spec.key.path[0] == "newsimages" and isinstance(spec.partitions_def, DynamicPartitionsDefinition)
    ]


@pytest.fixture
def tiny_environment(tmp_path, monkeypatch):
    data_root = tmp_path / "data"
    monkeypatch.setenv("NEWSLXMERT_DATA_ROOT", str(data_root))
    monkeypatch.setenv("NEWSLXMERT_PROFILE", "tiny")
    monkeypatch.setenv("NEWSLXMERT_DEVICE", "cpu")
    return data_root


def _run_batch(data_root: Path, source: Path, images_dir: Path | None) -> dict:
    from model.newsimages import discover_batches

    defs = graph_definitions(data_root)

    instance = DagsterInstance.get()
    keys = discover_batches(source)
    assert len(keys) == 1
    instance.add_dynamic_partitions("newsimages_batches", keys)
    image_config = {"source_dir": str(images_dir) if images_dir else None, "download": False}
    asset_config = {
        "newsimages/raw_articles": {"source_dir": str(source)},
        "newsimages/images": image_config,
    }
    return run_assets(
        defs, instance, _newsimages_keys(defs), {"dagster/partition": keys[0]}, f"NewsImages {keys[0]}", asset_config
    )


def _ranks_mrr(ranks, cutoff: int = 100) -> float:
    """MRR@cutoff from the 0-based ranks the evaluation asset saves."""
    return sum(1.0 / (rank + 1) for rank in ranks if rank < cutoff) / len(ranks)


def _check_model_stages(reported: dict, data_root: Path, splits: dict[str, int], pretrain_epochs: int, finetune_epochs: int) -> None:
    """Check the NewsImages index, both training runs and the evaluation of one whole-graph run."""
    import pandas as pd

    # Index: no article lost; the split policy holds back 30% of a first batch (2:1 test:valid).
    total = sum(splits.values())
    assert reported["newsimages/index"]["pairs"] == total
    assert reported["newsimages/index"]["dropped"] == 0
    index = {split: pd.read_parquet(data_root / "newsimages" / "index" / f"{split}.parquet") for split in splits}
    assert {split: len(frame) for split, frame in index.items()} == splits

    # Training: fine-tuning starts from the pre-trained model's best checkpoint and learns.
    pretrained, finetuned = reported["nytimes800k/pretrained_model"], reported["newsimages/finetuned_model"]
    assert pretrained["epochs"] == pretrain_epochs
    assert finetuned["epochs"] == finetune_epochs
    assert finetuned["started_from"] == str(pretrained["best_checkpoint"])
    losses = [epoch["train_loss"] for epoch in finetuned["per_epoch"]]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]

    # Evaluation: pools are the held-out splits, and the saved ranks reproduce the reported metrics.
    evaluation = reported["newsimages/evaluation"]
    assert str(evaluation["checkpoint"]) == str(finetuned["best_checkpoint"])
    ranks = pd.read_parquet(evaluation["ranks"])
    for split in ("test", "valid"):
        size = splits[split]
        assert evaluation[f"{split}_pool_size"] == size
        assert evaluation[f"{split}_random_mrr@100"] == pytest.approx(sum(1 / k for k in range(1, size + 1)) / size, abs=1e-6)
        for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            rows = ranks[(ranks["split"] == split) & (ranks["direction"] == direction)]
            assert sorted(rows["aid"]) == sorted(index[split]["aid"])
            assert rows["rank"].between(0, size - 1).all()
            assert evaluation[f"{split}_{short}_mrr@100"] == pytest.approx(_ranks_mrr(rows["rank"]), abs=1e-6)
    assert f"| test | {splits['test']} | image → text |" in evaluation["metrics"]
    assert Path(evaluation["rank_histogram_path"]).stat().st_size > 0


@pytest.mark.slow
def test_newsimages_2025_subset_whole_graph(shared_data, tiny_environment, link_tiny_facenet):
    """Real photos, titles and tags through every stage up to the MRR@100 of the fine-tuned model.

    Pre-training runs on demo NYTimes800k-schema articles, since the real corpus cannot be
    downloaded here. The tiny profile's detector and FaceNet are untrained, so the metrics
    are checked for consistency, not for a level.
    """
    data_root = tiny_environment
    link_tiny_facenet(data_root)
    source = shared_data / "newsimages-2025"

    reported = run_real_data(
        graph_definitions(data_root), DagsterInstance.get(), data_root, source,
        articles=SUBSET_SIZE, seed=SEED, demo_articles=60, demo_days=2, pretrain_epochs=2, finetune_epochs=3,
    )

    # Article stages: every real photo decoded, featurized and searched for faces.
    assert reported["newsimages/raw_articles"]["documents"] == SUBSET_SIZE
    assert reported["newsimages/translated_articles"]["passed_through_english"] == SUBSET_SIZE
    assert reported["newsimages/images"]["failed"] == 0
    assert reported["newsimages/region_features"]["images_done"] == SUBSET_SIZE
    assert reported["newsimages/region_features"]["images_failed"] == 0
    assert reported["newsimages/face_features"]["failed"] == 0
    assert reported["newsimages/face_features"]["images_with_faces"] > 0
    assert reported["newsimages/entities"]["spans"] > 0

    _check_model_stages(reported, data_root, {"train": 70, "valid": 10, "test": 20}, pretrain_epochs=2, finetune_epochs=3)


@pytest.mark.slow
def test_newsimages_2021_german_subset(shared_data, tiny_environment, tmp_path):
    source = tmp_path / "source-2021"
    _write_2021_subset(shared_data, source, 40, SEED)

    reported = _run_batch(tiny_environment, source, images_dir=None)

    assert reported["newsimages/raw_articles"]["documents"] == 40
    translated = reported["newsimages/translated_articles"]
    assert translated["translated_documents"] == 40
    assert translated["passed_through_english"] == 0
    # The 2021 release has only image URLs and this machine must not reach them, so every
    # image gets a failure record and the run goes on.
    assert reported["newsimages/images"]["failed"] == 40
    assert reported["newsimages/region_features"]["images_done"] == 0
    assert reported["newsimages/entities"]["articles"] == 40


def test_csv_subset_keeps_the_release_format(shared_data, tmp_path):
    source_csv = shared_data / "newsimages-2025" / "newsarticles.csv"
    original = source_csv.read_bytes()

    everything = write_csv_subset(source_csv, tmp_path / "all", 0, seed=SEED)
    assert everything.read_bytes().startswith(b"\xef\xbb\xbf")
    assert everything.read_bytes().count(b"\n") == original.count(b"\n")

    subset = write_csv_subset(source_csv, tmp_path / "subset", 10, seed=SEED)
    again = write_csv_subset(source_csv, tmp_path / "again", 10, seed=SEED)
    assert subset.read_bytes() == again.read_bytes()
    lines = subset.read_text(encoding="utf-8-sig").splitlines()
    assert len(lines) == 11
    assert lines[0] == original.decode("utf-8-sig").splitlines()[0]

    with pytest.raises(ValueError, match="has 1000 rows; asked for 1001"):
        write_csv_subset(source_csv, tmp_path / "too_many", 1001, seed=SEED)


def test_real_data_command_names_a_missing_source(tmp_path, capsys):
    from pipelines.real_data import main

    status = main(["--source", str(tmp_path / "nowhere"), "--data-root", str(tmp_path / "data")])

    assert status == 2
    assert "pass --source with the NewsImages 2025 folder" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class names it so
        pass


@pytest.fixture
def photo_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the files of a temporary folder; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _write_2021_with_served_photos(shared_data: Path, folder: Path, size: int, served: Path, base_url: str) -> None:
    """Write ``size`` seeded German 2021 rows whose image URLs name photos on the local server.

    Each row keeps its text, ids and file name; its photo is a real 2025 news photo copied to
    ``served`` under the 2021 file name.
    """
    source = _write_2021_subset(shared_data, folder / "original", size, SEED)
    lines = source.read_bytes().decode("utf-8").split("\r\n")
    header = lines[0].split("\t")
    url_column, file_column = header.index("img"), header.index("imgFile")
    photos = sorted((shared_data / "newsimages-2025" / "images").iterdir())
    chosen = random.Random(SEED).sample(photos, size)
    rows = []
    for line, photo in zip([line for line in lines[1:] if line], chosen):
        fields = line.split("\t")
        (served / fields[file_column]).write_bytes(photo.read_bytes())
        fields[url_column] = f"{base_url}/{fields[file_column]}"
        rows.append("\t".join(fields))
    (folder / "batch").mkdir()
    (folder / "batch" / source.name).write_bytes("\r\n".join([lines[0], *rows, ""]).encode("utf-8"))
    source.unlink()


@pytest.mark.slow
def test_newsimages_2021_german_whole_graph(shared_data, tiny_environment, link_tiny_facenet, photo_server, tmp_path):
    """German articles, translated by the tiny MarianMT, through download, training and evaluation.

    The 2021 release lists its photos only as remote URLs, which tests must not reach. Here
    each article's URL names a real 2025 news photo on a server on 127.0.0.1, so download,
    translation and the model stages run end to end. Photo and text come from different
    articles, so the metrics are at chance by construction and only their consistency is
    checked.
    """
    from model.newsimages import discover_batches

    data_root = tiny_environment
    link_tiny_facenet(data_root)
    served, base_url = photo_server
    size = 60
    _write_2021_with_served_photos(shared_data, tmp_path / "source-2021", size, served, base_url)
    batch_dir = tmp_path / "source-2021" / "batch"

    days = prepare_corpus(data_root, 40, 2, SEED)
    asset_config = {
        "nytimes800k/images": {"source_dir": str(data_root / "demo" / "images"), "download": False},
        "newsimages/raw_articles": {"source_dir": str(batch_dir)},
        "newsimages/translated_articles": {"tiny_train_steps": 30},
        "newsimages/images": {"download": True},
        "nytimes800k/pretrained_model": {"mode": 4, "epochs": 1},
        "newsimages/finetuned_model": {"epochs": 3},
    }
    reported = run_graph(graph_definitions(data_root), DagsterInstance.get(), days, discover_batches(batch_dir), asset_config)

    assert reported["newsimages/raw_articles"]["documents"] == size
    assert reported["newsimages/translated_articles"]["translated_documents"] == size
    assert reported["newsimages/images"]["downloaded"] == size
    assert reported["newsimages/images"]["failed"] == 0
    assert reported["newsimages/region_features"]["images_done"] == size
    assert reported["newsimages/face_features"]["failed"] == 0
    translated = [json.loads(path.read_text(encoding="utf-8")) for path in (data_root / "newsimages" / "translated_articles" / "train").glob("*.json")]
    assert len(translated) == 42
    assert all(document["title_en"].strip() for document in translated)
    assert all(document["title_en"] != document["title"] for document in translated)
    _check_model_stages(reported, data_root, {"train": 42, "valid": 6, "test": 12}, pretrain_epochs=1, finetune_epochs=3)
