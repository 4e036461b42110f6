"""``nytimes800k/pretrained_model`` and ``newsimages/finetuned_model``: NewsLXMERT training runs.

Each asset writes a ``TrainingRun`` (``model.cli``) as JSON and runs the training command
line (``python -m model.train_nytimes`` / ``model.train_mediaeval --runSpec FILE``) in a
subprocess, or under ``torchrun`` with ``nproc_per_node`` > 1 for DDP. The orchestrating
process stays small, and every line the run logs is forwarded to the Dagster run log.

A run's folder is ``<data_root>/<dataset>/<asset>/runs/<fingerprint>/``. The fingerprint
hashes the settings, the index files and the feature manifests, so a re-materialization
with the same inputs resumes (or, when finished, reuses) its run, and other inputs start a
new one. ``current.json`` beside ``runs/`` names the latest finished run; fine-tuning
starts from the pre-trained run it names.
"""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import base64
import collections
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dagster import AssetExecutionContext, AssetKey, Config, Failure, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from model.cli import DEFAULT_LXMERT, TrainingRun, code_version, run_fingerprint
from model.documents import TEXT_STAGE, article_text, iter_articles
from model.fingerprint import folder_fingerprint
from model.index import index_path
from model.manifest import list_manifests
from model.storage import atomic_write_text
from model.text import check_mode
from model.train import BEST_DIR, TrainConfig
from pipelines.executors import GPU_OP_TAGS
from pipelines.resources import PipelineSettings

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
LXMERT_MODEL_ENV = "NEWSLXMERT_LXMERT_MODEL"
CLI_MODULES = {"nytimes800k": "model.train_nytimes", "newsimages": "model.train_mediaeval"}
PRETRAINED = ("nytimes800k", "pretrained_model")
FINETUNED = ("newsimages", "finetuned_model")
CURRENT_POINTER = "current.json"
# Defaults that differ between profiles; the base values are the original NewsLXMERT's.
PROFILE_DEFAULTS = {
    "base": {"epochs": 20, "batch_size": 256, "lr": 1e-4},
    "tiny": {"epochs": 40, "batch_size": 32, "lr": 3e-4},
}
LOG_TAIL_LINES = 40


class TrainingConfig(Config):
    """The training command line's flags, plus how the run is launched."""

    epochs: Optional[int] = Field(default=None, description="passes over the training pairs; empty: 20 (base profile) or 40 (tiny)")
    batch_size: Optional[int] = Field(default=None, description="pairs per optimizer step; empty: 256 (base) or 32 (tiny)")
    micro_batch_size: int = Field(default=64, description="pairs per forward pass; gradients accumulate up to batch_size")
    lr: Optional[float] = Field(default=None, description="peak AdamW learning rate; empty: 1e-4 (base) or 3e-4 (tiny)")
    warmup_ratio: float = Field(default=0.05, description="share of optimizer steps with linear warm-up, then linear decay to 0")
    mode: int = Field(default=7, description="text: 1 caption, 2 caption+headline, 3 caption+snippet, 4 caption+snippet+headline, 5 headline, 6 snippet, 7 snippet+headline (NewsImages: 5-7)")
    masked_lm_ratio: float = Field(default=0.15, description="probability that a token is masked")
    masked_feats_ratio: float = Field(default=0.15, description="probability that a region or face is masked")
    max_seq_len: int = Field(default=100, description="maximum tokens per text, [CLS] and [SEP] included")
    entities: bool = Field(default=True, description="mask tokens inside named entities with probability 0.30")
    faces: bool = Field(default=True, description="add FaceNet face tokens and the face loss (needs the index built with require_faces)")
    seed: int = Field(default=0, description="seed for initialisation, sample order and masks")
    num_workers: int = Field(default=2, description="DataLoader worker processes per training process")
    checkpoint_every_steps: int = Field(default=0, description="also checkpoint every N optimizer steps (0: epoch ends only)")
    keep_epoch_checkpoints: bool = Field(default=True, description="keep the weights of every epoch, not only the newest")
    lxmert_model: str = Field(
        default_factory=lambda: os.environ.get(LXMERT_MODEL_ENV, DEFAULT_LXMERT),
        description=f"base profile: the LXMERT to start pre-training from, a hub id in the local cache or a folder (env {LXMERT_MODEL_ENV})",
    )
    load_lxmert: Optional[str] = Field(
        default=None,
        description="checkpoint to start from instead (a folder or an original NewsLXMERT .pth); fine-tuning: empty means the pre-trained model",
    )
    nproc_per_node: int = Field(default=1, description="training processes; more than 1 runs DDP under torchrun")

    def resolved(self, profile: str) -> dict[str, Any]:
        defaults = PROFILE_DEFAULTS["tiny" if profile == "tiny" else "base"]
        return {name: getattr(self, name) if getattr(self, name) is not None else value for name, value in defaults.items()}


# ---------------------------------------------------------------------------- inputs


def _manifest_digest(dataset_root: Path, stage: str) -> str:
    manifests = list_manifests(dataset_root, stage)
    return hashlib.sha256(json.dumps(manifests, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _check_index(dataset_root: Path, dataset: str) -> None:
    for split in ("train", "valid"):
        if not index_path(dataset_root, split).is_file():
            raise FileNotFoundError(f"no {split} index at {index_path(dataset_root, split)}; materialize {dataset}/index first")


def _corpus_texts(data_root: Path):
    """Yield every headline, snippet and caption of both datasets, to train the tiny tokenizer on."""
    for dataset, stage in TEXT_STAGE.items():
        folder = data_root / dataset / stage
        if not folder.is_dir():
            continue
        for _, document in iter_articles(folder):
            text = article_text(document)
            yield from (text.headline, text.snippet, *text.captions)


def base_model_source(config: TrainingConfig, settings: PipelineSettings, feature_dim: int) -> str:
    """Return the LXMERT that pre-training starts from: the tiny profile's folder, else ``lxmert_model``.

    Raises ModelWeightsNotFoundError naming the setting when the base model is neither a
    local folder nor in the local Hugging Face cache, before any process is started.
    """
    from model.modeling import ModelWeightsNotFoundError

    if settings.profile == "tiny":
        from model.tiny import ensure_tiny_lxmert

        return str(ensure_tiny_lxmert(settings.data_root, lambda: _corpus_texts(Path(settings.data_root)), feature_dim))
    source = config.lxmert_model
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json") if source.count("/") == 1 else None
    if not isinstance(cached, str):
        raise ModelWeightsNotFoundError(
            f"LXMERT model {source!r} is neither a local folder nor in the Hugging Face cache; set the training config "
            f"'lxmert_model' (or {LXMERT_MODEL_ENV}) to a folder saved with save_pretrained, or use the tiny profile"
        )
    return source


def pretrained_checkpoint(settings: PipelineSettings) -> Path:
    """Return the best checkpoint of the latest finished pre-training run."""
    pointer = settings.dataset_root(PRETRAINED[0]) / PRETRAINED[1] / CURRENT_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"no finished pre-training run ({pointer} missing); materialize nytimes800k/pretrained_model first")
    best = Path(json.loads(pointer.read_text(encoding="utf-8"))["best_checkpoint"])
    if not (best / "config.json").is_file():
        raise FileNotFoundError(f"{pointer} names {best}, but that checkpoint is missing; materialize nytimes800k/pretrained_model again")
    return best


def build_run(config: TrainingConfig, settings: PipelineSettings, dataset: str, asset_name: str, start_from: dict[str, Optional[str]]) -> TrainingRun:
    """Build an asset's TrainingRun from the pipeline's folders for ``dataset`` and the config's flags."""
    dataset_root = settings.dataset_root(dataset)
    articles = dataset_root / TEXT_STAGE[dataset]
    resolved = config.resolved(settings.profile)
    device = settings.torch_device() if config.nproc_per_node == 1 else settings.device
    return TrainingRun(
        dataset=dataset,
        output="",  # set once the fingerprint is known
        feats_dir=str(dataset_root / "region_features"),
        train_dir=str(articles / "train"),
        train_index=str(index_path(dataset_root, "train")),
        valid_dir=str(articles / "valid"),
        valid_index=str(index_path(dataset_root, "valid")),
        test_dir=str(articles / "test"),
        test_index=str(index_path(dataset_root, "test")),
        faces_dir=str(dataset_root / "face_features") if config.faces else None,
        entities_dir=str(dataset_root / "entities") if config.entities and (dataset_root / "entities").is_dir() else None,
        model=start_from["model"] or DEFAULT_LXMERT,
        load_lxmert=start_from["load_lxmert"],
        mode=config.mode,
        max_seq_len=config.max_seq_len,
        masked_lm_ratio=config.masked_lm_ratio,
        masked_feats_ratio=config.masked_feats_ratio,
        entities=config.entities,
        faces=config.faces,
        resume=True,
        train=TrainConfig(
            epochs=resolved["epochs"],
            batch_size=resolved["batch_size"],
            micro_batch_size=min(config.micro_batch_size, resolved["batch_size"]),
            lr=resolved["lr"],
            warmup_ratio=config.warmup_ratio,
            seed=config.seed,
            num_workers=config.num_workers,
            device=device,
            checkpoint_every_steps=config.checkpoint_every_steps,
            keep_epoch_checkpoints=config.keep_epoch_checkpoints,
            progress_bar=False,
        ),
    )


# ---------------------------------------------------------------------------- running


def launch_command(dataset: str, spec_path: Path, nproc_per_node: int) -> list[str]:
    module = CLI_MODULES[dataset]
    if nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}", "-m", module, "--runSpec", str(spec_path)]
    return [sys.executable, "-m", module, "--runSpec", str(spec_path)]


def run_subprocess(context: AssetExecutionContext, command: list[str]) -> None:
    """Run ``command``, forwarding each output line to the run log; raise Failure when it fails."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), environment.get("PYTHONPATH")]))
    context.log.info("starting %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    process = subprocess.Popen(
        command, cwd=REPOSITORY_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if " WARNING " in line:
                context.log.warning(line)
            elif " ERROR " in line or "Traceback" in line:
                context.log.error(line)
            else:
                context.log.info(line)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if returncode != 0:
        raise Failure(
            description=f"training exited with status {returncode}",
            metadata={"command": " ".join(command), "log_tail": MetadataValue.md("```\n" + "\n".join(tail) + "\n```")},
        )


def _inline_png(path: Path, title: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"![{title}](data:image/png;base64,{encoded})"


def train_asset(
    context: AssetExecutionContext,
    config: TrainingConfig,
    settings: PipelineSettings,
    dataset: str,
    asset_name: str,
    start_from: dict[str, Optional[str]],
) -> MaterializeResult:
    started = time.perf_counter()
    check_mode(config.mode, dataset)
    dataset_root = settings.dataset_root(dataset)
    _check_index(dataset_root, dataset)

    run = build_run(config, settings, dataset, asset_name, start_from)
    fingerprint_inputs = run_fingerprint(run)
    fingerprint_inputs["data"].update(
        region_manifests=_manifest_digest(dataset_root, "region_features"),
        face_manifests=_manifest_digest(dataset_root, "face_features") if config.faces else "",
        entity_manifests=_manifest_digest(dataset_root, "entities") if config.entities else "",
    )
    fingerprint = hashlib.sha256(json.dumps(fingerprint_inputs, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    asset_root = dataset_root / asset_name
    run_dir = asset_root / "runs" / fingerprint
    run.output = str(run_dir)
    spec_path = run_dir / "training_request.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_path, json.dumps(run.to_json(), indent=1, sort_keys=True) + "\n")
    context.log.info("training run %s in %s (starting from %s)", fingerprint, run_dir, run.load_lxmert or run.model)

    run_subprocess(context, launch_command(dataset, spec_path, config.nproc_per_node))

    history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    epochs = history["epochs"]
    best_dir = run_dir / BEST_DIR
    best = json.loads((best_dir / "best.json").read_text(encoding="utf-8"))
    atomic_write_text(
        asset_root / CURRENT_POINTER,
        json.dumps({"run": str(run_dir), "best_checkpoint": str(best_dir), "fingerprint": fingerprint}, indent=1) + "\n",
    )
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    last = epochs[-1]
    metadata = {
        "best_checkpoint": MetadataValue.path(str(best_dir)),
        "run_dir": MetadataValue.path(str(run_dir)),
        "fingerprint": fingerprint,
        "epochs": len(epochs),
        "best_epoch": best["epoch"],
        "best_valid_loss": best["valid_loss"],
        "final_train_loss": last["train_loss"],
        "final_valid_loss": last["valid_loss"],
        "final_losses": MetadataValue.json({"train": last["train_losses"], "valid": last["valid_losses"]}),
        "samples_per_second": round(sum(e["samples_per_second"] for e in epochs) / len(epochs), 2),
        "per_epoch": MetadataValue.json([{k: e[k] for k in ("epoch", "train_loss", "valid_loss", "lr", "samples_per_second")} for e in epochs]),
        "pairs": MetadataValue.json(info.get("pairs", {})),
        "settings": MetadataValue.json(info["settings"]),
        "data_fingerprints": MetadataValue.json(fingerprint_inputs["data"]),
        "code_version": MetadataValue.json(code_version()),
        "profile": settings.profile,
        "started_from": run.load_lxmert or run.model,
        "processes": config.nproc_per_node,
        "seconds": round(time.perf_counter() - started, 1),
    }
    curve = run_dir / "loss_curve.png"
    if curve.is_file():
        metadata["loss_curve"] = MetadataValue.md(_inline_png(curve, "loss curve"))
    # The best checkpoint is what evaluation and fine-tuning load.
    fingerprints = {None: folder_fingerprint(best_dir)}
    metadata.update(fingerprint_metadata(fingerprints))
    return MaterializeResult(data_version=run_data_version(fingerprints), metadata=metadata)


@asset(
    key=list(PRETRAINED),
    group_name="nytimes800k",
    deps=[AssetKey(["nytimes800k", "index"]), AssetKey(["nytimes800k", "region_features"]), AssetKey(["nytimes800k", "face_features"]), AssetKey(["nytimes800k", "entities"])],
    op_tags=GPU_OP_TAGS,
    code_version="1",
    kinds={"pytorch"},
    description=(
        "NewsLXMERT pre-trained on the NYTimes800k index: masked LM (entity-aware), image-text matching, "
        "region and face losses. Checkpoints per epoch, the best validation-loss model (best/), history.json "
        "and a loss curve under <data_root>/nytimes800k/pretrained_model/runs/<fingerprint>/."
    ),
)
def nytimes800k_pretrained_model(context: AssetExecutionContext, config: TrainingConfig, settings: PipelineSettings) -> MaterializeResult:
    from model.regions import RegionFeatureReader

    feature_dim = RegionFeatureReader(settings.dataset_root("nytimes800k")).feature_dim
    if config.load_lxmert:
        start_from = {"model": None, "load_lxmert": config.load_lxmert}
    else:
        start_from = {"model": base_model_source(config, settings, feature_dim), "load_lxmert": None}
    return train_asset(context, config, settings, "nytimes800k", PRETRAINED[1], start_from)


@asset(
    key=list(FINETUNED),
    group_name="newsimages",
    deps=[
        AssetKey(["newsimages", "index"]),
        AssetKey(["newsimages", "region_features"]),
        AssetKey(["newsimages", "face_features"]),
        AssetKey(["newsimages", "entities"]),
        AssetKey(list(PRETRAINED)),
    ],
    op_tags=GPU_OP_TAGS,
    code_version="1",
    kinds={"pytorch"},
    description=(
        "NewsLXMERT fine-tuned on the NewsImages index, starting from the pre-trained NYTimes800k model "
        "(like --loadLxmert). Same outputs as pre-training, under <data_root>/newsimages/finetuned_model/."
    ),
)
def newsimages_finetuned_model(context: AssetExecutionContext, config: TrainingConfig, settings: PipelineSettings) -> MaterializeResult:
    check_mode(config.mode, "newsimages")
    source = config.load_lxmert or str(pretrained_checkpoint(settings))
    return train_asset(context, config, settings, "newsimages", FINETUNED[1], {"model": None, "load_lxmert": source})
