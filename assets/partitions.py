"""Partitions of the article-level assets.

They live here rather than in ``pipelines`` because the asset decorators need them when
the asset modules are imported, and ``pipelines`` imports ``assets``.
"""

from __future__ import annotations

import os

from dagster import DailyPartitionsDefinition, DynamicPartitionsDefinition

# NYTimes800k articles were published from 2003 to 2018; the demo corpus starts in 2024.
NYTIMES_START_DATE = os.environ.get("NEWSLXMERT_NYTIMES_START_DATE", "2003-01-01")

nytimes_daily_partitions = DailyPartitionsDefinition(start_date=NYTIMES_START_DATE, timezone="UTC")

# One partition per NewsImages source file (batch), added when the file is loaded.
newsimages_batch_partitions = DynamicPartitionsDefinition(name="newsimages_batches")
