"""NewsImages ingestion: ``newsimages/raw_articles``, ``newsimages/articles``, ``newsimages/translated_articles``.

One partition per source batch (a TSV/CSV file, or the 2021 test batch's pair of files).
Partitions are dynamic: :func:`register_newsimages_batches` (or the NewsImages sensor in
``pipelines.sensors``) adds a key for every batch found in the source folder.
"""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import os
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetKey,
    Config,
    DagsterInstance,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from assets.partitions import BACKFILL_POLICY, newsimages_batch_partitions
from model.documents import iter_articles
from model.export import DEFAULT_SPLIT_ALIASES
from model.fingerprint import article_files_fingerprint, collection_fingerprint
from model.manifest import read_manifest, write_manifest
from model.newsimages import DEFAULT_LANGUAGES, SplitPolicy, discover_batches, load_batch
from model.translate import (
    DEFAULT_MODEL,
    TinyMarianConfig,
    TranslationReport,
    TranslationSettings,
    MarianTranslator,
    count_needing_model,
    ensure_tiny_marian,
    translate_articles,
)
from pipelines.resources import MongoResource, PipelineSettings
from pipelines.executors import GPU_OP_TAGS
from assets.article_export import export_partitions

SOURCE_ENV = "NEWSLXMERT_NEWSIMAGES_SOURCE"
DATASET = "newsimages"
RAW_ARTICLES = AssetKey([DATASET, "raw_articles"])
ARTICLES = AssetKey([DATASET, "articles"])
TRANSLATED_ARTICLES = AssetKey([DATASET, "translated_articles"])


def source_folder(configured: str) -> Path:
    """Return the source folder from the Config field, else from NEWSLXMERT_NEWSIMAGES_SOURCE."""
    folder = configured or os.environ.get(SOURCE_ENV, "")
    if not folder:
        raise ValueError(
            f"no NewsImages source folder: set the raw_articles Config field `source_dir` or the environment variable {SOURCE_ENV}"
        )
    return Path(folder).expanduser().resolve()


def register_newsimages_batches(instance: DagsterInstance, source_dir: str | Path) -> list[str]:
    """Add a dynamic partition for every batch under ``source_dir`` not registered yet; return the new keys."""
    found = discover_batches(source_dir)
    known = set(instance.get_dynamic_partitions(newsimages_batch_partitions.name))
    new = [key for key in found if key not in known]
    if new:
        instance.add_dynamic_partitions(newsimages_batch_partitions.name, new)
    return new


# --------------------------------------------------------------------------- raw_articles


class RawArticlesConfig(Config):
    source_dir: str = Field(
        default="",
        description=f"folder searched recursively for NewsImages TSV/CSV files; empty: the environment variable {SOURCE_ENV}",
    )
    encoding: str = Field(default="auto", description="'auto' (byte-order mark, else UTF-8, else Latin-1/Windows-1252) or a Python codec name")
    file_encodings: dict[str, str] = Field(
        default_factory=dict, description="encoding per file name (or path relative to source_dir), overriding `encoding`"
    )
    languages: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_LANGUAGES),
        description="language of title and text per edition or batch key; 'en' articles are not translated",
    )
    test_size: int = Field(default=1000, description="test articles per edition in total")
    valid_size: int = Field(default=500, description="valid articles per edition in total")
    split_seed: int = Field(default=42, description="seed of the order in which new articles fill the test and valid quotas")
    max_heldout_fraction: float = Field(default=0.3, description="largest share of one batch's new articles that goes to test and valid")


@asset(
    key=RAW_ARTICLES,
    group_name=DATASET,
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    kinds={"mongodb", "csv"},
    description=(
        "NewsImages articles (2021/2023 TSV, 2025 CSV) upserted into MongoDB newsimages.articles, one source batch per "
        "partition, in a normalized schema with the source's own fields under `source`. New articles get a seeded split "
        "that never changes afterwards."
    ),
)
def newsimages_raw_articles(
    context: AssetExecutionContext,
    config: RawArticlesConfig,
    newsimages_mongo: MongoResource,
):
    folder = source_folder(config.source_dir)
    policy = SplitPolicy(
        test_size=config.test_size,
        valid_size=config.valid_size,
        seed=config.split_seed,
        max_heldout_fraction=config.max_heldout_fraction,
    )
    reports = []
    with newsimages_mongo.open_collection() as collection:
        for partition in context.partition_keys:
            context.log.info("loading NewsImages batch %s from %s into %s", partition, folder, newsimages_mongo.describe())
            report = load_batch(
                collection,
                folder,
                partition,
                policy=policy,
                encoding=config.encoding,
                file_encodings=config.file_encodings,
                languages=config.languages,
            )
            for failure in report.failures[:10]:
                context.log.warning("row %s not loaded: %s", failure.where, failure.reason)
            if report.in_other_batch:
                context.log.warning("%d articles were already loaded from another batch, e.g. %s", len(report.in_other_batch), report.in_other_batch[0])
            reports.append(report.summary())
        # The batch's documents as stored, split and batch fields included.
        fingerprints = {partition: collection_fingerprint(collection, {"batch": partition}) for partition in context.partition_keys}

    totals = {name: sum(r[name] for r in reports) for name in ("rows", "documents", "inserted", "updated", "unchanged", "failed_rows", "in_other_batch", "unmatched_images")}
    per_split = {split: sum(r["per_split"][split] for r in reports) for split in ("train", "valid", "test")}
    seconds = sum(r["seconds"] for r in reports)
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            **totals,
            "per_split": MetadataValue.json(per_split),
            "inserted_per_split": MetadataValue.json(
                {split: sum(r["inserted_per_split"][split] for r in reports) for split in ("train", "valid", "test")}
            ),
            "failed_examples": MetadataValue.json([example for r in reports for example in r["failed_examples"]][:10]),
            "editions": MetadataValue.json(sorted({r["edition"] for r in reports})),
            "encodings": MetadataValue.json({name: enc for r in reports for name, enc in r["encodings"].items()}),
            "seconds": round(seconds, 3),
            "rows_per_second": round(totals["rows"] / seconds, 1) if seconds > 0 else 0.0,
            "source_dir": MetadataValue.path(str(folder)),
            "collection": newsimages_mongo.describe(),
            "split_policy": MetadataValue.json(
                {"test_size": policy.test_size, "valid_size": policy.valid_size, "seed": policy.seed, "max_heldout_fraction": policy.max_heldout_fraction}
            ),
            "partitions": len(reports),
            **fingerprint_metadata(fingerprints),
        },
    )


# --------------------------------------------------------------------------- articles


class NewsImagesExportConfig(Config):
    page_size: int = Field(default=500, description="documents fetched per query; each page is a fresh short query")


@asset(
    key=ARTICLES,
    group_name=DATASET,
    deps=[RAW_ARTICLES],
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    kinds={"mongodb", "json"},
    description=(
        "NewsImages articles exported from MongoDB to <data_root>/newsimages/articles/<split>/<aid>.json with every "
        "field, one source batch per partition (the same export as nytimes800k/articles)."
    ),
)
def newsimages_articles(
    context: AssetExecutionContext,
    config: NewsImagesExportConfig,
    settings: PipelineSettings,
    newsimages_mongo: MongoResource,
):
    return export_partitions(
        context,
        newsimages_mongo,
        settings.dataset_root(DATASET),
        context.partition_keys,
        partition_query=lambda partition: {"batch": partition},
        fields=None,
        split_aliases=DEFAULT_SPLIT_ALIASES,
        page_size=config.page_size,
    )


# --------------------------------------------------------------------------- translated_articles


class TranslationConfig(Config):
    model: str = Field(
        default=DEFAULT_MODEL,
        description="MarianMT hub id or local save_pretrained folder (base profile); the tiny profile uses <data_root>/models/tiny/marian",
    )
    download: bool = Field(default=False, description="let transformers download a hub model that is not in the local cache")
    num_beams: int = Field(default=4, description="beam size")
    batch_size: int = Field(default=16, description="sentence pieces per generate() call, batched by token length")
    group_size: int = Field(default=64, description="documents translated between writes; a killed run keeps every finished group")
    max_chunk_tokens: int = Field(default=0, description="largest input piece in tokens; 0: the model's input limit")
    length_ratio: float = Field(default=1.5, description="max_new_tokens = ceil(length_ratio * input tokens + length_margin)")
    length_margin: int = Field(default=10, description="added to the bound above, in tokens")
    device: str = Field(default="", description="'cpu', 'cuda', 'cuda:N' or 'auto'; empty: the settings resource's device")
    source_language: str = Field(default="de", description="spaCy language code used to split sentences")
    tiny_parallel_pairs: str = Field(
        default="",
        description="tiny profile: JSON lines of {'de','en'} pairs to train the tiny model on; empty: <data_root>/demo/parallel_de_en.jsonl",
    )
    tiny_train_steps: int = Field(default=TinyMarianConfig.train_steps, description="tiny profile: training steps of the tiny model")
    tiny_max_train_seconds: float = Field(
        default=TinyMarianConfig.max_train_seconds, description="tiny profile: wall-time bound on that training, in seconds"
    )
    tiny_seed: int = Field(default=0, description="tiny profile: seed of the tokenizer, initialization and training")


def _load_translator(context: AssetExecutionContext, config: TranslationConfig, settings: PipelineSettings, articles_root: Path, items) -> tuple[MarianTranslator, dict]:
    """Load the translator of the active profile; return it with metadata describing the model."""
    translation_settings = TranslationSettings(
        num_beams=config.num_beams,
        batch_size=config.batch_size,
        max_chunk_tokens=config.max_chunk_tokens,
        length_ratio=config.length_ratio,
        length_margin=config.length_margin,
        device=config.device or settings.torch_device(),
        source_language=config.source_language,
    )
    if settings.profile != "tiny":
        translator = MarianTranslator(config.model, translation_settings, setting="translated_articles config `model`", download=config.download)
        return translator, {"model": config.model}

    pairs_path = Path(config.tiny_parallel_pairs) if config.tiny_parallel_pairs else Path(settings.data_root) / "demo" / "parallel_de_en.jsonl"
    tiny_config = TinyMarianConfig(train_steps=config.tiny_train_steps, max_train_seconds=config.tiny_max_train_seconds, seed=config.tiny_seed)
    corpus = (document.get(field) or "" for _, document in iter_articles(articles_root, items) for field in ("title", "text"))
    folder, build = ensure_tiny_marian(Path(settings.data_root) / "models" / "tiny" / "marian", pairs_path, corpus, tiny_config)
    if not build.get("pairs"):
        context.log.warning(
            "the tiny MarianMT in %s was not trained on parallel pairs (none at %s): its English is random text, for pipeline tests only",
            folder,
            pairs_path,
        )
    translator = MarianTranslator(str(folder), translation_settings, setting="tiny profile model folder")
    quality = build.get("heldout") or {}
    return translator, {
        "model": str(folder),
        "tiny_trained_pairs": build.get("train_pairs", 0),
        "tiny_training": MetadataValue.json(build.get("training") or {}),
        "tiny_heldout_quality": MetadataValue.json(quality),
    }


@asset(
    key=TRANSLATED_ARTICLES,
    group_name=DATASET,
    deps=[ARTICLES],
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    op_tags=GPU_OP_TAGS,
    code_version="1",
    kinds={"pytorch", "json"},
    description=(
        "NewsImages articles with English `title_en` and `text_en` (MarianMT, German to English), written to "
        "<data_root>/newsimages/translated_articles/<split>/<aid>.json. Sentences are translated piece by piece so nothing "
        "is cut; text without letters and articles that are already English pass through; unchanged documents are not "
        "translated again."
    ),
)
def newsimages_translated_articles(
    context: AssetExecutionContext,
    config: TranslationConfig,
    settings: PipelineSettings,
):
    dataset_root = settings.dataset_root(DATASET)
    articles_root = dataset_root / "articles"
    out_root = dataset_root / "translated_articles"
    manifests = {partition: read_manifest(dataset_root, "articles", partition) for partition in context.partition_keys}
    all_items = [tuple(item) for manifest in manifests.values() for item in manifest["articles"]]

    # An all-English partition (the 2025 edition) needs no model, so none is loaded for it.
    translator, model_metadata = None, {"model": "none needed: every document is English or has no text"}
    if count_needing_model(all_items, articles_root):
        translator, model_metadata = _load_translator(context, config, settings, articles_root, all_items)
        context.log.info("translating with %s on %s (fingerprint %s)", translator.name, translator.device, translator.fingerprint)

    reports: list[TranslationReport] = []
    for partition, manifest in manifests.items():
        items = [tuple(item) for item in manifest["articles"]]
        report = translate_articles(
            items,
            articles_root,
            out_root,
            translator,
            group_size=config.group_size,
            progress=lambda message, partition=partition: context.log.info("batch %s: %s", partition, message),
        )
        write_manifest(dataset_root, "translated_articles", partition, {"articles": [list(item) for item in sorted(report.items)]})
        for failure in report.failures[:10]:
            context.log.warning("article %s not translated: %s", failure.aid, failure.reason)
        if report.stats.empty_chunk_outputs:
            context.log.warning("%d sentence pieces came back empty from the model", report.stats.empty_chunk_outputs)
        reports.append(report)

    summaries = [report.summary() for report in reports]
    counted = (
        "documents", "translated_documents", "reused", "passed_through_english", "fields_without_text",
        "characters_translated", "texts_translated", "chunks", "empty_chunk_outputs", "length_capped_chunks",
        "source_tokens", "generated_tokens", "written", "unchanged_files", "failed",
    )
    totals = {name: sum(summary[name] for summary in summaries) for name in counted}
    generate_seconds = sum(report.stats.generate_seconds for report in reports)
    fingerprints = {partition: article_files_fingerprint(dataset_root, "translated_articles", partition) for partition in manifests}
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            **totals,
            "generated_tokens_per_second": round(totals["generated_tokens"] / generate_seconds, 1) if generate_seconds > 0 else 0.0,
            "source_tokens_per_second": round(totals["source_tokens"] / generate_seconds, 1) if generate_seconds > 0 else 0.0,
            "generate_seconds": round(generate_seconds, 3),
            "seconds": round(sum(report.seconds for report in reports), 3),
            "per_split": MetadataValue.json(
                {split: sum(summary["per_split"][split] for summary in summaries) for split in ("train", "valid", "test")}
            ),
            "failed_examples": MetadataValue.json([example for summary in summaries for example in summary["failed_examples"]][:10]),
            **model_metadata,
            "model_fingerprint": translator.fingerprint if translator else "",
            "device": translator.device if translator else "",
            "num_beams": config.num_beams,
            "batch_size": config.batch_size,
            "input_limit_tokens": translator.input_limit if translator else 0,
            "path": MetadataValue.path(str(out_root)),
            "partitions": len(reports),
            **fingerprint_metadata(fingerprints),
        },
    )
