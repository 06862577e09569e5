"""Soak drill: a real gateway under a steady mixed load for minutes, then its ledger and its memory judged.

Starts, on loopback only, the fake OpenAI-compatible upstream (its own process) and ``phi-gateway serve``
on a home made with the CLI (a signed policy with the tiny local GGUF and an upstream route, a token), and
drives N keep-alive connections for the duration with a mix: chat JSON and streamed, local and upstream,
clients that leave a stream after its first chunk, models listings, and a few deliberate upstream 500s
(which must come back as 502). Then stops the gateway with SIGTERM and prints one table.

    ./dev soak        # or: .venv/bin/python -m bench.soak --minutes 10 --connections 64

Exits 1 when: any answer was not what its kind expects (a 5xx other than the deliberate ones, a reset, a
timeout, a stream without its end), a request that reached the gateway lacks its request record or its
one outcome record (aborted streams included), the ledger holds a request the clients never saw, a request
is still pending after the orderly stop, the gateway exits non-zero on SIGTERM, or ``audit verify`` fails.
RSS and open descriptors are measured and printed, not judged (one soak is no baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from bench.drill_gateway import (
    LOCAL_MODEL,
    ROOT,
    Answer,
    Connection,
    GatewayProcess,
    chat,
    free_port,
    ledger_records,
    openai_route,
    pending_ids,
    prepare_home,
    verify,
    wait_port,
)

CHAT = "/v1/chat/completions"
# (kind, weight). Local work is kept small and bounded in concurrency (LOCAL_CONCURRENCY) so that the
# local queue (16 by default) never fills: a 429 is then a finding, not noise. A connection whose draw is
# local while that many local requests run draws again among the others.
MIX = [
    ("upstream-json", 30),
    ("upstream-stream", 20),
    ("upstream-abort", 8),
    ("upstream-fail", 2),
    ("models", 10),
    ("local-json", 12),
    ("local-stream", 12),
    ("local-abort", 6),
]
LOCAL_CONCURRENCY = 8
REQUEST_TIMEOUT_S = 30.0


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    aborted: int = 0
    unexpected: list[str] = field(default_factory=list)
    unexpected_count: int = 0
    unexpected_by: Counter[str] = field(default_factory=Counter)
    chat_ids: set[str] = field(default_factory=set)
    listing_ids: set[str] = field(default_factory=set)
    aborted_ids: set[str] = field(default_factory=set)

    def note(self, kind: str, problem: str) -> None:
        self.unexpected_count += 1
        self.unexpected_by[f"{kind} {' '.join(problem.split()[:2])}"] += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {problem}")


def _request(kind: str) -> tuple[str, str, dict[str, object] | None, bool]:
    """(method, path, body, leave after the first chunk) for one request of ``kind``."""
    text = f"Summarise note {random.randrange(10**6)} for the ward round."
    if kind == "models":
        return "GET", "/v1/models", None, False
    if kind == "upstream-json":
        return "POST", CHAT, chat("openai/gpt-4o-mini", text=text), False
    if kind == "upstream-stream":
        return "POST", CHAT, chat("openai/gpt-4o-mini", stream=True, text=text), False
    if kind == "upstream-abort":  # 7 events 50 ms apart: the client leaves mid-stream
        return "POST", CHAT, chat("openai/slow-stream", stream=True, text=text), True
    if kind == "upstream-fail":
        return "POST", CHAT, chat("openai/fail-500", text=text), False
    if kind == "local-json":
        return "POST", CHAT, chat(LOCAL_MODEL, max_tokens=8, text=text), False
    if kind == "local-stream":
        return "POST", CHAT, chat(LOCAL_MODEL, stream=True, max_tokens=16, text=text), False
    return "POST", CHAT, chat(LOCAL_MODEL, stream=True, max_tokens=256, text=text), True


def _judge(kind: str, answer: Answer, tally: Tally) -> None:
    if answer.failure in ("reset", "timeout"):
        tally.note(
            kind, f"{answer.failure} after {answer.elapsed_s:.2f} s (status {answer.status or 'none'})"
        )
        return
    tally.statuses[answer.status] += 1
    rid = answer.request_id
    if rid is None:
        tally.note(kind, f"status {answer.status} without X-Request-Id")
        return
    (tally.listing_ids if kind == "models" else tally.chat_ids).add(rid)
    if answer.failure == "aborted":
        tally.aborted += 1
        tally.aborted_ids.add(rid)
    expected = 502 if kind == "upstream-fail" else 200
    if answer.status != expected:
        tally.note(kind, f"status {answer.status}: {answer.body[:160]!r}")
    elif kind == "upstream-fail" and answer.error_object() is None:
        tally.note(kind, f"502 without an OpenAI-shaped error: {answer.body[:160]!r}")
    elif kind.endswith("-stream") and not answer.stream_done:
        tally.note(kind, f"stream without [DONE]: …{answer.body[-160:]!r}")


async def _client(
    port: int, token: str, stop_at: float, tally: Tally, local: asyncio.Semaphore, seed: int
) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX, strict=True)
    remote, remote_weights = zip(*((k, w) for k, w in MIX if not k.startswith("local")), strict=True)
    conn = Connection(port, token)
    try:
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            if kind.startswith("local") and local.locked():  # stay busy rather than queue behind local work
                kind = rng.choices(remote, remote_weights)[0]
            method, path, body, leave = _request(kind)
            tally.sent[kind] += 1
            if kind.startswith("local"):
                async with local:
                    answer = await conn.request(
                        method, path, body, timeout=REQUEST_TIMEOUT_S, abort_after_first_chunk=leave
                    )
            else:
                answer = await conn.request(
                    method, path, body, timeout=REQUEST_TIMEOUT_S, abort_after_first_chunk=leave
                )
            _judge(kind, answer, tally)
    finally:
        await conn.close()


async def _drive(port: int, token: str, connections: int, seconds: float, tally: Tally) -> None:
    local = asyncio.Semaphore(LOCAL_CONCURRENCY)
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(_client(port, token, stop_at, tally, local, i) for i in range(connections)))


@dataclass
class Ledger:
    """What the ledger holds for the clients' requests."""

    requests: int = 0
    outcomes: int = 0
    listings: int = 0
    client_closed: int = 0
    missing_request: int = 0
    missing_outcome: int = 0
    extra_outcomes: int = 0
    unseen: int = 0
    other: Counter[str] = field(default_factory=Counter)

    @property
    def problems(self) -> int:
        return self.missing_request + self.missing_outcome + self.extra_outcomes + self.unseen


def _account(home: Path, tally: Tally) -> Ledger:
    led = Ledger()
    request_ids: set[str] = set()
    outcomes: Counter[str] = Counter()
    listing_ids: set[str] = set()
    for record in ledger_records(home):
        rid, kind = record.get("request_id"), record["type"]
        if rid is None:
            led.other[kind] += 1
        elif kind == "request":
            led.requests += 1
            request_ids.add(rid)
        elif kind == "response" and record.get("detail") == "models_list":
            led.listings += 1
            listing_ids.add(rid)
        elif kind in ("response", "error"):
            led.outcomes += 1
            outcomes[rid] += 1
            led.client_closed += record.get("detail") == "client_closed"
        else:
            led.other[kind] += 1
    led.missing_request = len(tally.chat_ids - request_ids) + len(tally.listing_ids - listing_ids)
    led.missing_outcome = len(tally.chat_ids - set(outcomes))
    led.extra_outcomes = sum(n - 1 for n in outcomes.values() if n > 1)
    led.unseen = len(request_ids - tally.chat_ids) + len(listing_ids - tally.listing_ids)
    return led


def _run(work: Coroutine[object, object, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the appliance always has it
        asyncio.run(work)
    else:
        uvloop.run(work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="duration of the load (0.2 for a CI check)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    random.seed(args.seed)
    seconds = args.minutes * 60
    warmup = min(30.0, seconds / 10)
    tally = Tally()
    up_port = free_port()
    with tempfile.TemporaryDirectory(prefix="phi-soak-") as tmp:
        root = Path(tmp)
        upstream = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(up_port), "--fast"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gateway: GatewayProcess | None = None
        try:
            wait_port(up_port)
            home, token = prepare_home(root, {"openai": openai_route(f"http://127.0.0.1:{up_port}", 10)})
            gateway = GatewayProcess(home, root)  # the shipped limits: every client from 127.0.0.1
            port = gateway.start()
            rss = {"start": gateway.rss_mib()}
            fds = {"start": gateway.open_fds()}
            print(
                f"soak: {args.connections} connections for {seconds:.0f} s against 127.0.0.1:{port}",
                flush=True,
            )
            started = time.monotonic()
            _run(_drive_and_sample(gateway, port, token, args.connections, seconds, warmup, tally, rss))
            elapsed = time.monotonic() - started
            time.sleep(0.5)  # the gateway's side of the closed client connections
            rss["end"] = gateway.rss_mib()
            fds["end"] = gateway.open_fds()
            peak = gateway.status_kib("VmHWM") / 1024
            stop_status = gateway.stop()
            led = _account(home, tally)
            verified, verify_line = verify(home)
            pending, _ = pending_ids(home)
        finally:
            if gateway is not None:
                gateway.ensure_dead()
            upstream.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                upstream.wait(10)
    return _report(tally, led, rss, peak, fds, elapsed, stop_status, verified, verify_line, len(pending))


async def _drive_and_sample(
    gateway: GatewayProcess,
    port: int,
    token: str,
    connections: int,
    seconds: float,
    warmup: float,
    tally: Tally,
    rss: dict[str, float],
) -> None:
    drive = asyncio.ensure_future(_drive(port, token, connections, seconds, tally))
    await asyncio.sleep(warmup)
    rss["warm"] = gateway.rss_mib()
    last = time.monotonic()
    while not drive.done():
        await asyncio.sleep(0.5)
        if time.monotonic() - last >= 60:
            last = time.monotonic()
            sent = sum(tally.sent.values())
            print(
                f"  {sent} sent, rss {gateway.rss_mib():.1f} MiB, fds {gateway.open_fds()}, "
                f"unexpected {tally.unexpected_count}",
                flush=True,
            )
    await drive


def _report(
    tally: Tally,
    led: Ledger,
    rss: dict[str, float],
    peak: float,
    fds: dict[str, int],
    elapsed: float,
    stop_status: int,
    verified: bool,
    verify_line: str,
    pending: int,
) -> int:
    sent = sum(tally.sent.values())
    answered = len(tally.chat_ids) + len(tally.listing_ids)
    rows = [
        ("duration", f"{elapsed:.1f} s"),
        ("requests sent", f"{sent} ({sent / elapsed:.0f}/s)"),
        ("  by kind", ", ".join(f"{k} {n}" for k, n in sorted(tally.sent.items()))),
        ("answers by status", ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))),
        ("client-aborted streams", str(tally.aborted)),
        ("unexpected errors", str(tally.unexpected_count)),
        ("  by kind", ", ".join(f"{k}: {n}" for k, n in tally.unexpected_by.most_common(8)) or "none"),
        (
            "gateway RSS MiB start/warm/end",
            f"{rss['start']:.1f} / {rss['warm']:.1f} / {rss['end']:.1f} (peak {peak:.1f})",
        ),
        ("gateway open fds start/end", f"{fds['start']} / {fds['end']}"),
        ("gateway exit on SIGTERM", str(stop_status)),
        ("answered (chat + listings)", f"{len(tally.chat_ids)} + {len(tally.listing_ids)} = {answered}"),
        ("ledger request/outcome/listing", f"{led.requests} / {led.outcomes} / {led.listings}"),
        ("  outcomes client_closed", str(led.client_closed)),
        ("  missing request/outcome", f"{led.missing_request} / {led.missing_outcome}"),
        ("  duplicate outcomes, unseen", f"{led.extra_outcomes}, {led.unseen}"),
        ("  other records", ", ".join(f"{k} {n}" for k, n in sorted(led.other.items())) or "none"),
        ("audit pending", str(pending)),
        ("audit verify", verify_line),
    ]
    width = max(len(name) for name, _ in rows) + 2
    print("\nPhi Gateway soak")
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    for line in tally.unexpected:
        print(f"  unexpected: {line}")
    failures = []
    if tally.unexpected_count:
        failures.append(f"{tally.unexpected_count} unexpected answers")
    if led.problems:
        failures.append("ledger records do not match the answered requests")
    if pending:
        failures.append(f"{pending} requests pending after an orderly stop")
    if not verified:
        failures.append("audit verify failed")
    if stop_status != 0:
        failures.append(f"the gateway exited with {stop_status} on SIGTERM")
    print(f"\nresult: {'FAIL: ' + '; '.join(failures) if failures else 'PASS'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
