"""The ledger under faults, with the gateway as a real process: SIGKILL under load, a full disk, a torn file.

The promise tested: a request leaves for the upstream only after its "request" record is durable; when the
ledger cannot be written the answer is 503 and nothing is forwarded, and the gateway recovers by itself once
writes succeed again; ``audit verify`` passes after all of it and fails clearly on a damaged file.
Record edits (dropped triggers, altered hashes, deleted rows) are covered by tests/ledger/test_store.py and
tests/cli/test_cli.py; here only what needs a process to die or a filesystem to misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc
from tests.support.small_fs import fill, small_tmpfs
from tests.support.subprocess_gateway import (
    GatewayProcess,
    chat_body,
    cli,
    get,
    ledger_records,
    marker_of,
    post,
)

CLIENTS = 64
KILL_AFTER_FORWARDED = 300
CHAT = "/v1/chat/completions"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A fake provider of this test's own (its received list is the test's evidence)."""
    fake = FakeUpstream()
    fake.start_in_thread()
    yield fake
    fake.stop_thread()


def _prepare(root: Path, upstream: FakeUpstream) -> tuple[Path, str]:
    """A home at ``root/home`` with a signed policy, provider keys and a token; returns (home, token)."""
    harness = GatewayHarness(root)
    harness.import_policy(policy_doc(upstream.base_url))
    harness.set_provider_keys()
    return harness.home.root, harness.issue("fault-bot")


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _verify_ok(home: Path) -> str:
    result = cli(home, "audit", "verify")
    assert result.returncode == 0 and result.stdout.startswith("ok:"), (
        f"audit verify failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    )
    return result.stdout.strip()


def _by_type(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(request records by request_sha256, outcome type by request_id)."""
    requests = {r["request_sha256"]: r for r in records if r["type"] == "request"}
    outcomes = {r["request_id"]: r["type"] for r in records if r["type"] in ("response", "error")}
    return requests, outcomes


# -- 1. SIGKILL while 64 clients stream ------------------------------------------------------------------


class _Clients:
    """``CLIENTS`` threads, each streaming chat completions on its own keep-alive connection, in a loop;
    every body is kept by marker (``m<client>-<n>``) with what its client saw. Odd clients ask for the
    fake's ``slow-stream`` (7 events 50 ms apart), so the kill finds streams half sent."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.sent: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.completed: set[str] = set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)
        assert not any(t.is_alive() for t in self.threads), "a client thread did not finish"

    def _run(self, client: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        n = 0
        try:
            while not self.stop.is_set():
                marker = f"m{client}-{n}"
                model = "openai/slow-stream" if client % 2 else "openai/gpt-4o-mini"
                body = self.sent[marker] = chat_body(marker, stream=True, model=model)
                try:
                    status, data = post(conn, CHAT, body, self.token)
                except (OSError, http.client.HTTPException):
                    return  # the gateway died under this request
                self.status[marker] = status
                if status == 200 and data.endswith(b"data: [DONE]\n\n"):
                    self.completed.add(marker)
                n += 1
        finally:
            conn.close()


def test_sigkill_under_streaming_load_loses_no_request_record(tmp_path: Path, upstream: FakeUpstream) -> None:
    home, token = _prepare(tmp_path, upstream)
    gateway = GatewayProcess(home, tmp_path)
    try:
        clients = _Clients(gateway.start(), token)
        clients.start()
        deadline = time.monotonic() + 40
        while len(upstream.requests) < KILL_AFTER_FORWARDED:
            seen = len(upstream.requests)
            assert time.monotonic() < deadline, f"{seen} requests upstream in 40 s:\n{gateway.log()[-3000:]}"
            time.sleep(0.01)
        gateway.kill()
        clients.join()
        forwarded = [marker_of(r.body) for r in list(upstream.requests) if r.path.endswith(CHAT)]

        gateway.start()  # the same home, straight after the crash
        records = ledger_records(home / "vault.db")
        requests, outcomes = _by_type(records)
        counts = (
            f"forwarded {len(forwarded)}, sent {len(clients.sent)}, completed {len(clients.completed)}, "
            f"request records {len(requests)}, outcome records {len(outcomes)}"
        )
        refused = {m: s for m, s in clients.status.items() if s != 200}
        assert not refused, f"answers other than 200 before the kill: {refused}; {counts}"
        unrecorded = [m for m in forwarded if _sha(clients.sent[m]) not in requests]
        assert not unrecorded, f"forwarded without a request record: {unrecorded[:10]}; {counts}"
        assert len(set(forwarded)) == len(forwarded), f"a request was forwarded twice; {counts}"
        assert all(_sha(clients.sent[m]) in requests for m in clients.completed), counts
        assert set(forwarded) - clients.completed, f"the kill found no stream in progress; {counts}"

        # An outcome is queued as the answer ends and joins the next commit: the commit of the same
        # client's next request record, which precedes that request's forwarding. So only a client's last
        # answer before the kill may lack its outcome (it is then what `audit pending` lists).
        forwarded_set = set(forwarded)
        open_ended = []
        for marker in clients.completed:
            outcome = outcomes.get(requests[_sha(clients.sent[marker])]["request_id"])
            client, n = marker[1:].split("-")
            if outcome is None and f"m{client}-{int(n) + 1}" not in forwarded_set:
                open_ended.append(marker)
                continue
            assert outcome == "response", f"{marker}: outcome {outcome!r} after a complete answer; {counts}"
        assert len(open_ended) <= CLIENTS, counts
        print(f"\ncrash: {counts}, completed without an outcome (last per client) {len(open_ended)}")
        _verify_ok(home)

        with contextlib.closing(_Caller(gateway.port, token, prefix="after")) as caller:
            for _ in range(5):
                assert caller.send()[1] == 200
        assert gateway.stop() == 0, gateway.log()[-3000:]
        requests, outcomes = _by_type(ledger_records(home / "vault.db"))
        assert all(outcomes[requests[_sha(body)]["request_id"]] == "response" for body in caller.ok.values())
        _verify_ok(home)
    finally:
        gateway.ensure_dead()


# -- 2. a full disk, 3. a read-only file system ----------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at ``tmp_path/home`` (the gateway home goes there), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the disk-full and read-only tests mount a tmpfs: run them as root (CI does)")
    with small_tmpfs(tmp_path / "home", 16) as mount:
        yield mount


class _Caller:
    """Sequential small chat requests on one connection, each with its marker; keeps what they got."""

    def __init__(self, port: int, token: str, prefix: str = "c") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.token = token
        self.prefix = prefix
        self.ok: dict[str, bytes] = {}
        self.n = 0

    def close(self) -> None:
        self.conn.close()

    def send(self) -> tuple[str, int, bytes]:
        marker = f"m{self.prefix}-{self.n}"
        self.n += 1
        body = chat_body(marker, stream=False)
        status, data = post(self.conn, CHAT, body, self.token)
        if status == 200:
            self.ok[marker] = body
        return marker, status, data

    def until(self, status: int, attempts: int) -> tuple[str, bytes]:
        for attempt in range(attempts):
            marker, got, data = self.send()
            if got == status:
                print(f"\n{status} after {attempt + 1} requests")
                return marker, data
            assert got in (200, 503), (got, data[:300])
        raise AssertionError(f"no {status} in {attempts} requests")


def _assert_fail_closed(marker: str, data: bytes, upstream: FakeUpstream, port: int) -> None:
    error = json.loads(data)["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert "ledger" in error["message"], error
    assert marker not in {marker_of(r.body) for r in list(upstream.requests)}, "forwarded unrecorded"
    status, health = get(port, "/health")
    assert status == 503 and health["ledger"]["writable"] is False, health


def _assert_recovered(caller: _Caller, home: Path, gateway: GatewayProcess) -> None:
    deadline = time.monotonic() + 10
    while caller.send()[1] != 200:
        assert time.monotonic() < deadline, f"not recovered in 10 s:\n{gateway.log()[-3000:]}"
        time.sleep(0.05)
    for _ in range(5):
        assert caller.send()[1] == 200
    status, health = get(gateway.port, "/health")
    assert status == 200 and health["ledger"]["writable"] is True, health
    requests, _ = _by_type(ledger_records(home / "vault.db"))
    unrecorded = [m for m, body in caller.ok.items() if _sha(body) not in requests]
    assert not unrecorded, f"answered 200 without a request record: {unrecorded}"
    _verify_ok(home)


def test_a_full_disk_fails_closed_and_recovers_by_itself(
    tmp_path: Path, small_fs: Path, upstream: FakeUpstream
) -> None:
    home, token = _prepare(tmp_path, upstream)
    assert home == small_fs
    gateway = GatewayProcess(home, tmp_path)
    try:
        with contextlib.closing(_Caller(gateway.start(), token)) as caller:
            for _ in range(20):
                assert caller.send()[1] == 200
            filler = fill(home)
            marker, data = caller.until(503, attempts=2000)
            _assert_fail_closed(marker, data, upstream, gateway.port)
            filler.unlink()
            _assert_recovered(caller, home, gateway)
        assert gateway.stop() == 0, gateway.log()[-3000:]
        _verify_ok(home)
    finally:
        gateway.ensure_dead()


def _remount(mount: Path, mode: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"remount,{mode} failed: {done.stderr}"


def test_a_read_only_home_refuses_to_start_and_serves_once_writable(
    tmp_path: Path, small_fs: Path, upstream: FakeUpstream
) -> None:
    """Linux refuses ``remount,ro`` (EBUSY) while a process holds a file open for writing, and the running
    gateway always holds the vault so: a file system cannot turn read-only under it. What can happen is a
    gateway (re)started on a home that is read-only: it must refuse to start, clearly, and serve once it
    is writable again."""
    home, token = _prepare(tmp_path, upstream)
    gateway = GatewayProcess(home, tmp_path)
    try:
        with contextlib.closing(_Caller(gateway.start(), token)) as caller:
            assert caller.send()[1] == 200
        assert gateway.stop() == 0, gateway.log()[-3000:]
        _remount(small_fs, "ro")
        try:
            with pytest.raises(AssertionError, match="exited with 1 at start") as refused:
                gateway.start()
        finally:
            _remount(small_fs, "rw")
        assert "error: cannot open the vault database" in str(refused.value), refused.value
        assert "Traceback" not in str(refused.value), refused.value
        with contextlib.closing(_Caller(gateway.start(), token)) as caller:
            for _ in range(3):
                assert caller.send()[1] == 200
            _assert_recovered(caller, home, gateway)
        assert gateway.stop() == 0, gateway.log()[-3000:]
    finally:
        gateway.ensure_dead()


# -- 4. a torn file ----------------------------------------------------------------------------------------


async def _append_admin_records(ledger: Any, n: int) -> None:
    await asyncio.gather(*(ledger.append({"type": "admin", "detail": f"filler {i}"}) for i in range(n)))


@pytest.fixture(scope="module")
def big_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed home whose ledger spans some 400 pages (3000 records), verified intact."""
    harness = GatewayHarness(tmp_path_factory.mktemp("big"))
    with harness.home.open_vault() as vault:
        asyncio.run(_append_admin_records(vault.ledger, 3000))
    home = harness.home.root
    _verify_ok(home)
    assert not Path(f"{home}/vault.db-wal").exists(), "a closed vault leaves no WAL behind"
    return home


def _ledger_leaf_pages(vault: Path) -> list[int]:
    conn = sqlite3.connect(f"file:{vault}?mode=ro", uri=True)
    try:
        query = "SELECT pageno FROM dbstat WHERE name = 'ledger' AND pagetype = 'leaf' ORDER BY pageno"
        return [page for (page,) in conn.execute(query)]
    finally:
        conn.close()


def _tear(vault: Path, where: str) -> None:
    """Damage the file as a crash of the storage, not an editor, would: cut it, or half-write a page."""
    size = vault.stat().st_size
    if where == "truncated":
        with open(vault, "r+b") as file:
            file.truncate(size // 2 + 1000)  # mid-file, mid-page
        return
    leaves = _ledger_leaf_pages(vault)
    page = leaves[len(leaves) // 2] if where == "torn middle page" else leaves[-1]
    with open(vault, "r+b") as file:  # the page's second half never reached the disk
        file.seek((page - 1) * _PAGE + _PAGE // 2)
        file.write(b"\0" * (_PAGE // 2))


_PAGE = 4096


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        pytest.param("truncated", r"malformed", id="truncated"),
        pytest.param(
            "torn middle page",
            r"FAILED after \d+ records: record \d+ .*file itself is damaged",
            id="torn-middle-page",
        ),
        pytest.param(
            "torn last page",
            r"FAILED after \d+ records: record \d+ .*file itself is damaged",
            id="torn-last-page",
        ),
    ],
)
def test_a_torn_vault_file_fails_verify_with_a_message(
    big_home: Path, tmp_path: Path, where: str, expected: str
) -> None:
    torn = tmp_path / "torn"
    shutil.copytree(big_home, torn, ignore=shutil.ignore_patterns("admin.sock"))
    _tear(torn / "vault.db", where)
    result = cli(torn, "audit", "verify")
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output, output
    assert result.returncode == 1, output
    assert re.search(expected, output), output
    print(f"\n{where}: verify exit {result.returncode}: {output}")
