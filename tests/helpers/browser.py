"""A real headless browser for tests: Debian's chromium, driven over the Chrome DevTools Protocol.

Why the protocol on a pipe (`--remote-debugging-pipe`) rather than the alternatives:
- `--dump-dom` gives the rendered page but not its errors, and console lines scraped from
  `--enable-logging=stderr` change format between versions and mix with chromium's own noise;
- the protocol reports each uncaught exception (`Runtime.exceptionThrown`), each console.error
  (`Runtime.consoleAPICalled`), each failed load (`Log.entryAdded`) and each request the page makes
  (`Network.requestWillBeSent`), as JSON, by name, and lets the test read the DOM (`Runtime.evaluate`);
- on a pipe (fds 3 and 4 of the browser, NUL-separated JSON) it needs no port, no websocket package
  and no browser download, which playwright or pyppeteer would bring (with their own version pins).
Only long-stable protocol methods are used.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Flags for a quiet, offline, throwaway browser (as root it needs --no-sandbox).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    """The chromium executable on PATH (Debian's package installs `chromium`), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What loading one page showed: its errors, every URL it requested, and values read from its DOM."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)


class Browser:
    """One headless chromium process and a protocol connection to it on a pipe."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="mad-chromium-")
        # The browser reads commands on its fd 3 and writes replies on its fd 4. Our pipe ends are moved
        # to fds >= 10 first, so mapping them onto 3 and 4 in the child cannot clobber one another;
        # bash does the mapping (dash takes single-digit fds only; preexec_fn is unsafe with threads).
        to_browser, from_browser = os.pipe(), os.pipe()
        self._send_fd, browser_in = _high_fd(to_browser[1]), _high_fd(to_browser[0])
        self._recv_fd, browser_out = _high_fd(from_browser[0]), _high_fd(from_browser[1])
        command = [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self._log = open(Path(self.profile) / "stderr.log", "wb")
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{browser_in} 4>&{browser_out} {browser_in}<&- {browser_out}>&-',
             "bash", *command],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            pass_fds=(browser_in, browser_out), start_new_session=True)  # its own group: closed as a whole
        os.close(browser_in)
        os.close(browser_out)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its reply; events that arrive meanwhile go to `self.events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        reply = self._receive(lambda m: m.get("id") == self._next_id, f"the reply to {method}")
        if "error" in reply:
            raise RuntimeError(f"chromium: {method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, event: str, session: str | None = None) -> dict:
        """Wait for the next `event` (e.g. Page.loadEventFired), unless it already arrived."""
        for message in self.events:
            if message["method"] == event and message.get("sessionId") == session:
                return message
        return self._receive(lambda m: m.get("method") == event and m.get("sessionId") == session, event)

    def _receive(self, wanted, what: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                raise TimeoutError(f"chromium: no {what} within {self.timeout:.0f} s ({self._stderr_tail()})")
            chunk = os.read(self._recv_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited before {what} ({self._stderr_tail()})")
            self._buffer += chunk

    def _stderr_tail(self) -> str:
        self._log.flush()
        text = (Path(self.profile) / "stderr.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-3:]) or "no output"

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group we started: the browser and its helpers
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        finally:
            os.close(self._send_fd)
            os.close(self._recv_fd)
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _high_fd(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def load_page(executable: str, path, expressions: dict[str, str] | None = None, timeout: float = 60.0) -> PageLoad:
    """Open `path` in a fresh headless chromium; return its errors, requested URLs and `expressions`' values.

    An error is an uncaught exception, a console.error/console.assert, or a browser log entry of level
    error (a resource that failed to load, a blocked request).
    """
    result = PageLoad()
    with Browser(executable, timeout) as browser:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session)
        browser.call("Page.navigate", session, url=Path(path).resolve().as_uri())
        browser.wait_for("Page.loadEventFired", session)
        for name, expression in (expressions or {}).items():
            reply = browser.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
            if "exceptionDetails" in reply:
                raise RuntimeError(f"evaluating {name}: {reply['exceptionDetails'].get('text')}")
            result.values[name] = reply["result"].get("value")
        for event in browser.events:  # every event up to the last reply, in order
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                result.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                             for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                result.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent":
                result.requests.append(params["request"]["url"])
    return result
