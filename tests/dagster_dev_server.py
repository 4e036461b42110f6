"""Helpers for tests that run ``dagster dev`` and look at it in headless Chromium.

Both programs start in their own process group, and ``stop()`` ends exactly that group
by its process id: ``dagster dev`` runs the webserver, the daemon and code servers as
children, and Chromium runs renderer and GPU processes.

Chromium is driven over the DevTools protocol on 127.0.0.1 with the ``websockets``
client that dagster-webserver already installs, so no browser driver is needed.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Instance settings for a test: no first-visit dialog over the UI, no usage reports.
TEST_INSTANCE_YAML = "nux:\n  enabled: false\ntelemetry:\n  enabled: false\n"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _restore_sigint() -> None:
    # A process started in the background of a shell inherits SIGINT as ignored, and
    # dagster dev then shuts down on no signal but SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process_group(process: subprocess.Popen, first_signal: int, grace_seconds: float) -> None:
    """End the process group led by ``process``: ``first_signal``, then SIGKILL after the grace time.

    Returns when no process of the group is left.
    """
    group = process.pid
    for sig, wait in ((first_signal, grace_seconds), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    process.wait(timeout=10)


class DagsterDev:
    """``dagster dev`` on 127.0.0.1 with its own DAGSTER_HOME, TMPDIR and data root."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.home = self.root / "dagster_home"
        self.tmp = self.root / "tmp"
        self.data_root = self.root / "data"
        self.log_path = self.root / "dagster_dev.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NEWSLXMERT_MONGO_URI", None)
        env.update(
            DAGSTER_HOME=str(self.home),
            TMPDIR=str(self.tmp),
            NEWSLXMERT_DATA_ROOT=str(self.data_root),
            OMP_NUM_THREADS="1",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> "DagsterDev":
        for folder in (self.home, self.tmp, self.data_root):
            folder.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(TEST_INSTANCE_YAML)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(DAGSTER), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=REPO,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_restore_sigint,
            )
        return self

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except FileNotFoundError:
            return "<no log>"

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:2000]
            raise RuntimeError(f"GraphQL request to {self.url} failed with HTTP {error.code}: {detail}") from None
        if result.get("errors"):
            raise RuntimeError(f"GraphQL errors from {self.url}: {result['errors']}")
        return result["data"]

    def wait_until_serving(self, expected_asset_keys: set[tuple[str, ...]], timeout: float = 240) -> None:
        """Wait until the webserver responds and the code location lists every expected asset."""
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                data = self.graphql("{ assetNodes { assetKey { path } } }", timeout=20)
                listed = {tuple(node["assetKey"]["path"]) for node in data["assetNodes"]}
                if expected_asset_keys <= listed:
                    return
                last_error = f"code location lists {len(listed)} of {len(expected_asset_keys)} assets"
            except (urllib.error.URLError, ConnectionError, TimeoutError, RuntimeError) as error:
                last_error = str(error)
            time.sleep(1.0)
        raise TimeoutError(f"dagster dev at {self.url} not ready after {timeout} s ({last_error}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, signal.SIGINT, grace_seconds=30.0)
            self.process = None

    def __enter__(self) -> "DagsterDev":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class HeadlessChromium:
    """Headless Chromium with a new, empty profile, driven over the DevTools protocol."""

    def __init__(self, profile_dir: Path, width: int = 1920, height: int = 1200):
        self.profile_dir = Path(profile_dir)
        self.width = width
        self.height = height
        self.process: subprocess.Popen | None = None
        self._socket = None
        self._ids = itertools.count(1)

    def start(self) -> "HeadlessChromium":
        from websockets.sync.client import connect

        executable = chromium_path()
        if executable is None:
            raise FileNotFoundError("chromium not found; install Debian's package: apt-get install -y chromium")
        self.profile_dir.mkdir(parents=True, exist_ok=False)
        self.process = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile_dir}",
                f"--window-size={self.width},{self.height}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"chromium did not open its DevTools port (exit code {self.process.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.loads(response.read())
        page = next(target for target in targets if target["type"] == "page")
        self._socket = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=10)
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)
        return self

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def stop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self.process is not None:
            stop_process_group(self.process, signal.SIGTERM, grace_seconds=10.0)
            self.process = None

    def __enter__(self) -> "HeadlessChromium":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
