"""The data version and fingerprint metadata that every asset returns (see ``model.fingerprint``)."""

from typing import Any, Mapping, Optional

from dagster import DataVersion, MetadataValue

from model.fingerprint import combine_partition_fingerprints
from model.manifest import UNPARTITIONED


def run_data_version(fingerprints: Mapping[Optional[str], str]) -> DataVersion:
    """Return the data version of a run from its partitions' fingerprints (None: unpartitioned)."""
    return DataVersion(combine_partition_fingerprints(fingerprints))


def fingerprint_metadata(fingerprints: Mapping[Optional[str], str]) -> dict[str, Any]:
    """Return the ``data_fingerprint`` metadata entry, equal to the data version.

    A run of several partitions also lists each partition's fingerprint, because Dagster
    records the run's one data version on every partition.
    """
    metadata: dict[str, Any] = {"data_fingerprint": combine_partition_fingerprints(fingerprints)}
    if len(fingerprints) > 1:
        by_name = {partition or UNPARTITIONED: value for partition, value in fingerprints.items()}
        metadata["partition_fingerprints"] = MetadataValue.json(dict(sorted(by_name.items())))
    return metadata
