"""End-to-end runs of the training command line on tiny synthetic data, on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dataset import FEATURE_DIM, DemoData

REPO = Path(__file__).resolve().parents[1]
FLAGS = [
    "--trainDsDir", "--trainIndex", "--validDsDir", "--validIndex", "--testDsDir", "--testIndex", "--featsDir", "--output",
    "--epochs", "--batchSize", "--lr", "--warmupRatio", "--mode", "--maskedLmRatio", "--maskedFeatsRatio", "--maxSeqLen",
    "--entities", "--faces", "--loadLxmert", "--test",
]


def run_cli(module: str, args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from model.tiny import build_tiny_lxmert

    root = tmp_path_factory.mktemp("cli")
    demo = DemoData(n_articles=30, seed=2)
    paths = demo.write(root)
    paths["model"] = build_tiny_lxmert(root / "tiny", demo.texts(), FEATURE_DIM)
    return paths


def data_args(paths, output: Path) -> list[str]:
    articles = paths["articles"]
    return [
        "--trainDsDir", str(articles / "train"), "--trainIndex", str(paths["train"]),
        "--validDsDir", str(articles / "valid"), "--validIndex", str(paths["valid"]),
        "--testDsDir", str(articles / "test"), "--testIndex", str(paths["test"]),
        "--featsDir", str(paths["feats"]), "--output", str(output), "--model", str(paths["model"]),
    ]


def test_help_explains_every_original_flag():
    for module in ("model.train_nytimes", "model.train_mediaeval"):
        text = run_cli(module, ["--help"]).stdout
        for flag in FLAGS:
            assert flag in text, (module, flag)
        assert "True or False" in text


def test_train_then_test_end_to_end(data, tmp_path):
    output = tmp_path / "run"
    args = data_args(data, output) + [
        "--epochs", "2", "--batchSize", "8", "--microBatchSize", "4", "--lr", "3e-4", "--warmupRatio", "0.1",
        "--mode", "4", "--maskedLmRatio", "0.15", "--maskedFeatsRatio", "0.15", "--maxSeqLen", "64",
        "--entities", "True", "--faces", "False", "--numWorkers", "1", "--progress", "False",
    ]
    result = run_cli("model.train_nytimes", args)
    assert "samples/s" in result.stderr
    assert "lr" in result.stderr
    history = json.loads((output / "history.json").read_text())
    assert [epoch["epoch"] for epoch in history["epochs"]] == [1, 2]
    assert (output / "best" / "model.safetensors").is_file()
    assert (output / "loss_curve.png").is_file()
    run = json.loads((output / "run.json").read_text())
    assert run["settings"]["mode"] == 4
    assert run["settings"]["entities"] is True
    assert set(run["data"]) == {"train_index", "valid_index"}

    tested = run_cli("model.train_nytimes", data_args(data, output) + ["--mode", "4", "--test"])
    metrics = json.loads((output / "evaluation" / "metrics.json").read_text())
    assert set(metrics) == {"valid", "test"}
    assert 0.0 < metrics["test"]["image_to_text"]["mrr@100"] <= 1.0
    assert "MRR" in tested.stdout or "mrr" in tested.stdout.lower()


def test_mediaeval_rejects_caption_modes(data, tmp_path):
    result = run_cli("model.train_mediaeval", data_args(data, tmp_path / "x") + ["--mode", "2"], check=False)
    assert result.returncode == 2
    assert "needs image captions" in result.stderr


def test_missing_flags_are_named(data, tmp_path):
    result = run_cli("model.train_nytimes", ["--featsDir", str(data["feats"]), "--output", str(tmp_path)], check=False)
    assert result.returncode == 2
    assert "--trainDsDir" in result.stderr
    assert "--validIndex" in result.stderr


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    record = json.loads((output / "last.json").read_text())
    return load_file(str(output / record["checkpoint"] / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(data, tmp_path):
    """Kill training halfway with SIGKILL; --resume True ends with the uninterrupted run's weights.

    On CPU every operation here is deterministic for a fixed thread count, and the sample
    order, masks and dropout RNG are restored exactly, so the weights are equal bit for bit.
    """
    common = ["--epochs", "3", "--batchSize", "4", "--microBatchSize", "2", "--lr", "3e-4", "--mode", "1",
              "--maxSeqLen", "48", "--faces", "False", "--numWorkers", "0", "--progress", "False", "--checkpointEverySteps", "1"]
    straight = tmp_path / "straight"
    run_cli("model.train_nytimes", data_args(data, straight) + common)
    total_steps = json.loads((straight / "last.json").read_text())["global_step"]

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "model.train_nytimes", *data_args(data, killed), *common],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            pointer = killed / "last.json"
            if pointer.is_file() and json.loads(pointer.read_text())["global_step"] >= total_steps // 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, "training finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    stopped_at = json.loads((killed / "last.json").read_text())["global_step"]
    assert stopped_at < total_steps

    run_cli("model.train_nytimes", data_args(data, killed) + common + ["--resume", "True"])
    assert json.loads((killed / "last.json").read_text())["global_step"] == total_steps
    expected, resumed = final_weights(straight), final_weights(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
