"""The NewsLXMERT training loop.

- AdamW: lr 1e-4, weight decay 0.01 on all but biases and LayerNorm weights, betas
  0.9/0.999, eps 1e-6;
- linear warm-up over ``warmup_ratio`` of the optimizer steps, then linear decay to 0;
- gradient clipping at norm 1.0, and micro-batches accumulated up to ``batch_size``;
- mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling;
- a checkpoint after every epoch (and every ``checkpoint_every_steps`` optimizer steps if
  set), plus the model with the best validation loss.

Output folder::

    <output>/
      checkpoints/epoch_001/     model (save_pretrained), tokenizer; the newest also holds
                                 trainer_state.pt (optimizer, scheduler, RNG, counters)
      checkpoints/step_000120/   mid-epoch checkpoint, removed once a newer one exists
      last.json                  which checkpoint to resume from
      best/                      model and tokenizer with the lowest validation loss, best.json
      history.json               per-epoch losses, learning rate and throughput, per-step losses
      run.json                   the run's settings and data fingerprints

Resuming (``resume=True``) restores the weights, optimizer, scheduler, RNG state and
position of the newest checkpoint and continues. Sample order and masks depend only on the
seed, the epoch and the sample index, so on CPU a resumed run ends with the same weights as
an uninterrupted one.

DDP: started by ``torchrun`` (WORLD_SIZE > 1), each process takes every world_size-th
sample of each optimizer batch and gradients are averaged across processes; only rank 0
writes files and logs progress. A process that a small batch leaves without samples runs
one sample with weight 0, so that it still joins the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from model.dataset import collate_samples, model_inputs
from model.modeling import NewsLxmertForPreTraining
from model.storage import atomic_write_text, remove_stale_temporaries

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
LAST_POINTER = "last.json"
HISTORY_FILE = "history.json"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the original NewsLXMERT's."""

    epochs: int = 20
    batch_size: int = 256  # samples per optimizer step (over all DDP processes)
    micro_batch_size: int = 64  # samples per forward pass; gradients accumulate up to batch_size
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    seed: int = 0
    num_workers: int = 2  # DataLoader worker processes; 0 builds samples in the training process
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    mixed_precision: str = "auto"  # auto (on for CUDA), off, bf16, fp16
    checkpoint_every_steps: int = 0  # 0: checkpoint at epoch ends only
    keep_epoch_checkpoints: bool = True  # False: keep only the newest epoch's weights
    log_every_steps: int = 10
    progress_bar: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(
                f"epochs, batch size and micro-batch size must be >= 1, got {self.epochs}, {self.batch_size}, {self.micro_batch_size}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmupRatio {self.warmup_ratio} must be in [0, 1)")
        if self.mixed_precision not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, off, bf16 or fp16, got {self.mixed_precision!r}")


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    best_dir: Path | None
    last_checkpoint: Path
    history: list[dict[str, Any]]
    best_valid_loss: float | None
    best_epoch: int | None
    global_step: int
    resumed_from: str | None
    samples_per_second: float
    seconds: float


# ---------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NOTE: tests/test_ddp.py compares 2 gloo processes on CPU with 1 process. The NCCL backend
    on GPUs has not run in this project's tests.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, distributed: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.enabled:
        name = f"cuda:{distributed.local_rank}"
    return torch.device(name)


# ---------------------------------------------------------------------------- schedule


def optimizer_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffle the sample indexes for ``epoch`` (seeded) and cut them into optimizer batches."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(count)
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def micro_batches(batch: np.ndarray, micro_batch_size: int, distributed: Distributed) -> list[np.ndarray]:
    """This process's share of one optimizer batch, cut into micro-batches."""
    share = batch[distributed.rank :: distributed.world_size]
    return [share[start : start + micro_batch_size] for start in range(0, len(share), micro_batch_size)]


class _MicroBatchSampler(torch.utils.data.Sampler):
    """Yields the micro-batches of steps ``first_step``.. of one epoch, in order."""

    def __init__(self, plan: Sequence[Sequence[np.ndarray]], first_step: int):
        self.micro = [micro.tolist() for step in plan[first_step:] for micro in step]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.micro)

    def __len__(self) -> int:
        return len(self.micro)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on biases or LayerNorm weights)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def warmup_linear_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up from 0 to the base lr over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------- checkpoints


def _checkpoint_name(epoch: int, step_in_epoch: int) -> str:
    # ``epoch`` counts finished epochs; a mid-epoch checkpoint belongs to epoch ``epoch`` + 1.
    return f"epoch_{epoch:03d}" if step_in_epoch == 0 else f"step_e{epoch + 1:03d}_{step_in_epoch:06d}"


def _write_model_folder(folder: Path, model: NewsLxmertForPreTraining, tokenizer, extra: Mapping[str, Any] | None = None) -> None:
    """Write model and tokenizer into a fresh temporary sibling, then rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, value in (extra or {}).items():
            if isinstance(value, bytes):
                (staging / name).write_bytes(value)
            else:
                (staging / name).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(folder, retired)
            os.replace(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# Hidden folders that _write_model_folder leaves when killed: ".<name>.<random>" (staging)
# and ".<name>.old" (the folder being replaced).
_STAGING_FOLDER = re.compile(r"^\.(?P<name>best|epoch_\d+|step_e\d+_\d+)\.(?P<kind>old|[A-Za-z0-9_]+)$")


def recover_interrupted_writes(output_dir: Path) -> None:
    """Clean up after a run killed while writing a model folder or a JSON file.

    Staging folders and temporary files are deleted. A folder moved aside to be replaced
    (``.<name>.old``) is moved back when the replacement never arrived, and deleted otherwise.
    """
    for parent in (output_dir, output_dir / CHECKPOINTS_DIR):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            match = _STAGING_FOLDER.match(path.name)
            if match is None or not path.is_dir():
                continue
            original = parent / match["name"]
            if match["kind"] == "old" and not original.exists():
                os.replace(path, original)
                logger.info("restored %s, which a killed run had moved aside", original)
            else:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed %s, left by a killed run", path)
    remove_stale_temporaries(output_dir)


def _trainer_state_bytes(state: Mapping[str, Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def read_last_checkpoint(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """Return the newest checkpoint folder and its pointer record, or None when there is none."""
    pointer = output_dir / LAST_POINTER
    if not pointer.is_file():
        return None
    record = json.loads(pointer.read_text(encoding="utf-8"))
    folder = output_dir / record["checkpoint"]
    if not (folder / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder}, which has no {TRAINER_STATE}; remove {pointer} to start over")
    return folder, record


# ---------------------------------------------------------------------------- loop helpers


def _autocast(device: torch.device, config: TrainConfig) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.dtype | None]:
    # NOTE: the CUDA branch (autocast, and GradScaler for fp16) has not run on a GPU in this
    # project's tests; the tests cover the CPU path only.
    mode = config.mixed_precision
    if device.type != "cuda" or mode == "off":
        return contextlib.nullcontext, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return (lambda: torch.autocast(device_type="cuda", dtype=dtype)), dtype


def _make_loader(dataset, sampler, config: TrainConfig, pad_token_id: int, device: torch.device, seed: int):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate_samples, pad_token_id=pad_token_id),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=False,
    )


def _all_reduce_sums(values: dict[str, float], distributed: Distributed, device: torch.device) -> dict[str, float]:
    if not distributed.enabled:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    pad_token_id: int,
    device: torch.device,
    distributed: Distributed = Distributed(),
) -> dict[str, float]:
    """Mean total loss and per-loss means over ``dataset``, weighted by micro-batch size."""
    module = model.module if hasattr(model, "module") else model
    was_training = module.training
    module.eval()
    plan = [micro_batches(np.arange(start, min(start + config.batch_size, len(dataset))), config.micro_batch_size, distributed)
            for start in range(0, len(dataset), config.batch_size)]
    loader = _make_loader(dataset, _MicroBatchSampler(plan, 0), config, pad_token_id, device, config.seed)
    autocast, _ = _autocast(device, config)
    sums: dict[str, float] = {"count": 0.0, "loss": 0.0}
    for batch in loader:
        count = float(batch["input_ids"].shape[0])
        with autocast():
            output = module(**model_inputs(batch, device))
        sums["count"] += count
        sums["loss"] += float(output.loss) * count
        for name, value in output.losses.items():
            sums[name] = sums.get(name, 0.0) + float(value) * count
    sums = _all_reduce_sums(sums, distributed, device)
    module.train(was_training)
    count = max(sums.pop("count"), 1.0)
    return {name: value / count for name, value in sums.items()}


# ---------------------------------------------------------------------------- training


def train_model(
    model: NewsLxmertForPreTraining,
    tokenizer,
    train_dataset,
    valid_dataset,
    output_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    run_info: Mapping[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_dataset`` (a NewsPairDataset) and write checkpoints to ``output_dir``.

    ``run_info`` (settings and data fingerprints, JSON values) is written to ``run.json``. When
    resuming, its ``fingerprint`` entry must equal the checkpoint's, so that a resume never
    mixes two different runs.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    distributed = init_distributed()
    device = resolve_device(config.device, distributed)
    pad_token_id = tokenizer.pad_token_id
    fingerprint = (run_info or {}).get("fingerprint")

    steps_per_epoch = math.ceil(len(train_dataset) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(total_steps * config.warmup_ratio)

    torch.manual_seed(config.seed)
    model.to(device)
    optimizer = build_optimizer(model, config)
    scheduler = warmup_linear_decay(optimizer, total_steps, warmup_steps)
    autocast, amp_dtype = _autocast(device, config)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    state: dict[str, Any] = {
        "epoch": 0,  # finished epochs
        "step_in_epoch": 0,  # optimizer steps done in the current epoch
        "global_step": 0,
        "history": [],
        "step_log": [],
        "best_valid_loss": None,
        "best_epoch": None,
        "epoch_sums": {},
        "epoch_samples": 0,
        "epoch_seconds": 0.0,
    }
    resumed_from = None
    if distributed.is_main:
        recover_interrupted_writes(output_dir)
    if distributed.enabled:
        # The other ranks read last.json and the folder it names only after rank 0 has
        # moved back a checkpoint that a killed run left aside.
        import torch.distributed as dist

        dist.barrier()
    if resume:
        found = read_last_checkpoint(output_dir)
        if found is None:
            logger.info("no checkpoint in %s; starting a new run", output_dir)
        else:
            folder, record = found
            saved = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{output_dir} contains a run with other settings or data (fingerprint {saved.get('fingerprint')} "
                    f"!= {fingerprint}); use another output folder or resume with the same settings"
                )
            from safetensors.torch import load_file

            from model.checkpoints import load_state_dict_into

            load_state_dict_into(model, load_file(str(folder / "model.safetensors"), device=str(device)), source=str(folder))
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["torch_rng"])
            if device.type == "cuda" and saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"], device)
            state.update({key: saved[key] for key in state if key in saved})
            resumed_from = str(folder)
            logger.info("resuming from %s: epoch %d, step %d of %d", folder, state["epoch"] + 1, state["step_in_epoch"], steps_per_epoch)

    if distributed.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if run_info is not None:
            atomic_write_text(output_dir / "run.json", json.dumps(dict(run_info), indent=1, sort_keys=True, default=str) + "\n")

    train_module = model
    if distributed.enabled:
        train_module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    model.train()

    def save_checkpoint(epoch: int, step_in_epoch: int) -> Path:
        name = _checkpoint_name(epoch, step_in_epoch)
        folder = output_dir / CHECKPOINTS_DIR / name
        if not distributed.is_main:
            return folder
        previous = read_last_checkpoint(output_dir)
        trainer_state = {
            **{key: state[key] for key in state},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "fingerprint": fingerprint,
        }
        _write_model_folder(folder, model, tokenizer, {TRAINER_STATE: _trainer_state_bytes(trainer_state)})
        record = {"checkpoint": f"{CHECKPOINTS_DIR}/{name}", "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": state["global_step"]}
        atomic_write_text(output_dir / LAST_POINTER, json.dumps(record, indent=1, sort_keys=True) + "\n")
        if previous is not None and previous[0] != folder:
            old_folder = previous[0]
            if old_folder.name.startswith("step_") or not config.keep_epoch_checkpoints:
                shutil.rmtree(old_folder, ignore_errors=True)
            else:
                (old_folder / TRAINER_STATE).unlink(missing_ok=True)  # keep the epoch's weights only
        return folder

    log_window = {"loss": 0.0, "samples": 0, "started": time.perf_counter()}
    last_folder = None
    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        train_dataset.set_epoch(epoch)
        epoch_batches = optimizer_batches(len(train_dataset), config.batch_size, config.seed, epoch)
        plan = [micro_batches(batch, config.micro_batch_size, distributed) for batch in epoch_batches]
        # A batch smaller than world_size (often the last one) leaves some processes no sample.
        # Every process must join the gradient all-reduce, so such a process runs the batch's
        # first sample with weight 0. Its loss and sample count are not recorded.
        stand_in_steps = {step for step, micro in enumerate(plan) if not micro}
        plan = [micro or [batch[:1]] for micro, batch in zip(plan, epoch_batches)]
        first_step = state["step_in_epoch"]
        loader = _make_loader(train_dataset, _MicroBatchSampler(plan, first_step), config, pad_token_id, device, config.seed + epoch)
        batches = iter(loader)
        epoch_started = time.perf_counter()
        progress = None
        if config.progress_bar and distributed.is_main:
            from tqdm import tqdm

            progress = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")

        for step in range(first_step, steps_per_epoch):
            # Each micro-batch loss is a mean; weighting by its share of the optimizer batch
            # makes the accumulated gradient that of the whole batch. DDP averages over the
            # processes, hence the factor world_size.
            full_batch = len(epoch_batches[step])
            stand_in = step in stand_in_steps
            step_loss = 0.0
            step_losses: dict[str, float] = {}
            for position, micro in enumerate(plan[step]):
                batch = next(batches)
                weight = 0.0 if stand_in else len(micro) / full_batch * distributed.world_size
                sync = position == len(plan[step]) - 1 or not distributed.enabled
                context = contextlib.nullcontext() if sync else train_module.no_sync()
                with context:
                    with autocast():
                        output = train_module(**model_inputs(batch, device))
                    scaler.scale(output.loss * weight).backward()
                if stand_in:
                    continue
                step_loss += float(output.loss.detach()) * len(micro)
                for name, value in output.losses.items():
                    step_losses[name] = step_losses.get(name, 0.0) + float(value) * len(micro)
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            samples = 0 if stand_in else sum(len(micro) for micro in plan[step])
            state["global_step"] += 1
            state["step_in_epoch"] = step + 1
            state["epoch_samples"] += samples
            sums = state["epoch_sums"]
            sums["loss"] = sums.get("loss", 0.0) + step_loss
            for name, value in step_losses.items():
                sums[name] = sums.get(name, 0.0) + value
            lr = scheduler.get_last_lr()[0]
            # The per-step loss in history.json and in the log covers the samples of all processes.
            batch_sums = _all_reduce_sums({"loss": step_loss, "samples": float(samples)}, distributed, device)
            batch_loss = batch_sums["loss"] / max(batch_sums["samples"], 1.0)
            state["step_log"].append({"step": state["global_step"], "epoch": epoch + 1, "loss": batch_loss, "lr": lr})
            log_window["loss"] += batch_sums["loss"]
            log_window["samples"] += batch_sums["samples"]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{batch_loss:.4f}", lr=f"{lr:.2e}")
            if distributed.is_main and (state["global_step"] % config.log_every_steps == 0 or step + 1 == steps_per_epoch):
                elapsed = time.perf_counter() - log_window["started"]
                logger.info(
                    "epoch %d/%d step %d/%d: loss %.4f, %.1f samples/s, lr %.3e",
                    epoch + 1, config.epochs, step + 1, steps_per_epoch,
                    log_window["loss"] / max(log_window["samples"], 1),
                    log_window["samples"] / max(elapsed, 1e-9), lr,
                )
                log_window = {"loss": 0.0, "samples": 0, "started": time.perf_counter()}
            if config.checkpoint_every_steps and state["global_step"] % config.checkpoint_every_steps == 0 and step + 1 < steps_per_epoch:
                state["epoch_seconds"] += time.perf_counter() - epoch_started
                epoch_started = time.perf_counter()
                last_folder = save_checkpoint(epoch, step + 1)
        if progress is not None:
            progress.close()
        del batches, loader

        state["epoch_seconds"] += time.perf_counter() - epoch_started
        train_sums = _all_reduce_sums({"samples": float(state["epoch_samples"]), **state["epoch_sums"]}, distributed, device)
        train_count = max(train_sums.pop("samples"), 1.0)
        valid = evaluate_loss(train_module, valid_dataset, config, pad_token_id, device, distributed) if valid_dataset is not None else {}
        record = {
            "epoch": epoch + 1,
            "global_step": state["global_step"],
            "train_loss": train_sums.pop("loss", 0.0) / train_count,
            "train_losses": {name: value / train_count for name, value in sorted(train_sums.items())},
            "valid_loss": valid.pop("loss", None),
            "valid_losses": dict(sorted(valid.items())),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_second": train_count / max(state["epoch_seconds"], 1e-9),
            "seconds": state["epoch_seconds"],
        }
        state["history"].append(record)
        improved = record["valid_loss"] is not None and (state["best_valid_loss"] is None or record["valid_loss"] < state["best_valid_loss"])
        if improved:
            state["best_valid_loss"] = record["valid_loss"]
            state["best_epoch"] = epoch + 1
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums={}, epoch_samples=0, epoch_seconds=0.0)

        if distributed.is_main:
            logger.info(
                "epoch %d/%d done: train loss %.4f, valid loss %s, %.1f samples/s%s",
                epoch + 1, config.epochs, record["train_loss"],
                "n/a" if record["valid_loss"] is None else f"{record['valid_loss']:.4f}",
                record["samples_per_second"], " (best so far)" if improved else "",
            )
            if improved:
                _write_model_folder(output_dir / BEST_DIR, model, tokenizer, {"best.json": {"epoch": epoch + 1, "valid_loss": record["valid_loss"]}})
            write_history(output_dir, state["history"], state["step_log"])
        last_folder = save_checkpoint(epoch + 1, 0)
        if on_epoch_end is not None and distributed.is_main:
            on_epoch_end(record)

    if last_folder is None:
        found = read_last_checkpoint(output_dir)
        last_folder = found[0] if found else output_dir
    if distributed.is_main and not (output_dir / BEST_DIR).exists() and valid_dataset is None:
        _write_model_folder(output_dir / BEST_DIR, model, tokenizer, {"best.json": {"epoch": state["epoch"], "valid_loss": None}})
    samples = sum(record["samples_per_second"] * record["seconds"] for record in state["history"])
    seconds = sum(record["seconds"] for record in state["history"])
    return TrainResult(
        output_dir=output_dir,
        best_dir=output_dir / BEST_DIR if (output_dir / BEST_DIR).exists() else None,
        last_checkpoint=last_folder,
        history=state["history"],
        best_valid_loss=state["best_valid_loss"],
        best_epoch=state["best_epoch"],
        global_step=state["global_step"],
        resumed_from=resumed_from,
        samples_per_second=samples / seconds if seconds else 0.0,
        seconds=time.perf_counter() - started,
    )


def write_history(output_dir: Path, history: list[dict[str, Any]], step_log: list[dict[str, Any]]) -> Path:
    path = output_dir / HISTORY_FILE
    atomic_write_text(path, json.dumps({"epochs": history, "steps": step_log}, indent=1, sort_keys=True) + "\n")
    return path


def plot_loss_curves(history_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """Plot per-step training loss and per-epoch training and validation loss into a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.storage import atomic_write_bytes

    history = json.loads(Path(history_path).read_text(encoding="utf-8"))
    figure, axis = plt.subplots(figsize=(7, 4))
    steps = history.get("steps", [])
    epochs = history.get("epochs", [])
    if steps:
        axis.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="0.75", linewidth=0.8, label="train (per step)")
    if epochs:
        x = [e["global_step"] for e in epochs]
        axis.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train (epoch mean)")
        valid = [(xi, e["valid_loss"]) for xi, e in zip(x, epochs) if e.get("valid_loss") is not None]
        if valid:
            axis.plot([v[0] for v in valid], [v[1] for v in valid], marker="s", label="validation")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("total loss")
    axis.set_title(title or "NewsLXMERT training loss")
    axis.grid(alpha=0.3)
    axis.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(png_path, buffer.getvalue())
    return Path(png_path)
