"""The code location that ``dagster dev`` and ``dagster asset materialize`` load."""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_package_module, load_assets_from_package_module

import assets
from pipelines.resources import MongoResource, PipelineSettings

defs = Definitions(
    assets=load_assets_from_package_module(assets),
    asset_checks=load_asset_checks_from_package_module(assets),
    resources={
        "settings": PipelineSettings(),
        "nytimes_mongo": MongoResource(database="nytimes", collection="articles"),
        "newsimages_mongo": MongoResource(database="newsimages", collection="articles"),
    },
)
