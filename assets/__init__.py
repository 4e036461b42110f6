"""Dagster asset definitions, one module per pipeline stage.

Each asset is a thin wrapper over plain functions in ``model``; the code location in
``pipelines.definitions`` collects every asset and asset check from this package.
"""
