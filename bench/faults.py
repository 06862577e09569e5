"""Fault drill: one hostile condition per row, what the gateway must do, what it did, PASS or FAIL.

Everything runs on loopback: a hostile fake upstream in a thread of this process (it misbehaves on purpose,
chosen by the model name), ``phi-gateway serve`` as a subprocess on a home made with the CLI, and the CLI
for ``models unload``, ``audit verify`` and ``audit pending``. For every request the client must get an
OpenAI-shaped error with the right status (or, once a stream has started, an in-band error frame), never a
reset or a hang, and the request must have its request record and its outcome record in the ledger.

    ./dev faults                  # or: .venv/bin/python -m bench.faults [--only NAME ...] [--list]

Exits 1 when any row FAILs. ``disk-full`` mounts a 24 MiB tmpfs and needs root (SKIP otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.drill_gateway import (
    LOCAL_MODEL,
    Answer,
    Connection,
    GatewayProcess,
    chat,
    cli,
    free_port,
    ledger_records,
    openai_route,
    pending_ids,
    prepare_home,
    verify,
)
from bench.hostile_upstream import HostileUpstream
from tests.support.small_fs import MountFailed, fill, small_tmpfs

CHAT = "/v1/chat/completions"
ROUTE_TIMEOUT_S = 2.0  # the hostile route's timeout_s: a stall must end as 504 soon after it
CLIENT_DEADLINE_S = 20.0  # past this a request counts as a hang
RSS_GROWTH_BOUND_MIB = 160.0  # the whole-body cap is 32 MiB; a bounded copy or two of it, not 2 GiB


# -- the drill's state and rows ----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    expected: str
    observed: str
    verdict: str  # PASS, FAIL or SKIP


@dataclass
class Drill:
    root: Path
    base_home: Path
    token: str
    upstream: HostileUpstream
    gateway: GatewayProcess | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def copy_home(self, name: str, into: Path | None = None) -> Path:
        """A copy of the prepared home (the same token works there), for a scenario that ruins its own."""
        target = into or self.root / name
        shutil.copytree(
            self.base_home, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("admin.sock")
        )
        return target

    def shared(self) -> GatewayProcess:
        """The gateway on the prepared home, started on first use, for the scenarios that do not ruin it."""
        if self.gateway is None or not self.gateway.alive:
            logs = self.root / "shared-logs"
            logs.mkdir(exist_ok=True)
            self.gateway = GatewayProcess(self.base_home, logs)
            self.gateway.start()
        return self.gateway


def ask(
    port: int,
    token: str,
    body: dict[str, Any] | None,
    *,
    path: str = CHAT,
    timeout: float = CLIENT_DEADLINE_S,
) -> Answer:
    """One request on a fresh connection (GET without a body), under the hang deadline."""

    async def once() -> Answer:
        conn = Connection(port, token)
        try:
            return await conn.request("POST" if body is not None else "GET", path, body, timeout=timeout)
        finally:
            await conn.close()

    return asyncio.run(once())


def records_of(home: Path, request_id: str | None, wait_s: float = 3.0) -> list[dict[str, Any]]:
    """The ledger records of one request, waiting a little for its lazy outcome record."""
    if request_id is None:
        return []
    deadline = time.monotonic() + wait_s
    while True:
        found = [r for r in ledger_records(home) if r.get("request_id") == request_id]
        if any(r["type"] in ("response", "error") for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _recorded(records: list[dict[str, Any]], status: int) -> tuple[bool, str]:
    types = [r["type"] for r in records]
    outcome = [r for r in records if r["type"] in ("response", "error")]
    ok = types.count("request") == 1 and len(outcome) == 1 and outcome[0].get("status_code") == status
    shown = "+".join(types) or "no records"
    if outcome:
        shown += f" (outcome {outcome[0].get('status_code')} {outcome[0].get('detail')})"
    return ok, shown


def error_row(
    name: str,
    drill: Drill,
    body: dict[str, Any],
    status: int,
    *,
    in_band: bool = False,
    max_s: float | None = None,
) -> Row:
    """The common check: an OpenAI-shaped error with ``status`` (in-band, after a 200 head, when
    ``in_band``), in time, and both records with that status in the ledger."""
    gateway = drill.shared()
    answer = ask(gateway.port, drill.token, body)
    err = answer.error_object()
    records = records_of(drill.base_home, answer.request_id)
    recorded, shown = _recorded(records, status)
    head = 200 if in_band else status
    where = "in-band error" if in_band else "error"
    expected = f"{head}, {where} {status}, request+outcome {status}" + (f", < {max_s:.0f} s" if max_s else "")
    code = err.get("code") if err else None
    observed = (
        f"{answer.status or '-'}{' ' + answer.failure if answer.failure else ''}, "
        f"{'error ' + str(code) if err else 'no OpenAI error'}, {shown}, {answer.elapsed_s:.1f} s"
    )
    ok = (
        answer.failure is None
        and answer.status == head
        and err is not None
        and recorded
        and (max_s is None or answer.elapsed_s < max_s)
    )
    if in_band and answer.stream_done:
        ok = False  # an error frame followed by [DONE] would tell the SDK the answer was whole
    return Row(name, expected, observed, "PASS" if ok else "FAIL")


# -- upstream misbehaviour: one request each, on the shared gateway ----------------------------------------


def upstream_refused(drill: Drill) -> Row:
    return error_row("upstream-refused", drill, chat("deadport/gpt-4o-mini"), 502, max_s=10)


def upstream_reset(drill: Drill) -> Row:
    return error_row("upstream-reset", drill, chat("openai/reset"), 502, max_s=10)


def upstream_stall(drill: Drill) -> Row:
    return error_row("upstream-stall", drill, chat("openai/stall"), 504, max_s=ROUTE_TIMEOUT_S + 3)


def upstream_midstream(drill: Drill) -> Row:
    return error_row("upstream-midstream", drill, chat("openai/midstream", stream=True), 502, in_band=True)


def garbage_not_http(drill: Drill) -> Row:
    return error_row("garbage-not-http", drill, chat("openai/not-http"), 502, max_s=10)


def garbage_json(drill: Drill) -> Row:
    return error_row("garbage-json", drill, chat("openai/bad-json"), 502, max_s=10)


def garbage_sse(drill: Drill) -> Row:
    return error_row("garbage-sse", drill, chat("openai/bad-sse", stream=True), 502, in_band=True)


@contextlib.contextmanager
def _rss_peak(gateway: GatewayProcess) -> Iterator[dict[str, float]]:
    """The gateway's RSS before and at its highest while the block runs (sampled every 5 ms)."""
    seen = {"before": gateway.rss_mib(), "peak": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, KeyError, AssertionError):
                seen["peak"] = max(seen["peak"], gateway.rss_mib())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join(5)


def _huge(name: str, drill: Drill, stream: bool) -> Row:
    gateway = drill.shared()
    with _rss_peak(gateway) as rss:
        row = error_row(name, drill, chat(f"openai/{name}", stream=stream), 502, in_band=stream, max_s=30)
    growth = rss["peak"] - rss["before"]
    sent = drill.upstream.huge_sent / 1024**2
    row.expected += f", RSS +< {RSS_GROWTH_BOUND_MIB:.0f} MiB"
    row.observed += (
        f", RSS {rss['before']:.0f}->{rss['peak']:.0f} MiB (+{growth:.0f}), upstream sent {sent:.0f} MiB"
    )
    if growth >= RSS_GROWTH_BOUND_MIB or sent >= 1024:
        row.verdict = "FAIL"
    return row


def huge_json(drill: Drill) -> Row:
    return _huge("huge-json", drill, stream=False)


def huge_sse(drill: Drill) -> Row:
    return _huge("huge-sse", drill, stream=True)


# -- the local model unloaded under running requests -----------------------------------------------------


def local_unload(drill: Drill) -> Row:
    gateway = drill.shared()
    warm = ask(gateway.port, drill.token, chat(LOCAL_MODEL, max_tokens=4))  # loaded before the drill
    answers: list[tuple[float, float, Answer]] = []
    window: dict[str, float] = {}

    async def client(stop: asyncio.Event) -> None:
        conn = Connection(gateway.port, drill.token)
        try:
            while not stop.is_set():
                began = time.monotonic()
                body = chat(LOCAL_MODEL, stream=True, max_tokens=400)
                answer = await conn.request("POST", CHAT, body, timeout=CLIENT_DEADLINE_S)
                answers.append((began, time.monotonic(), answer))
        finally:
            await conn.close()

    async def drive() -> subprocess.CompletedProcess[str]:
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(client(stop)) for _ in range(4)]
        await asyncio.sleep(0.5)
        window["from"] = time.monotonic()
        done = await asyncio.to_thread(cli, drill.base_home, "models", "unload", LOCAL_MODEL)
        window["to"] = time.monotonic()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        return done

    unload = asyncio.run(drive())
    after = ask(gateway.port, drill.token, chat(LOCAL_MODEL, max_tokens=4))
    overlapping = [a for began, ended, a in answers if began <= window["to"] and ended >= window["from"]]
    bad = [
        a for _, _, a in answers if a.failure is not None or (not a.stream_done and a.error_object() is None)
    ]
    in_band = sum(1 for a in overlapping if a.status == 200 and not a.stream_done)
    errors = sorted(
        f"{a.status} {(a.error_object() or {}).get('code')}" for a in overlapping if a.status != 200
    )
    ids = {a.request_id for _, _, a in answers} | {after.request_id}
    time.sleep(1.0)
    records = ledger_records(drill.base_home)
    with_request = {r["request_id"] for r in records if r["type"] == "request"}
    with_outcome = {r["request_id"] for r in records if r["type"] in ("response", "error")}
    unrecorded = len(ids - with_request) + len(ids - with_outcome)
    observed = (
        f"unload exit {unload.returncode}, {len(answers)} streams, {len(overlapping)} over the unload "
        f"({in_band} ended by an in-band error, error answers: {', '.join(errors) or 'none'}), "
        f"{len(bad)} reset/hang/unshaped, "
        f"{unrecorded} missing records, next request {after.status}"
    )
    ok = (
        warm.status == 200
        and unload.returncode == 0
        and overlapping
        and not bad
        and not unrecorded
        and after.status == 200
    )
    expected = "every stream ends ([DONE] or an error), records complete, next request 200 (reloads)"
    return Row("local-unload", expected, observed, "PASS" if ok else "FAIL")


# -- the disk fills up -----------------------------------------------------------------------------------


def disk_full(drill: Drill) -> Row:
    name = "disk-full"
    expected = "503 ledger error, /health 503, then 200 by itself once space returns; verify ok"
    if os.geteuid() != 0:
        return Row(name, expected, "needs root to mount a tmpfs", "SKIP")
    try:
        with small_tmpfs(drill.root / "small-fs", 24) as mount:
            gateway = GatewayProcess(drill.copy_home(name, into=mount / "home"), drill.root)
            try:
                return _disk_full(name, expected, gateway, drill.token)
            finally:
                gateway.ensure_dead()  # before the unmount: the gateway holds files there
    except MountFailed as exc:
        return Row(name, expected, str(exc), "SKIP")


def _disk_full(name: str, expected: str, gateway: GatewayProcess, token: str) -> Row:
    port = gateway.start()
    before = [ask(port, token, chat("openai/ok")).status for _ in range(20)]
    filler = fill(gateway.home.parent)
    refused: Answer | None = None
    tries = 0
    while refused is None and tries < 3000:
        tries += 1
        answer = ask(port, token, chat("openai/ok"))
        refused = answer if answer.status != 200 else None
    err = refused.error_object() if refused else None
    health = ask(port, "", None, path="/health", timeout=10).status
    filler.unlink()
    recovered_after = None
    started = time.monotonic()
    while time.monotonic() - started < 15:
        if ask(port, token, chat("openai/ok")).status == 200:
            recovered_after = time.monotonic() - started
            break
        time.sleep(0.1)
    after = [ask(port, token, chat("openai/ok")).status for _ in range(5)]
    health_after = ask(port, "", None, path="/health", timeout=10).status
    stop = gateway.stop()
    verified, line = verify(gateway.home)
    observed = (
        f"{before.count(200)}/20 ok; full after {tries}: {refused.status if refused else 'no refusal'} "
        f"{err.get('code') if err else 'no OpenAI error'}, /health {health}; recovered "
        f"{f'in {recovered_after:.1f} s' if recovered_after is not None else 'NOT in 15 s'}, "
        f"/health {health_after}, then {after.count(200)}/5 ok; exit {stop}; "
        f"verify {'ok' if verified else line}"
    )
    ok = (
        before.count(200) == 20
        and refused is not None
        and refused.failure is None
        and refused.status == 503
        and err is not None
        and "ledger" in str(err.get("message", "")) + str(err.get("code", ""))
        and health == 503
        and recovered_after is not None
        and after.count(200) == 5
        and health_after == 200
        and verified
    )
    return Row(name, expected, observed, "PASS" if ok else "FAIL")


# -- the wall clock steps back an hour -------------------------------------------------------------------

# Put on PYTHONPATH of the gateway only. time.time is what the ledger's timestamps read; the step is read
# from a file the drill writes, so it lands while the gateway serves.
_CLOCK_PRELOAD = """
import os, time
_path = os.environ.get("DRILL_CLOCK_STEP_FILE")
if _path:
    _time, _time_ns, _mono = time.time, time.time_ns, time.monotonic
    _seen = [0.0, 0.0]

    def _step():
        now = _mono()
        if now - _seen[0] > 0.02:
            _seen[0] = now
            try:
                with open(_path) as fh:
                    _seen[1] = float(fh.read() or 0)
            except (OSError, ValueError):
                _seen[1] = 0.0
        return _seen[1]

    time.time = lambda: _time() - _step()
    time.time_ns = lambda: _time_ns() - int(_step() * 1e9)
"""


def clock_step(drill: Drill) -> Row:
    name = "clock-step"
    preload, step_file = drill.root / "clock-preload", drill.root / "clock-offset"
    preload.mkdir()
    (preload / "sitecustomize.py").write_text(_CLOCK_PRELOAD)
    env = {"PYTHONPATH": str(preload), "DRILL_CLOCK_STEP_FILE": str(step_file)}
    home = drill.copy_home(name)
    gateway = GatewayProcess(home, drill.root, env=env)
    sent: list[Answer] = []
    try:
        port = gateway.start()
        for i in range(30):
            if i == 15:
                step_file.write_text("3600")
                time.sleep(1.5)  # a head signature or two under the stepped clock
            sent.append(ask(port, drill.token, chat("openai/ok", stream=i % 2 == 1)))
        time.sleep(1.5)
        stop = gateway.stop()
    finally:
        gateway.ensure_dead()
    verified, line = verify(home)
    ids = [a.request_id for a in sent]
    records = [r for r in ledger_records(home) if r.get("request_id") in set(ids) and r["type"] == "request"]
    order_kept = [r["request_id"] for r in records] == ids
    ts = [r["ts"] for r in records]
    went_back = len(ts) == 30 and ts[15] < ts[14]
    observed = (
        f"{sum(a.status == 200 for a in sent)}/30 ok, "
        f"ts {ts[14] if len(ts) > 15 else '-'} -> {ts[15] if len(ts) > 15 else '-'} "
        f"({'stepped back' if went_back else 'not stepped back'}), seq order "
        f"{'kept' if order_kept else 'NOT kept'}, exit {stop}, verify {'ok' if verified else line}"
    )
    ok = all(a.status == 200 and a.failure is None for a in sent) and order_kept and verified and stop == 0
    expected = "30/30 ok across the step, records in send order, verify ok"
    return Row(name, expected, observed, "PASS" if ok else "FAIL")


# -- SIGKILL under traffic, then a restart ---------------------------------------------------------------


def sigkill(drill: Drill) -> Row:
    name = "sigkill"
    home = drill.copy_home(name)
    gateway = GatewayProcess(home, drill.root)
    got: list[Answer] = []
    try:
        port = gateway.start()

        async def client(n: int, kill_at: float) -> None:
            conn = Connection(port, drill.token)
            try:
                while True:
                    model = "openai/slow" if n % 4 else "openai/ok"
                    answer = await conn.request(
                        "POST", CHAT, chat(model, stream=n % 4 != 0), timeout=CLIENT_DEADLINE_S
                    )
                    got.append(answer)
                    if answer.failure is not None or time.monotonic() > kill_at + 5:
                        return
            finally:
                await conn.close()

        async def drive() -> None:
            kill_at = time.monotonic() + 2.5
            clients = [asyncio.ensure_future(client(n, kill_at)) for n in range(16)]
            await asyncio.sleep(2.5)
            await asyncio.to_thread(gateway.kill)
            await asyncio.gather(*clients)

        asyncio.run(drive())
        pending, summary = pending_ids(home)
        verified, line = verify(home)
        gateway.start()
        after = [ask(gateway.port, drill.token, chat("openai/ok")).status for _ in range(3)]
        gateway.stop()
    finally:
        gateway.ensure_dead()
    records = ledger_records(home)
    requested = {r["request_id"] for r in records if r["type"] == "request"}
    outcomes = {r["request_id"] for r in records if r["type"] in ("response", "error")}
    answered = [a for a in got if a.failure is None and a.status == 200]
    in_flight = [a for a in got if a.failure is not None and a.request_id is not None]
    lost = [a for a in answered if a.request_id not in requested]
    unexplained = [a for a in answered if a.request_id not in outcomes and a.request_id not in pending]
    not_pending = [a for a in in_flight if a.request_id not in pending or a.request_id not in requested]
    hangs = [a for a in got if a.failure == "timeout"]
    observed = (
        f"{len(answered)} answered, {len(in_flight)} in flight at the kill; pending {len(pending)} "
        f"({summary}); answered without a request record {len(lost)}, without outcome or pending "
        f"{len(unexplained)}; in flight not pending {len(not_pending)}; hangs {len(hangs)}; "
        f"verify {'ok' if verified else line}; after restart {after.count(200)}/3 ok"
    )
    ok = answered and in_flight and not lost and not unexplained and not not_pending and not hangs
    ok = bool(ok) and verified and after.count(200) == 3
    expected = "in-flight requests pending, every answered request recorded, verify ok, serves after restart"
    return Row(name, expected, observed, "PASS" if ok else "FAIL")


# -- the run ---------------------------------------------------------------------------------------------

SCENARIOS: dict[str, tuple[str, Callable[[Drill], Row]]] = {
    "upstream-refused": ("the route's port refuses the connection", upstream_refused),
    "upstream-reset": ("the upstream sends half an answer, then RST", upstream_reset),
    "upstream-stall": (f"the upstream never answers (route timeout {ROUTE_TIMEOUT_S:.0f} s)", upstream_stall),
    "upstream-midstream": ("the upstream drops the socket mid-stream", upstream_midstream),
    "garbage-not-http": ("the upstream answers an SSH banner", garbage_not_http),
    "garbage-json": ("the upstream answers 200 with a body that is not JSON", garbage_json),
    "garbage-sse": ("the upstream streams events that are not JSON", garbage_sse),
    "huge-json": ("the upstream answers a 2 GiB JSON body", huge_json),
    "huge-sse": ("the upstream streams one 2 GiB SSE event", huge_sse),
    "local-unload": ("models unload while local streams run", local_unload),
    "disk-full": ("the home's file system fills up, then frees", disk_full),
    "clock-step": ("the wall clock steps back an hour mid-run", clock_step),
    "sigkill": ("SIGKILL under streaming traffic, then a restart", sigkill),
}
SHARED_HOME_ROW = "shared-ledger"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this scenario (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    if args.list:
        for scenario, (what, _) in SCENARIOS.items():
            print(f"{scenario:<20}{what}")
        return 0
    chosen = args.only or list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; see --list")
    upstream = HostileUpstream()
    upstream.start()
    rows: list[Row] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="phi-faults-") as tmp:
            root = Path(tmp)
            routes = {
                "openai": openai_route(upstream.base_url, ROUTE_TIMEOUT_S),
                "deadport": openai_route(f"http://127.0.0.1:{free_port()}", ROUTE_TIMEOUT_S),
            }
            home, token = prepare_home(root, routes)
            drill = Drill(root / "base", home, token, upstream)
            drill.root.mkdir()
            try:
                for scenario in chosen:
                    rows.append(_guarded(scenario, drill))
                    _print_row(rows[-1])
            finally:
                if drill.gateway is not None:
                    rows.append(_shared_ledger(drill))
                    _print_row(rows[-1])
                    drill.gateway.ensure_dead()
    finally:
        upstream.stop()
    failed = [r.name for r in rows if r.verdict == "FAIL"]
    print(
        f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s: "
        f"{sum(r.verdict == 'PASS' for r in rows)} PASS, {len(failed)} FAIL, "
        f"{sum(r.verdict == 'SKIP' for r in rows)} SKIP{': ' + ', '.join(failed) if failed else ''}"
    )
    return 1 if failed else 0


def _guarded(scenario: str, drill: Drill) -> Row:
    """A scenario that raises is a FAIL row naming the exception, and the drill goes on."""
    try:
        return SCENARIOS[scenario][1](drill)
    except Exception as exc:  # the drill reports every failure as a row
        return Row(
            scenario, SCENARIOS[scenario][0], f"drill error: {type(exc).__name__}: {str(exc)[:300]}", "FAIL"
        )


def _shared_ledger(drill: Drill) -> Row:
    """After the rows on the shared gateway: an orderly stop leaves nothing pending and a verified ledger."""
    assert drill.gateway is not None
    stop = drill.gateway.stop()
    pending, summary = pending_ids(drill.base_home)
    verified, line = verify(drill.base_home)
    observed = f"exit {stop}, {summary}, verify: {line}"
    ok = stop == 0 and not pending and verified
    return Row(
        SHARED_HOME_ROW, "exit 0 on SIGTERM, nothing pending, verify ok", observed, "PASS" if ok else "FAIL"
    )


def _print_row(row: Row) -> None:
    print(
        f"{row.verdict:<5} {row.name}\n      expected: {row.expected}\n      observed: {row.observed}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
