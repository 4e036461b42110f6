"""The ``dagster dev`` UI in headless Chromium: the asset graph shows every asset."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

import pytest

from dagster_dev_server import HeadlessChromium, chromium_path
from pipelines.definitions import all_assets

pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="chromium is not installed; install Debian's package: apt-get install -y chromium"
)

LOCATION = "newslxmert"  # location_name in workspace.yaml
ASSET_NAMES_SCRIPT = """
Array.from(document.querySelectorAll('[class*="AssetNode_assetName"] [data-tooltip]'))
     .map(element => element.getAttribute('data-tooltip'))
"""


def _defined_specs():
    return [spec for assets_def in all_assets for spec in assets_def.specs]


def _expected_names_by_group() -> dict[str, list[str]]:
    names = defaultdict(list)
    for spec in _defined_specs():
        names[spec.group_name or "default"].append(spec.key.path[-1])
    return {group: sorted(found) for group, found in sorted(names.items())}


def _wait_for_asset_names(browser: HeadlessChromium, expected: list[str], timeout: float = 90) -> list[str]:
    """The asset names drawn in the graph, once all of ``expected`` are drawn or time runs out."""
    deadline = time.monotonic() + timeout
    shown: list[str] = []
    while time.monotonic() < deadline:
        shown = browser.evaluate(ASSET_NAMES_SCRIPT) or []
        if not Counter(expected) - Counter(shown):
            return shown
        time.sleep(1.0)
    return shown


def _wait_for_loaded_nodes(browser: HeadlessChromium, timeout: float = 30) -> None:
    """Wait until no asset node still shows its "Loading..." row, so the screenshot is complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and "Loading..." in (browser.evaluate("document.body.innerText") or ""):
        time.sleep(0.5)


def test_asset_graph_lists_every_asset(dagster_dev, tmp_path):
    expected = _expected_names_by_group()
    dagster_dev.wait_until_serving({tuple(spec.key.path) for spec in _defined_specs()})

    missing = {}
    screenshots = []
    with HeadlessChromium(tmp_path / "chromium_profile") as browser:
        chromium_group = browser.process.pid
        for group, names in expected.items():
            browser.navigate(f"{dagster_dev.url}/locations/{LOCATION}/asset-groups/{group}")
            shown = _wait_for_asset_names(browser, names)
            _wait_for_loaded_nodes(browser)
            screenshots.append(browser.screenshot(tmp_path / f"asset_graph_{group}.png"))
            missing[group] = sorted((Counter(names) - Counter(shown)).elements())

        browser.navigate(f"{dagster_dev.url}/asset-groups")
        time.sleep(3)
        _wait_for_loaded_nodes(browser)
        screenshots.append(browser.screenshot(tmp_path / "asset_graph_global.png"))

    for path in screenshots:
        print(f"screenshot: {path}")
    assert missing == {group: [] for group in expected}, f"assets missing from the UI graph; screenshots in {tmp_path}"
    for path in screenshots:
        assert path.stat().st_size > 10_000, f"{path} looks blank"
    with pytest.raises(ProcessLookupError):
        os.killpg(chromium_group, 0)
