"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): load a page, collect
its console errors, evaluate expressions, take a full-page screenshot. Standard library only.

Chromium is the Debian package `chromium`; scripts/ensure-tool.sh installs it for `make test`. Where it is
missing the tests that need it fail (never skip): a report nobody opened in a browser is not checked.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str:
    for name in CANDIDATES:
        if found := shutil.which(name):
            return found
    pytest.fail("Chromium is not installed: the report.html tests open the page in it. Install the Debian package "
                "(apt-get install -y chromium), or run `make services`, which `make test` runs.")


class Browser:
    """One headless Chromium with one page. Use as a context manager."""

    def __init__(self, width: int = 1100, height: int = 900) -> None:
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="qs-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:  # the protocol's fixed descriptors: commands on 3, answers on 4
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)  # neither may be 3 or 4 any more
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        args = [chromium_path(), "--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]
        if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox on (CI containers run as root)
            args.append("--no-sandbox")
        self.proc = subprocess.Popen(args, pass_fds=(3, 4, to_chrome_r, from_chrome_w),
                                     preexec_fn=wire_pipes,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        self.session: str | None = None

    def __enter__(self) -> Browser:
        target = self.call("Target.createTarget", url="about:blank", session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True, session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:  # closing: the process is killed below anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, *, session: bool = True, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    self.events.remove(event)
                    return event
            reply = self._read_message(deadline)
            if "method" in reply:
                self.events.append(reply)

    def open(self, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Navigate and wait for the load event (images included); returns the main document's response."""
        if headers:
            self.call("Network.setExtraHTTPHeaders", headers=headers)
        self.call("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")
        responses = [e["params"]["response"] for e in self.events if e["method"] == "Network.responseReceived"
                     and e["params"].get("type") == "Document"]
        return responses[-1] if responses else {}

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Errors the page produced: uncaught exceptions, console.error, and browser log errors (a CSP
        violation, a resource that failed to load)."""
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"{params['entry'].get('source')}: {params['entry'].get('text')}")
        return errors

    def screenshot(self, path: Path) -> Path:
        """The whole page, not just the window."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=min(height, 16000),
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
