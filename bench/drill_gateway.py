"""The drills' gateway: a home made with the CLI, the ``serve`` process, what /proc says of it, and a client.

Owns, for ``bench.soak`` and ``bench.faults``: building a real home only through ``python -m appliance``
verbs (init, policy keygen/sign/import, trust add, keys set, token issue) plus the tiny GGUF written by
``python -m local_models.tiny``; starting, stopping and killing ``serve`` on 127.0.0.1 with an ephemeral
port; the gateway's RSS and open descriptors from ``/proc/<pid>``; a small asyncio HTTP/1.1 client that
tells a clean answer from a reset, a hang or a stream its caller chose to leave; and reading the ledger
through a read-only SQLite connection.
Never: listens or connects anywhere but 127.0.0.1; writes the vault other than through the CLI; sends
unbounded traffic (every request has a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httptools

ROOT = Path(__file__).resolve().parent.parent
SITE = "drill-site"
ORG, ROLE = "drill", "clinician"
LOCAL_MODEL = "local/tiny"
_LISTENING = re.compile(r"phi-gateway listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # A PHI_ variable of the caller's shell must not reconfigure the gateway under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_")}
    env.update(extra or {})
    return env


def cli(
    home: Path, *args: str, stdin: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ARGS --home HOME``, captured."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--home", str(home)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=_env(),
    )


def _checked(done: subprocess.CompletedProcess[str]) -> str:
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(done.args[3:6])}… failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def _policy(routes: dict[str, dict[str, Any]], model_sha256: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "version": 1,
        "issued_at": (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "scope": {"sites": [SITE]},
        "routes": {"local": {"kind": "local", "data_classes": ["phi", "deidentified", "public"]}, **routes},
        "models": {LOCAL_MODEL: {"file": "tiny.gguf", "sha256": model_sha256, "n_ctx": 512}},
        "organizations": {ORG: {"roles": {ROLE: {"models": ["local/*", *(f"{r}/*" for r in routes)]}}}},
        "pricing": {"openai/gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
    }


def openai_route(base_url: str, timeout_s: float) -> dict[str, Any]:
    """An OpenAI-kind route to ``base_url`` (the fake's root) that may receive PHI."""
    return {
        "kind": "openai",
        "base_url": f"{base_url}/v1",
        "auth": "bearer",
        "timeout_s": timeout_s,
        "data_classes": ["phi", "deidentified", "public"],
    }


def prepare_home(root: Path, routes: dict[str, dict[str, Any]]) -> tuple[Path, str]:
    """A home at ``root/home`` made with the CLI: the tiny model, a signed policy naming ``routes`` (plus
    ``local``), a provider key for each route and a caller token; returns (home, token)."""
    home, author = root / "home", root / "author"
    _checked(cli(home, "init", "--site", SITE))
    _checked(
        subprocess.run(
            [sys.executable, "-m", "appliance", "policy", "keygen", "--out", str(author)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
    )
    _checked(cli(home, "trust", "add", f"{author}.pub"))
    (home / "models").mkdir(exist_ok=True)
    tiny = _checked(
        subprocess.run(
            [sys.executable, "-m", "local_models.tiny", str(home / "models" / "tiny.gguf")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
    )
    policy_file, bundle = root / "policy.json", root / "policy.bundle"
    policy_file.write_text(json.dumps(_policy(routes, tiny.strip().splitlines()[-1]), indent=2))
    _checked(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "policy",
                "sign",
                str(policy_file),
                "--key",
                f"{author}.key",
                "--out",
                str(bundle),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
    )
    _checked(cli(home, "policy", "import", str(bundle)))
    for route in routes:
        _checked(cli(home, "keys", "set", route, stdin="sk-drill-0123456789abcdef0123\n"))
    token = _checked(cli(home, "token", "issue", "--caller", "drill-app", "--org", ORG, "--role", ROLE))
    return home, token.strip().splitlines()[-1]


# -- the serve process ---------------------------------------------------------------------------------


class GatewayProcess:
    """One ``serve`` process; its stdout (audit lines) and stderr (log) go to files under ``logs``."""

    def __init__(self, home: Path, logs: Path, env: dict[str, str] | None = None) -> None:
        self.home, self.logs, self.env = home, logs, env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.log_path = logs / "gateway-0.log"

    def start(self) -> int:
        self.starts += 1
        self.log_path = self.logs / f"gateway-{self.starts}.log"
        with open(self.logs / f"gateway-{self.starts}.audit", "wb") as out, open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "appliance",
                    "serve",
                    "--home",
                    str(self.home),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                ],
                stdout=out,
                stderr=err,
                cwd=ROOT,
                env=_env(self.env),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode} at start:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"the gateway did not listen within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the gateway was not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the orderly drain; the exit status (-9 when it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def ensure_dead(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    # /proc, Linux only: the drills run on the appliance's OS.
    def status_kib(self, field_name: str) -> int:
        """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
        raise KeyError(field_name)

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def ledger_records(home: Path) -> list[dict[str, Any]]:
    """Every ledger record, in order, through a read-only connection."""
    conn = sqlite3.connect(f"file:{home / 'vault.db'}?mode=ro", uri=True)
    try:
        return [json.loads(r) for (r,) in conn.execute("SELECT record FROM ledger ORDER BY seq")]
    finally:
        conn.close()


def verify(home: Path) -> tuple[bool, str]:
    """``audit verify``: (passed, its first output line)."""
    done = cli(home, "audit", "verify", timeout=300)
    text = (done.stdout + done.stderr).strip()
    return done.returncode == 0 and done.stdout.startswith("ok:"), text.splitlines()[0] if text else ""


def pending_ids(home: Path) -> tuple[set[str], str]:
    """``audit pending``: the request ids it lists (one a line on stdout), and its summary line."""
    done = cli(home, "audit", "pending")
    return set(done.stdout.split()), (done.stderr.strip().splitlines() or [""])[-1]


# -- the client ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one request got. ``failure``: None for a complete answer, else ``reset`` (the connection ended
    before the answer did), ``timeout`` (no end within the deadline) or ``aborted`` (the client left after
    the first body chunk, on purpose)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    failure: str | None = None
    elapsed_s: float = 0.0

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    def error_object(self) -> dict[str, Any] | None:
        """The OpenAI-shaped ``error`` of a JSON body or of an in-band SSE frame; None when absent."""
        candidates = [self.body]
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            candidates = [line[5:].strip() for line in self.body.split(b"\n") if line.startswith(b"data:")]
        for raw in candidates:
            with contextlib.suppress(ValueError):
                doc = json.loads(raw)
                err = doc.get("error") if isinstance(doc, dict) else None
                if isinstance(err, dict) and {"message", "type", "code"} <= set(err):
                    return err
        return None

    @property
    def stream_done(self) -> bool:
        return self.body.rstrip().endswith(b"data: [DONE]")


class _Reader:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: list[bytes] = []
        self.complete = False
        self.got_body = False
        self._name = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.answer.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.got_body = True
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


# The gateway closes a keep-alive connection idle for 5 s (its default). A request written as that close
# crosses it on the wire fails without reaching the gateway; HTTP clients avoid the race by not reusing a
# connection idle for long, and so does this one.
IDLE_REUSE_S = 2.0


class Connection:
    """One keep-alive client connection to the gateway; reconnects after anything but a clean answer, and
    before reusing a connection idle for more than ``IDLE_REUSE_S``."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used_at = 0.0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - one deadline for the whole exchange, reset included
        abort_after_first_chunk: bool = False,
    ) -> Answer:
        answer = Answer()
        started = time.monotonic()
        try:
            await asyncio.wait_for(
                self._exchange(answer, method, path, body, abort_after_first_chunk), timeout
            )
        except TimeoutError:
            answer.failure = "timeout"
        except (OSError, httptools.HttpParserError, asyncio.IncompleteReadError):
            answer.failure = "reset"
        answer.elapsed_s = time.monotonic() - started
        self.used_at = time.monotonic()
        if answer.failure is not None or answer.headers.get("connection", "").lower() == "close":
            await self.close()
        return answer

    async def _exchange(
        self, answer: Answer, method: str, path: str, body: dict[str, Any] | None, abort: bool
    ) -> None:
        if self.writer is not None and time.monotonic() - self.used_at > IDLE_REUSE_S:
            await self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: drill\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        await self.writer.drain()
        reader = _Reader(answer)
        while not reader.complete:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionResetError("the gateway closed the connection before the answer ended")
            reader.parser.feed_data(data)
            if abort and reader.got_body and not reader.complete:
                answer.failure = "aborted"
                break
        answer.body = b"".join(reader.chunks)


def chat(
    model: str, *, stream: bool = False, max_tokens: int | None = None, text: str = "Summarise the note."
) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        doc["stream"] = True
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return doc
