"""``<dataset>/evaluation``: MRR@100 and R@k of the trained model, image to text and text to image."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from model.evaluation import (
    DEFAULT_POOL_SIZES,
    DIRECTIONS,
    MRR_CUTOFF,
    ORIGINAL_POOL_SIZES,
    ScoringSettings,
    evaluate_checkpoint,
    load_evaluation_model,
    load_split_pool,
    random_baseline,
)
from model.fingerprint import evaluation_fingerprint
from pipelines.resources import PipelineSettings
from pipelines.executors import GPU_OP_TAGS

STAGE = "evaluation"
MODEL_ASSETS = {"nytimes800k": "pretrained_model", "newsimages": "finetuned_model"}
# Metadata keys under which a model asset may record its checkpoint folder, most specific first.
CHECKPOINT_METADATA_KEYS = ("best_checkpoint", "checkpoint", "path")
SHORT_DIRECTION = {"image_to_text": "i2t", "text_to_image": "t2i"}


class EvaluationConfig(Config):
    test_pool_size: int = Field(default=DEFAULT_POOL_SIZES["test"], description="pairs in the test pool (N x N pairs are scored)")
    valid_pool_size: int = Field(
        default=DEFAULT_POOL_SIZES["valid"], description="pairs in the valid pool; 0 skips the valid pool"
    )
    original_pools: bool = Field(
        default=False,
        description=(
            "score pools as the original NewsLXMERT code did: 1,024 test and 512 valid pairs, in index order, "
            "several images of one article allowed (overrides the pool sizes and distinct_articles)"
        ),
    )
    distinct_articles: bool = Field(
        default=True,
        description=(
            "take one pair per article, so that two images of one NYTimes800k article, which share the headline "
            "and snippet, are not each other's tied competitors"
        ),
    )
    checkpoint: Optional[str] = Field(
        default=None,
        description="checkpoint folder to evaluate; empty: the one the upstream model asset recorded in its metadata",
    )
    mode: Optional[int] = Field(default=None, description="text mode 1-7; empty: the training run's (run.json), else 7")
    max_seq_len: Optional[int] = Field(default=None, description="max tokens per text; empty: the training run's, else 100")
    method: str = Field(default="fast", description="'fast' (cross-modality layers per pair) or 'naive' (every layer per pair)")
    pair_batch_size: int = Field(default=128, description="pairs per cross-encoder forward pass")
    encode_batch_size: int = Field(default=64, description="items per text or image encoder forward pass")

    def pool_sizes(self) -> dict[str, int]:
        sizes = dict(ORIGINAL_POOL_SIZES) if self.original_pools else {"test": self.test_pool_size, "valid": self.valid_pool_size}
        return {split: size for split, size in sizes.items() if size > 0}


def _latest_metadata(context: AssetExecutionContext, key: AssetKey) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {name: getattr(value, "value", value) for name, value in event.asset_materialization.metadata.items()}


def resolve_checkpoint(context: AssetExecutionContext, dataset: str, configured: Optional[str]) -> Path:
    """Find the checkpoint folder: the configured one, else the upstream model asset's latest."""
    if configured:
        folder = Path(configured).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint folder {folder} (evaluation config 'checkpoint') has no config.json")
        return folder
    model_key = AssetKey([dataset, MODEL_ASSETS[dataset]])
    metadata = _latest_metadata(context, model_key)
    for name in CHECKPOINT_METADATA_KEYS:
        value = metadata.get(name)
        if value and (Path(str(value)) / "config.json").is_file():
            return Path(str(value))
    raise FileNotFoundError(
        f"no checkpoint recorded by {model_key.to_user_string()} (metadata {list(CHECKPOINT_METADATA_KEYS)}); "
        "materialize that asset first, or set the evaluation config 'checkpoint' to a checkpoint folder"
    )


def training_settings(checkpoint: Path) -> dict[str, Any]:
    """Return the training run's settings from ``run.json`` beside or above the checkpoint, if any."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        path = folder / "run.json"
        if path.is_file():
            settings = json.loads(path.read_text(encoding="utf-8"))
            return settings.get("settings", settings) if isinstance(settings, dict) else {}
    return {}


def checkpoint_fingerprint(checkpoint: Path, extra: dict[str, Any]) -> str:
    """Hash the checkpoint's config and weights and the evaluation's data settings."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = checkpoint / name
        if path.is_file():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    digest.update(json.dumps(extra, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:16]


def _setting(configured: Optional[int], trained: dict[str, Any], names: tuple[str, ...], default: int) -> int:
    if configured is not None:
        return int(configured)
    for name in names:
        if trained.get(name) is not None:
            return int(trained[name])
    return default


def materialize_evaluation(
    context: AssetExecutionContext, config: EvaluationConfig, settings: PipelineSettings, dataset: str
) -> MaterializeResult:
    from model.dataset import PairDatasetConfig

    started = time.perf_counter()
    dataset_root = settings.dataset_root(dataset)
    output_dir = dataset_root / STAGE
    device = settings.torch_device()

    checkpoint = resolve_checkpoint(context, dataset, config.checkpoint)
    model, tokenizer = load_evaluation_model(checkpoint, device)
    trained = training_settings(checkpoint)
    data_config = PairDatasetConfig(
        dataset=dataset,
        mode=_setting(config.mode, trained, ("mode",), 7),
        max_seq_len=_setting(config.max_seq_len, trained, ("max_seq_len", "maxSeqLen"), 100),
        use_faces=bool(model.config.use_faces),
        max_faces=int(model.config.max_faces),
    )
    distinct_articles = config.distinct_articles and not config.original_pools
    context.log.info(
        "evaluating %s on %s: mode %d, faces %s, pools %s", checkpoint, dataset, data_config.mode, data_config.use_faces, config.pool_sizes()
    )

    pools = {}
    for split, size in config.pool_sizes().items():
        pools[split] = load_split_pool(
            dataset_root, dataset, split, size, tokenizer=tokenizer, data_config=data_config, distinct_articles=distinct_articles
        )
        selection = pools[split].selection
        if not selection.complete:
            context.log.warning("%s pool: %d pairs requested, the index gives %d", split, size, len(pools[split]))
        for aid, iid, reason in selection.failures[:10]:
            context.log.warning("%s pool: pair (%s, %d) left out: %s", split, aid, iid, reason)

    scoring = ScoringSettings(
        method=config.method, pair_batch_size=config.pair_batch_size, encode_batch_size=config.encode_batch_size
    )
    fingerprint = checkpoint_fingerprint(
        checkpoint, {"mode": data_config.mode, "max_seq_len": data_config.max_seq_len, "faces": data_config.use_faces}
    )
    report = evaluate_checkpoint(
        model,
        pools,
        output_dir,
        settings=scoring,
        device=device,
        model_fingerprint=fingerprint,
        title=f"{dataset}: {checkpoint.name}",
        progress=_progress_logger(context),
    )
    context.log.info("%s evaluation:\n%s", dataset, report.table_markdown)

    metadata: dict[str, Any] = {
        "metrics": MetadataValue.md(report.table_markdown),
        "rank_histogram": MetadataValue.md(_inline_png(report.histogram_path)),
        "rank_histogram_path": MetadataValue.path(str(report.histogram_path)),
        "ranks": MetadataValue.path(str(report.ranks_path)),
        "metrics_json": MetadataValue.path(str(report.metrics_path)),
        "checkpoint": MetadataValue.path(str(checkpoint)),
        "checkpoint_fingerprint": fingerprint,
        "pools": MetadataValue.json({split: result.selection.summary() for split, result in report.results.items()}),
        "settings": MetadataValue.json(
            {
                "mode": data_config.mode,
                "max_seq_len": data_config.max_seq_len,
                "faces": data_config.use_faces,
                "distinct_articles": distinct_articles,
                "method": scoring.method,
                "pair_batch_size": scoring.pair_batch_size,
                "device": str(device),
            }
        ),
        "seconds": round(time.perf_counter() - started, 2),
    }
    for split, result in report.results.items():
        for direction in DIRECTIONS:
            metrics = result.directions[direction].metrics
            prefix = f"{split}_{SHORT_DIRECTION[direction]}"
            metadata[f"{prefix}_mrr@{MRR_CUTOFF}"] = round(metrics[f"mrr@{MRR_CUTOFF}"], 6)
            metadata[f"{prefix}_r@1"] = round(metrics["r@1"], 6)
            metadata[f"{prefix}_r@10"] = round(metrics["r@10"], 6)
            metadata[f"{prefix}_median_rank"] = metrics["median_rank"]
        metadata[f"{split}_random_mrr@{MRR_CUTOFF}"] = round(random_baseline(result.size)[f"mrr@{MRR_CUTOFF}"], 6)
        metadata[f"{split}_pool_size"] = result.size
        metadata[f"{split}_pairs_per_second"] = round(result.pairs_per_second, 1) if not result.reused_scores else "reused"
    fingerprints = {None: evaluation_fingerprint(output_dir)}
    metadata.update(fingerprint_metadata(fingerprints))
    return MaterializeResult(data_version=run_data_version(fingerprints), metadata=metadata)


def _progress_logger(context: AssetExecutionContext, every_s: float = 30.0):
    """Return a progress callback that logs scored pairs to the run at most every ``every_s`` seconds."""
    started: dict[str, float] = {}
    last_logged = [time.perf_counter()]

    def report(split: str, done: int, total: int) -> None:
        now = time.perf_counter()
        split_started = started.setdefault(split, now)
        if now - last_logged[0] >= every_s or done == total:
            last_logged[0] = now
            rate = done / max(now - split_started, 1e-9)
            context.log.info("%s pool: %d/%d pairs scored, %.0f pairs/s", split, done, total, rate)

    return report


def _inline_png(path: Path) -> str:
    """Return markdown that shows the PNG inline in the Dagster UI."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![rank histogram](data:image/png;base64,{encoded})"


_DESCRIPTION = (
    "Retrieval evaluation of the {model} checkpoint on pools of the test (1,000) and valid (500) index: every image "
    "against every text with the match probability. MRR@100, R@1/5/10/20/50/100 and median and mean rank, image to text "
    "and text to image, next to a random ranking's. Writes <data_root>/{dataset}/evaluation/: metrics.md, "
    "metrics.json, ranks.parquet (one row per query) and rank_histogram.png."
)


@asset(
    key=["nytimes800k", STAGE],
    group_name="nytimes800k",
    op_tags=GPU_OP_TAGS,
    code_version="1",
    deps=[AssetKey(["nytimes800k", "pretrained_model"]), AssetKey(["nytimes800k", "index"])],
    kinds={"pytorch", "parquet"},
    description=_DESCRIPTION.format(model="nytimes800k/pretrained_model", dataset="nytimes800k"),
)
def nytimes800k_evaluation(context: AssetExecutionContext, config: EvaluationConfig, settings: PipelineSettings) -> MaterializeResult:
    return materialize_evaluation(context, config, settings, "nytimes800k")


@asset(
    key=["newsimages", STAGE],
    group_name="newsimages",
    op_tags=GPU_OP_TAGS,
    code_version="1",
    deps=[AssetKey(["newsimages", "finetuned_model"]), AssetKey(["newsimages", "index"])],
    kinds={"pytorch", "parquet"},
    description=_DESCRIPTION.format(model="newsimages/finetuned_model", dataset="newsimages"),
)
def newsimages_evaluation(context: AssetExecutionContext, config: EvaluationConfig, settings: PipelineSettings) -> MaterializeResult:
    return materialize_evaluation(context, config, settings, "newsimages")
