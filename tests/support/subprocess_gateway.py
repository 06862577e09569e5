"""Test harness: the gateway as a real ``python -m appliance serve`` process, and a small HTTP client for it.

Fault tests need a gateway that can be killed with SIGKILL or starved of disk while the test process, and the
``FakeUpstream`` in it, live on. The home is prepared in-process by ``GatewayHarness`` (the same calls the CLI
makes); this module only starts, stops and kills the server, runs CLI verbs, and reads the ledger read-only.
Never: listens or connects anywhere but 127.0.0.1; writes the vault (reads use a ``mode=ro`` connection).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"phi-gateway listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 20.0
_SERVE = (sys.executable, "-m", "appliance", "serve")


def cli(home: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ARGS --home HOME``, captured."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_REPO,
        env=_env(),
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PHI_")}


class GatewayProcess:
    """One ``serve`` process on 127.0.0.1 and an ephemeral port; its stdout (audit lines) and stderr (log)
    go to files in ``logs`` so a dead or stuck gateway never blocks on a pipe."""

    def __init__(self, home: Path, logs: Path) -> None:
        self.home = home
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> int:
        self.starts += 1
        self.stderr_path = self.logs / f"gateway-{self.starts}.log"
        stdout_path = self.logs / f"gateway-{self.starts}.audit"
        with open(stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*_SERVE, "--home", str(self.home), "--host", "127.0.0.1", "--port", "0"],
                stdout=out,
                stderr=err,
                cwd=_REPO,
                env=_env(),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the gateway exited with {self.proc.returncode} at start:\n{self.log()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"the gateway did not listen within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the gateway was not started"
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no drain, no vault close, no head sealed."""
        os.kill(self.pid, signal.SIGKILL)
        self.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait for the orderly shutdown; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the gateway did not exit within {timeout} s:\n{self.log()}") from None

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def chat_body(marker: str, *, stream: bool, model: str = "openai/gpt-4o-mini") -> bytes:
    """A chat completions body whose prompt carries ``marker`` (how the fake upstream's copy is matched)."""
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"note {marker}"}]}
    if stream:
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


MARKER = re.compile(r"note (m[0-9a-z-]+)")


def marker_of(upstream_body: bytes) -> str:
    """The marker in a request body the fake upstream received."""
    match = MARKER.search(upstream_body.decode())
    assert match, f"no marker in a request the upstream received: {upstream_body[:200]!r}"
    return match.group(1)


def post(conn: http.client.HTTPConnection, path: str, body: bytes, token: str) -> tuple[int, bytes]:
    conn.request(
        "POST",
        path,
        body,
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    return resp.status, resp.read()


def get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def ledger_records(vault: Path) -> list[dict[str, Any]]:
    """Every ledger record, in order, read through a read-only connection."""
    conn = sqlite3.connect(f"file:{vault}?mode=ro", uri=True)
    try:
        return [json.loads(r) for (r,) in conn.execute("SELECT record FROM ledger ORDER BY seq")]
    finally:
        conn.close()
