"""Dagster asset definitions, one module per pipeline stage.

Each asset is a thin wrapper over plain functions in ``model``; the code location in
``pipelines.definitions`` collects every asset and asset check from this package.
"""

import warnings

from dagster import BetaWarning, PreviewWarning

# Dagster 1.13 marks two features these assets rely on: ``backfill_policy`` (beta) lets a
# backfill run many partitions in one run, and ``partitions_def`` on an asset check
# (preview) checks each partition. Its warnings repeat once per asset on every import, in
# the demo, in ``dagster dev`` and in the CLI, and a user cannot act on them. Only these
# two messages are silenced.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of function `asset`", category=BetaWarning)
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)
