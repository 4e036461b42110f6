"""``python -m pipelines.demo``, the README's main command, on a small demo corpus."""

from __future__ import annotations

import pytest

from pipelines.demo import main


@pytest.mark.slow
def test_demo_command_prints_both_evaluations(tmp_path, monkeypatch, capsys, link_tiny_facenet):
    data_root = tmp_path / "data"
    # Set through monkeypatch so that what main() sets is undone after the test.
    monkeypatch.setenv("NEWSLXMERT_DATA_ROOT", str(data_root))
    monkeypatch.setenv("NEWSLXMERT_PROFILE", "tiny")
    monkeypatch.setenv("NEWSLXMERT_DEVICE", "cpu")
    link_tiny_facenet(data_root)

    status = main(["--data-root", str(data_root), "--articles", "40", "--days", "2", "--epochs", "1"])

    printed = capsys.readouterr().out
    assert status == 0
    for key in ("nytimes800k/evaluation", "newsimages/evaluation"):
        assert f"\n{key}\n| pool | N | direction | MRR@100 |" in printed
        assert (data_root / key / "ranks.parquet").is_file()
    assert "| test |" in printed
    assert "random ranking" in printed
    assert "demo finished in" in printed
    assert str(data_root) in printed
