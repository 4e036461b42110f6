"""Partitions of the article-level assets.

They live here rather than in ``pipelines`` because the asset decorators need them when
the asset modules are imported, and ``pipelines`` imports ``assets``.
"""

from __future__ import annotations

import os

from dagster import BackfillPolicy, DailyPartitionsDefinition, DynamicPartitionsDefinition

# NYTimes800k articles were published from 2003 to 2018; the demo corpus starts in 2024.
NYTIMES_START_DATE = os.environ.get("NEWSLXMERT_NYTIMES_START_DATE", "2003-01-01")

nytimes_daily_partitions = DailyPartitionsDefinition(start_date=NYTIMES_START_DATE, timezone="UTC")

# One partition per NewsImages source file (batch), added when the file is loaded.
newsimages_batch_partitions = DynamicPartitionsDefinition(name="newsimages_batches")

# A backfill of the whole history runs in runs of up to this many partitions each, not one
# run per day. Partitioned assets therefore process every key in `context.partition_keys`.
MAX_PARTITIONS_PER_RUN = int(os.environ.get("NEWSLXMERT_MAX_PARTITIONS_PER_RUN", "31"))
BACKFILL_POLICY = BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN)
