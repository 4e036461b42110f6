"""Asset jobs: the article-level stages of each dataset, the model-level stages, and one
job per dataset that runs its whole graph for one partition.

The jobs are built from the asset definitions that ``pipelines.definitions`` loaded, so
a stage that lands later joins the right job without an edit here: an asset belongs to
a dataset's article-level job when its key starts with the dataset and it uses that
dataset's partitions, and to the model-level job when it is unpartitioned.

Dagster runs one partitions definition per run, so no single job can hold both the
NYTimes800k daily partitions and the NewsImages batch partitions. The per-dataset
pipeline jobs are the closest thing to an all-assets job: each holds every asset of one
dataset, and its unpartitioned assets (index, model, evaluation) read all article
partitions that exist on disk when they run.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from dagster import AssetKey, AssetsDefinition, AssetSelection, define_asset_job

from assets.partitions import newsimages_batch_partitions, nytimes_daily_partitions

DATASET_PARTITIONS = {
    "nytimes800k": nytimes_daily_partitions,
    "newsimages": newsimages_batch_partitions,
}

NYTIMES_ARTICLE_STAGES_JOB = "nytimes800k_article_stages_job"
NEWSIMAGES_ARTICLE_STAGES_JOB = "newsimages_article_stages_job"
MODEL_STAGES_JOB = "model_stages_job"
NYTIMES_PIPELINE_JOB = "nytimes800k_pipeline_job"
NEWSIMAGES_PIPELINE_JOB = "newsimages_pipeline_job"

ARTICLE_STAGES_JOB_BY_DATASET = {
    "nytimes800k": NYTIMES_ARTICLE_STAGES_JOB,
    "newsimages": NEWSIMAGES_ARTICLE_STAGES_JOB,
}
PIPELINE_JOB_BY_DATASET = {
    "nytimes800k": NYTIMES_PIPELINE_JOB,
    "newsimages": NEWSIMAGES_PIPELINE_JOB,
}


def _specs(assets_defs: Iterable[AssetsDefinition]):
    for assets_def in assets_defs:
        if isinstance(assets_def, AssetsDefinition):
            yield from assets_def.specs


def article_stage_keys(assets_defs: Iterable[AssetsDefinition], dataset: str) -> list[AssetKey]:
    """Keys of the assets of ``dataset`` that use that dataset's article partitions."""
    partitions_def = DATASET_PARTITIONS[dataset]
    return sorted(
        spec.key
        for spec in _specs(assets_defs)
        if spec.key.path[0] == dataset and spec.partitions_def == partitions_def
    )


def model_stage_keys(assets_defs: Iterable[AssetsDefinition]) -> list[AssetKey]:
    """Keys of the unpartitioned assets: split-level indexes, models and evaluations."""
    return sorted(spec.key for spec in _specs(assets_defs) if spec.partitions_def is None)


def dataset_keys(assets_defs: Iterable[AssetsDefinition], dataset: str) -> list[AssetKey]:
    """Every asset of ``dataset``: its article-level stages plus its unpartitioned ones."""
    partitions_def = DATASET_PARTITIONS[dataset]
    return sorted(
        spec.key
        for spec in _specs(assets_defs)
        if spec.key.path[0] == dataset and spec.partitions_def in (None, partitions_def)
    )


def _job(name: str, keys: Sequence[AssetKey], description: str, partitions_def=None):
    return define_asset_job(
        name=name,
        selection=AssetSelection.assets(*keys),
        partitions_def=partitions_def,
        description=description,
    )


def build_jobs(assets_defs: Sequence[AssetsDefinition]) -> dict:
    """Build every job of the code location, by name, from the loaded asset definitions.

    A job whose selection would be empty (its stages have not been written yet) is left
    out rather than failing the whole code location.
    """
    jobs = {}
    for dataset, job_name in ARTICLE_STAGES_JOB_BY_DATASET.items():
        keys = article_stage_keys(assets_defs, dataset)
        if keys:
            jobs[job_name] = _job(
                job_name,
                keys,
                f"The article-level stages of {dataset} for the selected partitions: "
                + ", ".join(key.to_user_string() for key in keys),
                partitions_def=DATASET_PARTITIONS[dataset],
            )

    keys = model_stage_keys(assets_defs)
    if keys:
        jobs[MODEL_STAGES_JOB] = _job(
            MODEL_STAGES_JOB,
            keys,
            "The split- and model-level stages, which read every article partition on disk: "
            + ", ".join(key.to_user_string() for key in keys),
        )

    for dataset, job_name in PIPELINE_JOB_BY_DATASET.items():
        keys = dataset_keys(assets_defs, dataset)
        partitioned = set(article_stage_keys(assets_defs, dataset))
        if partitioned:
            jobs[job_name] = _job(
                job_name,
                keys,
                f"The whole {dataset} graph: its article-level stages for the selected partition, "
                "then its index, model and evaluation over every partition on disk.",
                partitions_def=DATASET_PARTITIONS[dataset],
            )
    return jobs
