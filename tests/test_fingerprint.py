"""Content fingerprints of stage outputs."""

from __future__ import annotations

import pytest

from model.fingerprint import fingerprint_files, fingerprint_manifests, fingerprint_value
from model.manifest import write_manifest
from model.storage import UnsafePathError


def test_value_fingerprint_ignores_key_order():
    assert fingerprint_value({"a": 1, "b": [1, 2]}) == fingerprint_value({"b": [1, 2], "a": 1})
    assert fingerprint_value({"a": 1}) != fingerprint_value({"a": 2})


def test_file_fingerprint_follows_content_not_listing_order(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.json").write_text("one")
    (tmp_path / "x" / "b.json").write_text("two")

    first = fingerprint_files(tmp_path, ["x/b.json", "x/a.json"])
    same = fingerprint_files(tmp_path, ["x/a.json", "x/b.json"])
    (tmp_path / "x" / "b.json").write_text("three")
    changed = fingerprint_files(tmp_path, ["x/a.json", "x/b.json"])

    assert first == same
    assert first != changed
    assert len(first) == 32


def test_file_fingerprint_rejects_missing_and_outside_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fingerprint_files(tmp_path, ["nope.json"])
    with pytest.raises(UnsafePathError):
        fingerprint_files(tmp_path / "inner", ["../../etc/passwd"])


def test_manifest_fingerprint_changes_with_one_partition(tmp_path):
    write_manifest(tmp_path, "images", "2024-01-01", {"images": ["h1"], "failed": []})
    write_manifest(tmp_path, "images", "2024-01-02", {"images": ["h2"], "failed": []})
    before = fingerprint_manifests(tmp_path, "images", ["2024-01-02", "2024-01-01"])

    write_manifest(tmp_path, "images", "2024-01-02", {"images": ["h2", "h3"], "failed": []})

    assert fingerprint_manifests(tmp_path, "images", ["2024-01-01", "2024-01-02"]) != before
    assert fingerprint_manifests(tmp_path, "images", ["2024-01-01"]) == fingerprint_manifests(tmp_path, "images", ["2024-01-01"])
    with pytest.raises(FileNotFoundError, match="2024-01-03"):
        fingerprint_manifests(tmp_path, "images", ["2024-01-03"])
