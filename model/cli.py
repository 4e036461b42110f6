"""The training command line shared by ``python -m model.train_nytimes`` and ``model.train_mediaeval``.

It accepts the original NewsLXMERT flags with their meanings (``--entities True``,
``--faces False``: boolean flags take a value) plus a few of its own, builds a
``TrainingRun`` and runs it. The pipeline's training assets write the same ``TrainingRun``
as JSON and start ``--runSpec FILE`` in a subprocess, so both paths share this code.

Differences from the original command line:

- ``--output`` is the run folder itself (the original made a time-stamped subfolder), so
  that ``--resume`` finds the checkpoints of an interrupted run;
- ``--batchSize`` is the optimizer batch; ``--microBatchSize`` (default 64, the original's
  fixed value) sets the forward-pass size, and gradients accumulate between them;
- ``--featsDir`` is a pipeline ``region_features`` folder (the fast store) or a folder of
  per-image JSON files in the original layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from model.dataset import ArticleStore, NewsPairDataset, PairDatasetConfig, open_region_reader
from model.index import index_fingerprint, load_index
from model.text import MODES, check_mode
from model.train import BEST_DIR, TrainConfig, TrainResult, plot_loss_curves, train_model

logger = logging.getLogger(__name__)

DEFAULT_LXMERT = "unc-nlp/lxmert-base-uncased"
TRAINING_CODE_VERSION = "1"  # bump when a change alters what a finished run would produce


def str2bool(value: str | bool) -> bool:
    """Parse True/False flag values the way the original command line did (yes/no, 1/0 too)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


@dataclasses.dataclass
class TrainingRun:
    """Everything one training (or ``--test``) run needs; JSON-serialisable."""

    dataset: str  # nytimes800k or newsimages
    output: str
    feats_dir: str
    train_dir: str | None = None
    train_index: str | None = None
    valid_dir: str | None = None
    valid_index: str | None = None
    test_dir: str | None = None
    test_index: str | None = None
    faces_dir: str | None = None  # <dataset_root>/face_features; None: next to feats_dir, else the documents
    entities_dir: str | None = None  # <dataset_root>/entities; None: next to feats_dir when present
    model: str = DEFAULT_LXMERT  # the LXMERT to start from: hub id, folder or .pth
    load_lxmert: str | None = None  # a NewsLXMERT checkpoint to start from instead (fine-tuning)
    tokenizer: str | None = None  # None: the tokenizer saved with the starting checkpoint, else DEFAULT_LXMERT's
    from_scratch: bool = False
    mode: int = 7
    max_seq_len: int = 100
    masked_lm_ratio: float = 0.15
    masked_feats_ratio: float = 0.15
    entity_mask_ratio: float = 0.30
    entities: bool = False
    faces: bool = False
    negative_ratio: float = 0.5
    trust_index: bool = False
    resume: bool = False
    test: bool = False
    test_pool_size: int = 1000
    valid_pool_size: int = 500
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "TrainingRun":
        value = dict(value)
        value["train"] = TrainConfig(**value.get("train", {}))
        return cls(**value)

    def dataset_config(self) -> PairDatasetConfig:
        return PairDatasetConfig(
            dataset=self.dataset,
            mode=self.mode,
            max_seq_len=self.max_seq_len,
            masked_lm_ratio=self.masked_lm_ratio,
            masked_feats_ratio=self.masked_feats_ratio,
            entity_mask_ratio=self.entity_mask_ratio,
            use_entities=self.entities,
            use_faces=self.faces,
            negative_ratio=self.negative_ratio,
            seed=self.train.seed,
        )


# ---------------------------------------------------------------------------- parser


def build_parser(prog: str, dataset: str) -> argparse.ArgumentParser:
    """Build the argument parser of ``prog`` for ``dataset``; ``--help`` explains every flag."""
    name = {"nytimes800k": "NYTimes800k (pre-training)", "newsimages": "MediaEval NewsImages (fine-tuning)"}[dataset]
    modes = "; ".join(f"{key} = {value}" for key, value in MODES.items())
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Train NewsLXMERT on {name}, or evaluate it with --test. Boolean flags take a value: True or False.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--trainDsDir", help="folder of the training articles, one <aid>.json each (e.g. <data_root>/<dataset>/articles/train)")
    data.add_argument("--trainIndex", help="training index: pickle of {i: (aid, iid)} written by the index asset (or its .parquet twin)")
    data.add_argument("--validDsDir", help="folder of the validation articles")
    data.add_argument("--validIndex", help="validation index (pickle or parquet)")
    data.add_argument("--testDsDir", help="folder of the test articles (used by --test)")
    data.add_argument("--testIndex", help="test index (pickle or parquet, used by --test)")
    data.add_argument("--featsDir", help="region features: <data_root>/<dataset>/region_features (fast store) or a folder of original per-image JSON files")
    data.add_argument("--facesDir", help="face features folder (<data_root>/<dataset>/face_features); default: next to --featsDir, else the faces stored in the NYTimes800k documents")
    data.add_argument("--entitiesDir", help="named-entity folder (<data_root>/<dataset>/entities); default: next to --featsDir when present")
    data.add_argument("--trustIndex", type=str2bool, default=False, metavar="BOOL", help="read an index pickle that this pipeline did not write, without running code from it (default False)")

    model = parser.add_argument_group("model")
    model.add_argument("--output", help="run folder for checkpoints, best model, history and evaluation results")
    model.add_argument("--model", default=DEFAULT_LXMERT, help=f"LXMERT to start from: hub id, local folder or .pth file (default {DEFAULT_LXMERT})")
    model.add_argument("--loadLxmert", help="NewsLXMERT checkpoint to start from instead of --model (a checkpoint folder or an original .pth; QA heads are dropped); with --test, the model to evaluate")
    model.add_argument("--tokenizer", help="tokenizer folder or hub id; default: the one saved with the starting checkpoint, else the base LXMERT's")
    model.add_argument("--fromScratch", type=str2bool, default=False, metavar="BOOL", help="randomly re-initialise all weights of --model (default False)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=20, help="number of passes over the training pairs (default 20)")
    training.add_argument("--batchSize", type=int, default=256, help="pairs per optimizer step (default 256)")
    training.add_argument("--microBatchSize", type=int, default=64, help="pairs per forward pass; gradients accumulate up to --batchSize (default 64)")
    training.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    training.add_argument("--warmupRatio", type=float, default=0.05, help="share of optimizer steps with linear warm-up, then linear decay to 0 (default 0.05)")
    training.add_argument("--mode", type=int, default=7, choices=sorted(MODES), help=f"which text the model reads: {modes} (default 7); modes 1-4 need captions (NYTimes800k only)")
    training.add_argument("--maskedLmRatio", type=float, default=0.15, help="probability that a token is masked for the masked-LM loss (default 0.15)")
    training.add_argument("--maskedFeatsRatio", type=float, default=0.15, help="probability that a region or a face is masked for the visual losses (default 0.15)")
    training.add_argument("--maxSeqLen", type=int, default=100, help="maximum tokens per text, [CLS] and [SEP] included; longer texts are truncated (default 100)")
    training.add_argument("--entities", type=str2bool, default=False, metavar="BOOL", help="mask tokens inside named entities with probability 0.30 instead of --maskedLmRatio (default False)")
    training.add_argument("--faces", type=str2bool, default=False, metavar="BOOL", help="add up to 10 FaceNet face tokens per image and the face loss (default False)")
    training.add_argument("--seed", type=int, default=0, help="random seed for initialisation, sample order and masks (default 0)")
    training.add_argument("--numWorkers", type=int, default=2, help="DataLoader worker processes (default 2; 0 builds samples in the training process)")
    training.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    training.add_argument("--checkpointEverySteps", type=int, default=0, help="also checkpoint every N optimizer steps within an epoch (default 0: epoch ends only)")
    training.add_argument("--resume", type=str2bool, default=False, metavar="BOOL", help="continue from the last checkpoint in --output after an interruption (default False)")
    training.add_argument("--progress", type=str2bool, default=True, metavar="BOOL", help="show a progress bar (default True)")

    parser.add_argument("--test", action="store_true", help="evaluate instead of training: MRR@100 and R@k on the validation and test splits")
    parser.add_argument("--runSpec", help="read every setting from this JSON file (written by the pipeline's training assets); other flags are ignored")
    return parser


def run_from_args(args: argparse.Namespace, dataset: str, parser: argparse.ArgumentParser) -> TrainingRun:
    """Turn parsed flags into a TrainingRun, or exit with a usage error naming the missing flags."""
    check = (("--featsDir", args.featsDir), ("--output", args.output), ("--validDsDir", args.validDsDir), ("--validIndex", args.validIndex))
    check += (("--testDsDir", args.testDsDir), ("--testIndex", args.testIndex)) if args.test else (("--trainDsDir", args.trainDsDir), ("--trainIndex", args.trainIndex))
    missing = [flag for flag, value in check if not value]
    if missing:
        parser.error(f"{'--test' if args.test else 'training'} needs {', '.join(missing)}")
    try:
        check_mode(args.mode, dataset)
    except ValueError as error:
        parser.error(str(error))
    return TrainingRun(
        dataset=dataset,
        output=args.output,
        feats_dir=args.featsDir,
        train_dir=args.trainDsDir,
        train_index=args.trainIndex,
        valid_dir=args.validDsDir,
        valid_index=args.validIndex,
        test_dir=args.testDsDir,
        test_index=args.testIndex,
        faces_dir=args.facesDir,
        entities_dir=args.entitiesDir,
        model=args.model,
        load_lxmert=args.loadLxmert,
        tokenizer=args.tokenizer,
        from_scratch=args.fromScratch,
        mode=args.mode,
        max_seq_len=args.maxSeqLen,
        masked_lm_ratio=args.maskedLmRatio,
        masked_feats_ratio=args.maskedFeatsRatio,
        entities=args.entities,
        faces=args.faces,
        trust_index=args.trustIndex,
        resume=args.resume,
        test=args.test,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batchSize,
            micro_batch_size=min(args.microBatchSize, args.batchSize),
            lr=args.lr,
            warmup_ratio=args.warmupRatio,
            seed=args.seed,
            num_workers=args.numWorkers,
            device=args.device,
            checkpoint_every_steps=args.checkpointEverySteps,
            progress_bar=args.progress,
        ),
    )


# ---------------------------------------------------------------------------- building blocks


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and (folder / "tokenizer_config.json").is_file()


def load_tokenizer(run: TrainingRun):
    """Load the run's fast tokenizer: the given one, else the starting checkpoint's, else the base LXMERT's."""
    from transformers import AutoTokenizer

    from model.modeling import ModelWeightsNotFoundError

    source = run.tokenizer
    if source is None:
        start = Path(run.load_lxmert or run.model)
        source = str(start) if _has_tokenizer(start) else DEFAULT_LXMERT
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=Path(source).exists())
    except OSError as error:
        raise ModelWeightsNotFoundError(
            f"tokenizer {source!r} could not be loaded ({str(error).splitlines()[0]}); pass --tokenizer with a local folder"
        ) from error
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer {source!r} is not a fast tokenizer; entity masking needs offset mappings")
    return tokenizer


def load_model(run: TrainingRun, visual_feat_dim: int):
    """Load the network the run starts from (``--loadLxmert`` before ``--model``)."""
    import torch

    from model.modeling import NewsLxmertForPreTraining, news_lxmert_config

    torch.manual_seed(run.train.seed)  # fresh face modules and heads are initialised under the seed
    source = run.load_lxmert or run.model
    if run.from_scratch:
        from transformers import LxmertConfig

        config = news_lxmert_config(LxmertConfig.from_pretrained(source), use_faces=run.faces)
        model = NewsLxmertForPreTraining(config)
        if int(config.visual_feat_dim) != int(visual_feat_dim):
            model = NewsLxmertForPreTraining(news_lxmert_config(config, visual_feat_dim=visual_feat_dim))
        return model
    return NewsLxmertForPreTraining.from_pretrained(source, use_faces=run.faces, visual_feat_dim=visual_feat_dim)


def _dataset_root_of(run: TrainingRun) -> Path:
    return Path(run.feats_dir).resolve().parent


def open_face_reader(run: TrainingRun):
    """Open the run's face lookup, or return None to read the faces stored in the documents."""
    if not run.faces:
        return None
    faces_dir = Path(run.faces_dir) if run.faces_dir else _dataset_root_of(run) / "face_features"
    if not faces_dir.is_dir():
        if run.faces_dir:
            raise FileNotFoundError(f"--facesDir {faces_dir} not found")
        logger.warning("no face features at %s; reading faces from the documents' facenet_details", faces_dir)
        return None
    from model.faces import FaceFeatureReader

    return FaceFeatureReader(faces_dir.resolve().parent).get


def entity_loader(run: TrainingRun):
    if not run.entities:
        return None
    entities_dir = Path(run.entities_dir) if run.entities_dir else _dataset_root_of(run) / "entities"
    if not entities_dir.is_dir():
        if run.entities_dir:
            raise FileNotFoundError(f"--entitiesDir {entities_dir} not found")
        logger.warning("no entities folder at %s; only entity spans stored in the documents are used", entities_dir)
        return None
    from model.entities import load_entities

    return partial(load_entities, entities_dir.resolve().parent)


def split_dataset(run: TrainingRun, articles_dir: str, index: str, tokenizer, regions, faces, fixed_epoch: int | None):
    pairs = load_index(index, allow_foreign_pickle=run.trust_index)
    articles = ArticleStore(articles_dir, entity_loader=entity_loader(run))
    return NewsPairDataset(pairs, articles, regions.get, tokenizer, run.dataset_config(), faces=faces, fixed_epoch=fixed_epoch)


def code_version() -> dict[str, str]:
    """The package version, the training code version and, when available, the git commit."""
    from importlib import metadata

    version = {"training_code": TRAINING_CODE_VERSION}
    try:
        version["package"] = metadata.version("newslxmert")
    except metadata.PackageNotFoundError:
        version["package"] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        version["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def run_fingerprint(run: TrainingRun) -> dict[str, Any]:
    """Settings and data identities of a training run; ``fingerprint`` hashes what must match on resume."""
    settings = run.to_json()
    for volatile in ("resume", "test"):
        settings.pop(volatile)
    for volatile in ("num_workers", "progress_bar", "log_every_steps", "device"):
        settings["train"].pop(volatile)
    data = {
        name: index_fingerprint(path)
        for name, path in (("train_index", run.train_index), ("valid_index", run.valid_index))
        if path and Path(path).is_file()
    }
    digest = hashlib.sha256(json.dumps([settings, data], sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return {"fingerprint": digest, "settings": settings, "data": data}


# ---------------------------------------------------------------------------- running


def run_training(run: TrainingRun) -> TrainResult | dict[str, Any]:
    """Train (or with ``run.test`` evaluate) as ``run`` describes; returns the result."""
    check_mode(run.mode, run.dataset)
    regions = open_region_reader(run.feats_dir)
    tokenizer = load_tokenizer(run)
    faces = open_face_reader(run)
    if run.test:
        return evaluate_run(run, tokenizer, regions, faces)

    model = load_model(run, regions.feature_dim)
    train = split_dataset(run, run.train_dir, run.train_index, tokenizer, regions, faces, fixed_epoch=None)
    valid = split_dataset(run, run.valid_dir, run.valid_index, tokenizer, regions, faces, fixed_epoch=0) if run.valid_index else None
    info = {**run_fingerprint(run), "code_version": code_version(), "pairs": {"train": len(train), "valid": len(valid) if valid else 0}}
    logger.info("training on %d pairs (validation %d), output %s", len(train), len(valid) if valid else 0, run.output)
    result = train_model(model, tokenizer, train, valid, run.output, run.train, resume=run.resume, run_info=info)
    if result.history and is_rank_zero():  # under torchrun only rank 0 writes files
        plot_loss_curves(Path(run.output) / "history.json", Path(run.output) / "loss_curve.png", title=f"NewsLXMERT on {run.dataset}")
    return result


def evaluate_run(run: TrainingRun, tokenizer, regions, faces) -> dict[str, Any]:
    """``--test``: MRR@100 and R@k of the model on the validation and test pools, through model.evaluation."""
    import torch

    from model import evaluation
    from model.modeling import NewsLxmertForPreTraining

    source = run.load_lxmert or str(Path(run.output) / BEST_DIR)
    if not Path(source).exists() and not run.load_lxmert:
        raise FileNotFoundError(f"--test found no trained model in {source}; train first or pass --loadLxmert")
    model = NewsLxmertForPreTraining.from_pretrained(source, use_faces=run.faces, visual_feat_dim=regions.feature_dim)
    device_name = run.train.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    model.to(device).eval()

    config = dataclasses.replace(run.dataset_config(), negative_ratio=0.0, masked_lm_ratio=0.0, masked_feats_ratio=0.0)
    pools = {}
    for split, articles_dir, index, size in (
        ("valid", run.valid_dir, run.valid_index, run.valid_pool_size),
        ("test", run.test_dir, run.test_index, run.test_pool_size),
    ):
        if not index:
            continue
        pools[split] = evaluation.build_pool(
            split,
            load_index(index, allow_foreign_pickle=run.trust_index),
            size,
            articles=ArticleStore(articles_dir, entity_loader=entity_loader(run)),
            regions=regions.get,
            faces=faces,
            tokenizer=tokenizer,
            data_config=config,
        )
    report = evaluation.evaluate_checkpoint(
        model, pools, Path(run.output) / "evaluation", device=device, model_fingerprint=_folder_fingerprint(source), title=f"NewsLXMERT on {run.dataset}"
    )
    print(report.table_markdown)
    return report.metrics


def is_rank_zero() -> bool:
    """Return whether this process is rank 0 under ``torchrun``, or runs without it."""
    return int(os.environ.get("RANK", "0")) == 0


def _folder_fingerprint(source: str) -> str:
    path = Path(source)
    weights = path / "model.safetensors" if path.is_dir() else path
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else source


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(dataset: str, prog: str, argv: Sequence[str] | None = None) -> int:
    parser = build_parser(prog, dataset)
    args = parser.parse_args(argv)
    configure_logging()
    if args.runSpec:
        run = TrainingRun.from_json(json.loads(Path(args.runSpec).read_text(encoding="utf-8")))
        if run.dataset != dataset:
            parser.error(f"--runSpec {args.runSpec} is a {run.dataset} run; start it with the {run.dataset} command")
    else:
        run = run_from_args(args, dataset, parser)
    result = run_training(run)
    # Under torchrun every rank returns the same result, and only rank 0 reports it.
    if isinstance(result, TrainResult) and is_rank_zero():
        logger.info(
            "finished %d epochs in %.0f s (%.1f samples/s); best validation loss %s at epoch %s; best model in %s",
            len(result.history), result.seconds, result.samples_per_second,
            "n/a" if result.best_valid_loss is None else f"{result.best_valid_loss:.4f}", result.best_epoch, result.best_dir,
        )
    return 0
