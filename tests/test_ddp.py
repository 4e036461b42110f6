"""Distributed (DDP) training with real processes: torchrun, 2 processes, gloo on CPU, the tiny LXMERT.

Each run starts ``python -m torch.distributed.run --standalone --nproc_per_node=2`` with the
command that the training assets build (``assets.training.launch_command``), so the
processes meet through a gloo rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_dataset import FEATURE_DIM, DemoData

from assets.training import launch_command
from model.cli import TrainingRun, load_model, run_training
from model.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
TORCHRUN_TIMEOUT_S = 180

# Written as sitecustomize.py into a folder on the children's PYTHONPATH, so that every
# Python process of a run (the torchrun launcher and each worker) records its own writes.
# The audit hook records Python-level writes only. safetensors writes its file from Rust,
# but into a staging folder whose creation and rename the hook records.
WRITE_AUDIT_HOOK = '''
import atexit
import json
import os
import sys

_ROOT = os.environ.get("DDP_TEST_AUDIT_ROOT")
_LOG_DIR = os.environ.get("DDP_TEST_AUDIT_LOG_DIR")
_EVENTS = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _is_under_root(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    path = os.path.realpath(os.fsdecode(path))
    return path == _ROOT or path.startswith(_ROOT + os.sep)


def _record_writes(event, args):
    if event not in _EVENTS:
        return
    if event == "open":
        path, mode, flags = args
        writes = any(letter in mode for letter in "wax+") if mode is not None else bool(flags & _WRITE_FLAGS)
        paths = [path] if writes else []
    else:
        paths = args[:2]
    for path in paths:
        if _is_under_root(path):
            _WRITES.append([event, os.fsdecode(path)])


def _save_writes():
    name = "rank-%s-pid-%d.json" % (os.environ.get("RANK", "launcher"), os.getpid())
    with open(os.path.join(_LOG_DIR, name), "w", encoding="utf-8") as log:
        json.dump(_WRITES, log)


if _ROOT and _LOG_DIR:
    _ROOT = os.path.realpath(_ROOT)
    _WRITES = []
    sys.addaudithook(_record_writes)
    atexit.register(_save_writes)
'''


def audit_environment(tmp_path: Path, root: Path) -> tuple[dict[str, str], Path]:
    """Write the audit hook and return the environment that makes child processes record writes under ``root``."""
    hook_dir = tmp_path / "audit_hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(WRITE_AUDIT_HOOK, encoding="utf-8")
    log_dir = tmp_path / "audit_log"
    log_dir.mkdir()
    environment = {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(hook_dir)]),
        "DDP_TEST_AUDIT_ROOT": str(root),
        "DDP_TEST_AUDIT_LOG_DIR": str(log_dir),
    }
    return environment, log_dir


def writes_by_rank(log_dir: Path) -> dict[str, list[list[str]]]:
    """Read the audited writes per rank ("0", "1" or "launcher") from the processes' log files."""
    writes: dict[str, list[list[str]]] = {}
    for log in sorted(log_dir.glob("rank-*.json")):
        rank = log.name.split("-")[1]
        assert rank not in writes, f"two processes ran as rank {rank}: {sorted(p.name for p in log_dir.iterdir())}"
        writes[rank] = json.loads(log.read_text(encoding="utf-8"))
    return writes


def run_torchrun(spec_path: Path) -> None:
    """Run the training command line under torchrun with 2 processes and raise with its log when it fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = launch_command("nytimes800k", spec_path, WORLD_SIZE)
    # A collective that one process never joins blocks the others, so the whole process
    # group is killed when the run exceeds the timeout.
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise AssertionError(f"torchrun timed out after {TORCHRUN_TIMEOUT_S} s:\n{stderr[-4000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"torchrun exited with {process.returncode}:\n{stderr[-6000:]}")


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    record = json.loads((output / "last.json").read_text(encoding="utf-8"))
    return load_file(str(output / record["checkpoint"] / "model.safetensors"))


# ---------------------------------------------------------------------------- the CLI under torchrun


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Any]:
    """Write demo-like data (40 training and 7 validation pairs) and a tiny LXMERT without dropout."""
    from model.tiny import build_tiny_lxmert

    root = tmp_path_factory.mktemp("ddp")
    demo = DemoData(n_articles=30, seed=2)
    paths = demo.write(root)
    model = build_tiny_lxmert(root / "tiny", demo.texts(), FEATURE_DIM)
    config_path = model / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    paths["model"] = model
    paths["train_pairs"] = len(demo.pairs["train"])
    return paths


def training_run(data: dict[str, Any], output: Path, micro_batch_size: int, masked_lm_ratio: float) -> TrainingRun:
    """Build a one-epoch run in batches of 13 pairs, so 40 pairs make batches of 13, 13, 13 and 1.

    AdamW runs with eps 1.0 and no clipping. With the defaults (eps 1e-6, gradients clipped
    to norm 1.0), a step depends almost only on the gradient's direction, so a gradient off
    by a constant factor would change the weights little. With eps 1.0 and gradients well
    below 1, a step is close to lr times AdamW's moving average of the gradients, so it
    scales with the gradient.
    """
    articles = data["articles"]
    return TrainingRun(
        dataset="nytimes800k",
        output=str(output),
        feats_dir=str(data["feats"]),
        train_dir=str(articles / "train"),
        train_index=str(data["train"]),
        valid_dir=str(articles / "valid"),
        valid_index=str(data["valid"]),
        model=str(data["model"]),
        mode=1,
        max_seq_len=48,
        masked_lm_ratio=masked_lm_ratio,
        masked_feats_ratio=0.15,
        negative_ratio=0.5,
        train=TrainConfig(
            epochs=1,
            batch_size=13,
            micro_batch_size=micro_batch_size,
            lr=1e-2,
            warmup_ratio=0.0,
            adam_eps=1.0,
            max_grad_norm=1e6,
            num_workers=0,
            device="cpu",
            log_every_steps=1,
            progress_bar=False,
        ),
    )


def write_spec(run: TrainingRun, path: Path) -> Path:
    path.write_text(json.dumps(run.to_json()), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("micro_batch_size", "masked_lm_ratio"),
    [(1, 0.15), (3, 0.0)],
    ids=["one-sample-micro-batches-all-losses", "three-sample-micro-batches-no-masked-lm"],
)
def test_two_processes_match_one_process(data, tmp_path, micro_batch_size, masked_lm_ratio):
    """Two processes with batch B end with the weights and losses of one process with batch B.

    Samples, negatives and masks depend on (seed, epoch, sample index) only, and dropout is
    off, so both runs see the same inputs. Rank r takes samples r, r + 2, ... of each batch,
    so the micro-batches differ from the single process's. All losses are means over
    samples (or over the same number of tokens per sample), except masked LM, which is a
    mean over the masked tokens of a micro-batch. Hence the two cases:

    - Micro-batches of 1 sample: every micro-batch is the same in both runs, so all losses
      are on.
    - Micro-batches of 3 samples: masked LM is off (ratio 0), so that the other losses
      check the weight len(micro) / batch * world_size of multi-sample micro-batches.

    With 40 pairs in batches of 13, each process's share is uneven (7 and 6 samples), and
    the last batch has 1 sample, so rank 1 has none and runs a sample with weight 0.
    The comparison is of the weight updates (final minus initial), relative to their size.
    """
    single = training_run(data, tmp_path / "single", micro_batch_size, masked_lm_ratio)
    initial = {key: value.detach().clone() for key, value in load_model(single, FEATURE_DIM).state_dict().items()}
    single_result = run_training(single)

    distributed = training_run(data, tmp_path / "distributed", micro_batch_size, masked_lm_ratio)
    run_torchrun(write_spec(distributed, tmp_path / "distributed_request.json"))

    expected_steps = math.ceil(data["train_pairs"] / 13)
    assert single_result.global_step == expected_steps
    single_history = json.loads((tmp_path / "single" / "history.json").read_text(encoding="utf-8"))
    distributed_history = json.loads((tmp_path / "distributed" / "history.json").read_text(encoding="utf-8"))
    assert [step["step"] for step in distributed_history["steps"]] == list(range(1, expected_steps + 1))
    single_step_losses = [step["loss"] for step in single_history["steps"]]
    distributed_step_losses = [step["loss"] for step in distributed_history["steps"]]
    assert distributed_step_losses == pytest.approx(single_step_losses, rel=1e-5)
    single_epoch, distributed_epoch = single_history["epochs"][0], distributed_history["epochs"][0]
    assert distributed_epoch["train_loss"] == pytest.approx(single_epoch["train_loss"], rel=1e-5)
    assert distributed_epoch["valid_loss"] == pytest.approx(single_epoch["valid_loss"], rel=1e-5)
    for name, value in single_epoch["train_losses"].items():
        assert distributed_epoch["train_losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name

    single_weights = final_weights(tmp_path / "single")
    distributed_weights = final_weights(tmp_path / "distributed")
    assert single_weights.keys() == distributed_weights.keys()
    largest_update = max(float((single_weights[key] - initial[key]).abs().max()) for key in single_weights)
    assert largest_update > 1e-3, "the run must move the weights, or the comparison below proves nothing"
    for key in single_weights:
        single_update = single_weights[key] - initial[key]
        distributed_update = distributed_weights[key] - initial[key]
        torch.testing.assert_close(distributed_update, single_update, rtol=1e-3, atol=1e-6, msg=lambda message, key=key: f"{key}: {message}")


# ---------------------------------------------------------------------------- the training asset


def _dagster_log_lines(instance, run_id: str) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(run_id) if entry.user_message]


@pytest.mark.slow
def test_pretraining_asset_with_two_processes(tmp_path, monkeypatch):
    """``nproc_per_node=2`` trains under torchrun; only rank 0 writes files, and they load.

    An audit hook in every child process records file writes under the data root, so the
    test checks which process wrote each file, not only the files that remain.
    """
    from dagster import DagsterInstance, materialize
    from test_training_assets import write_nytimes

    from assets.index import nytimes800k_index
    from assets.training import nytimes800k_pretrained_model
    from model.index import index_path, load_index
    from model.modeling import NewsLxmertForPreTraining
    from pipelines.resources import PipelineSettings

    data_root = tmp_path / "data"
    write_nytimes(data_root, DemoData(n_articles=24, seed=4))
    environment, log_dir = audit_environment(tmp_path, data_root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    batch_size = 7
    config = {
        "epochs": 2,
        "batch_size": batch_size,
        "micro_batch_size": 4,
        "num_workers": 0,
        "max_seq_len": 48,
        "mode": 4,
        "nproc_per_node": WORLD_SIZE,
    }
    instance = DagsterInstance.ephemeral()
    result = materialize(
        [nytimes800k_index, nytimes800k_pretrained_model],
        resources={"settings": PipelineSettings(data_root=str(data_root), profile="tiny", device="cpu")},
        run_config={"ops": {"nytimes800k__pretrained_model": {"config": config}}},
        instance=instance,
    )
    assert result.success

    metadata = {
        name: getattr(value, "value", value)
        for name, value in result.asset_materializations_for_node("nytimes800k__pretrained_model")[-1].metadata.items()
    }
    run_dir = Path(metadata["run_dir"])
    assert metadata["epochs"] == 2
    log_lines = _dagster_log_lines(instance, result.run_id)
    assert any("nproc_per_node=2" in line for line in log_lines), "the asset must start torchrun"
    assert sum("epoch 1/2 done" in line for line in log_lines) == 1, "only rank 0 logs progress"
    assert sum("finished 2 epochs" in line for line in log_lines) == 1, "only rank 0 logs the summary"

    # Files: one set, no leftovers of a second writer or of interrupted writes.
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "best", "checkpoints", "history.json", "last.json", "loss_curve.png", "run.json", "training_request.json",
    ]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_001", "epoch_002"]
    hidden = [str(path) for path in run_dir.rglob("*") if path.name.startswith(".") or ".tmp" in path.name]
    assert hidden == []
    assert (run_dir / "checkpoints" / "epoch_002" / "trainer_state.pt").is_file()
    assert not (run_dir / "checkpoints" / "epoch_001" / "trainer_state.pt").exists()

    train_pairs = len(load_index(index_path(data_root / "nytimes800k", "train")))
    assert train_pairs % batch_size == 1, "the last batch must have 1 pair, so that rank 1 runs the weight-0 sample"
    steps_per_epoch = math.ceil(train_pairs / batch_size)
    history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    assert [epoch["epoch"] for epoch in history["epochs"]] == [1, 2]
    assert [step["step"] for step in history["steps"]] == list(range(1, 2 * steps_per_epoch + 1))
    assert json.loads((run_dir / "last.json").read_text(encoding="utf-8"))["global_step"] == 2 * steps_per_epoch

    # Writes per process: rank 0 wrote the run's files, rank 1 and the launcher nothing.
    writes = writes_by_rank(log_dir)
    assert sorted(writes) == ["0", "1", "launcher"]
    assert writes["1"] == []
    assert writes["launcher"] == []
    rank0_names = {Path(path).name for _, path in writes["0"]}
    assert {"history.json", "last.json", "loss_curve.png", "run.json", "epoch_002", "best"} <= rank0_names

    # Weights: the best model equals its epoch's checkpoint and loads with finite values.
    best = json.loads((run_dir / "best" / "best.json").read_text(encoding="utf-8"))
    best_weights = load_file(str(run_dir / "best" / "model.safetensors"))
    epoch_weights = load_file(str(run_dir / "checkpoints" / f"epoch_{best['epoch']:03d}" / "model.safetensors"))
    assert best_weights.keys() == epoch_weights.keys()
    for key in best_weights:
        assert torch.equal(best_weights[key], epoch_weights[key]), key
    model = NewsLxmertForPreTraining.from_pretrained(run_dir / "best")
    assert model.use_faces
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
