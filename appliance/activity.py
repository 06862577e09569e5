"""What a running gateway is doing now: request counters, per-second series and today's spend, all taken
from its durable ledger records.

Owns: the Prometheus counters and histograms of answered requests (``phi_requests_total``, durations,
time to first token, tokens, cost, refusals, the ledger's commit lag), the dashboard's per-second series
(requests/s, error rate, p50/p99 latency, tokens/s over the last ``WINDOW_S`` seconds), totals since start,
spend today by caller and by route (rebuilt from the ledger at start), local models' tokens per second, and
the wake-up of the admin socket's audit streams.

Fed by ``Ledger.watch``: the writer thread only appends each committed batch to a deque (and wakes the
streams); the event loop drains it when anyone reads (``/admin/activity``, ``/metrics``) and once a second.
A request is counted when the record of its answer is durable, so the numbers agree with the ledger by
construction. Records the gateway's own writer did not write (an operator's CLI command) are not counted.

Never: keeps a record beyond the fields it counts; labels a metric with a string a caller chose freely
(a model label is one of at most ``MAX_MODEL_LABELS``, the rest are "other"; refusals of unknown models
carry no model); holds a token, a key or any text of a request.
"""

from __future__ import annotations

import asyncio
import bisect
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance import timestamps
from appliance.ledger.store import first_seq_at

WINDOW_S: Final = 120
"""Seconds of per-second history the dashboard draws."""
NOW_S: Final = 10
"""The "now" figures are over this many last seconds."""
MAX_MODEL_LABELS: Final = 200
"""Distinct model labels in the metrics; a policy glob lets callers name models freely."""
_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LAG_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_ANSWERS: Final = frozenset({"response", "error"})
_REBUILD_SLACK_S: Final = 300.0

Batch = list[tuple[dict[str, Any], int]]


def is_answer(record: dict[str, Any]) -> bool:
    """Whether a record is the answer of a request: its outcome, or its refusal."""
    kind = record.get("type")
    return kind in _ANSWERS or (kind == "intervention" and record.get("decision") == "denied")


@dataclass(slots=True)
class _Second:
    """One second of answers."""

    at: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    percentiles: tuple[float | None, float | None] | None = None  # computed once the second is over

    def quantiles(self, closed: bool) -> tuple[float | None, float | None]:
        if self.percentiles is not None:
            return self.percentiles
        ordered = sorted(self.latencies)
        result = (_quantile(ordered, 0.5), _quantile(ordered, 0.99))
        if closed:
            self.percentiles = result
        return result


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


class _Spend:
    """Spend and answers of one UTC day, by caller and by route."""

    def __init__(self, day: str) -> None:
        self.day = day
        self.by_caller: dict[str, list[float]] = {}
        self.by_route: dict[str, list[float]] = {}

    def add(self, caller: str | None, route: str | None, cost: float, requests: int = 1) -> None:
        for table, key in ((self.by_caller, caller or "(unidentified)"), (self.by_route, route or "(none)")):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += cost
            entry[1] += requests

    def document(self) -> dict[str, Any]:
        def rows(table: dict[str, list[float]], name: str) -> list[dict[str, Any]]:
            ordered = sorted(table.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
            return [{name: key, "cost_usd": round(v[0], 6), "requests": int(v[1])} for key, v in ordered]

        return {
            "date": self.day,
            "total_usd": round(sum(v[0] for v in self.by_caller.values()), 6),
            "by_caller": rows(self.by_caller, "caller"),
            "by_route": rows(self.by_route, "route"),
        }


class Activity:
    """Counts what the ledger says was answered; read by the admin socket and ``/metrics``."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: deque[tuple[float, Batch]] = deque()
        self._seconds: deque[_Second] = deque()
        self._spend = _Spend(_day(clock()))
        self.totals = {"requests": 0, "errors": 0, "refusals": 0, "tokens_in": 0, "tokens_out": 0}
        self.cost_usd = 0.0
        self._models: set[str] = set()
        self._local: dict[str, deque[tuple[float, int]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: set[asyncio.Event] = set()
        labels = ["route", "model"]
        self.requests = Counter(
            "phi_requests",
            "Requests answered, by route, model, status and decision (counted from their ledger records)",
            ["route", "model", "status", "decision"],
            registry=registry,
        )
        self.duration = Histogram(
            "phi_request_duration_seconds",
            "Time from a request's arrival to its answer's record (latency_ms of the ledger), by route",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "phi_time_to_first_token_seconds",
            "Streamed answers: time from the request's arrival to its first chunk sent, by route",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.tokens_in = Counter("phi_input_tokens", "Input (prompt) tokens", labels, registry=registry)
        self.tokens_out = Counter(
            "phi_output_tokens", "Output (completion) tokens", labels, registry=registry
        )
        self.cost = Counter(
            "phi_cost_usd", "Spend in US dollars, at the policy's prices", labels, registry=registry
        )
        self.refusals = Counter(
            "phi_refusals",
            "Requests refused, by intervention (policy_denied, rate_limited, ...; 'none' for errors such as "
            "401) and status",
            ["intervention", "status"],
            registry=registry,
        )
        self.commit_lag = Histogram(
            "phi_ledger_append_lag_seconds",
            "Time from a record's append to its commit (the oldest record of each committed batch)",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )

    # -- feeding ----------------------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that drains and whose audit streams are woken (the gateway's)."""
        self._loop = loop

    def take(self, batch: Batch) -> None:
        """``Ledger.watch``'s callback (writer thread): keep the batch for the next drain, wake streams."""
        self._pending.append((self._clock(), batch))
        loop = self._loop
        if self._listeners and loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop closed: nobody listens any more
                pass

    def rebuild(self, conn: sqlite3.Connection) -> int:
        """Today's spend by caller and route from the ledger (at start); returns the answers read."""
        now = self._clock()
        day_start = timestamps.rfc3339(float(int(now // 86400) * 86400))
        first = first_seq_at(conn, timestamps.rfc3339(float(int(now // 86400) * 86400) - _REBUILD_SLACK_S))
        rows = conn.execute(_TODAY_SQL, {"first": first, "day": day_start}).fetchall()
        spend = _Spend(_day(now))
        answers = 0
        for caller, route, count, cost in rows:
            spend.add(caller, route, float(cost or 0.0), int(count))
            answers += int(count)
        self._spend = spend
        return answers

    def first_byte(self, route: str | None, seconds: float) -> None:
        """A streamed answer's first chunk left ``seconds`` after its request arrived."""
        self.first_token.labels(route or "").observe(seconds)

    # -- reading ----------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Count every batch committed since the last drain (event loop)."""
        while self._pending:
            committed, batch = self._pending.popleft()
            self._count(committed, batch)
        self._trim(int(self._clock()))

    def series(self) -> dict[str, Any]:
        """The per-second series of the last ``WINDOW_S`` seconds (oldest first) and the "now" figures."""
        self.drain()
        now = int(self._clock())
        by_second = {second.at: second for second in self._seconds}
        requests: list[float] = []
        errors: list[float] = []
        tokens: list[float] = []
        p50: list[float | None] = []
        p99: list[float | None] = []
        for at in range(now - WINDOW_S + 1, now + 1):
            second = by_second.get(at)
            if second is None:
                requests.append(0.0)
                errors.append(0.0)
                p50.append(None)
                p99.append(None)
                tokens.append(0.0)
                continue
            low, high = second.quantiles(closed=at < now)
            requests.append(float(second.requests))
            errors.append(round(second.errors / second.requests, 4) if second.requests else 0.0)
            p50.append(low)
            p99.append(high)
            tokens.append(float(second.tokens))
        recent = [s for s in self._seconds if s.at > now - NOW_S]
        answered = sum(s.requests for s in recent)
        latencies = sorted(value for s in recent for value in s.latencies)
        return {
            "series": {
                "requests_per_s": requests,
                "error_rate": errors,
                "p50_ms": p50,
                "p99_ms": p99,
                "tokens_per_s": tokens,
            },
            "now": {
                "requests_per_s": round(answered / NOW_S, 2),
                "error_rate": round(sum(s.errors for s in recent) / answered, 4) if answered else 0.0,
                "p50_ms": _quantile(latencies, 0.5),
                "p99_ms": _quantile(latencies, 0.99),
                "tokens_per_s": round(sum(s.tokens for s in recent) / NOW_S, 2),
            },
        }

    def spend_today(self) -> dict[str, Any]:
        self.drain()
        day = _day(self._clock())
        if day != self._spend.day:  # a quiet midnight: nothing was counted since
            self._spend = _Spend(day)
        return self._spend.document()

    def local_rates(self, status: dict[str, Any]) -> dict[str, float]:
        """Generated tokens per second of each local model over the last ``NOW_S`` seconds, from the
        running totals its status reports (sampled at each call; the gateway samples once a second)."""
        now = self._clock()
        rates: dict[str, float] = {}
        for name, row in status.items():
            total = row.get("generated_tokens") if isinstance(row, dict) else None
            if not isinstance(total, int):
                self._local.pop(name, None)
                rates[name] = 0.0
                continue
            samples = self._local.setdefault(name, deque())
            if samples and total < samples[-1][1]:  # reloaded: its count started again
                samples.clear()
            samples.append((now, total))
            while len(samples) > 1 and samples[0][0] < now - NOW_S:
                samples.popleft()
            first_at, first_total = samples[0]
            rates[name] = round((total - first_total) / (now - first_at), 2) if now > first_at else 0.0
        return rates

    # -- the audit streams --------------------------------------------------------------------------------

    def listen(self) -> asyncio.Event:
        """An event set whenever records were committed (the admin socket's audit stream waits on it)."""
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    def unlisten(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)

    def wake_all(self) -> None:
        """Wake every stream (they look again, and end if the gateway is stopping)."""
        self._wake()

    def _wake(self) -> None:
        for event in self._listeners:
            event.set()

    # -- internals --------------------------------------------------------------------------------------

    def _count(self, committed: float, batch: Batch) -> None:
        day = _day(committed)
        if day != self._spend.day:  # midnight (UTC): today's spend starts again
            self._spend = _Spend(day)
        second = self._second(int(committed))
        oldest: float | None = None
        for record, _ in batch:
            if oldest is None:
                oldest = timestamps.epoch(record.get("ts"))
            if is_answer(record):
                self._answer(record, second)
        if oldest is not None and committed >= oldest:
            self.commit_lag.observe(committed - oldest)

    def _answer(self, record: dict[str, Any], second: _Second) -> None:
        status = record.get("status_code")
        status = status if isinstance(status, int) else 0
        decision = record.get("decision") or ""
        route = record.get("route") or ""
        denied = decision == "denied"
        model = "" if denied else self._model_label(record.get("model"))
        tokens_in, tokens_out = _int(record.get("tokens_in")), _int(record.get("tokens_out"))
        cost = record.get("cost_usd")
        cost = float(cost) if isinstance(cost, int | float) else 0.0
        latency = record.get("latency_ms")
        self.requests.labels(route, model, str(status), decision).inc()
        if isinstance(latency, int | float):
            self.duration.labels(route).observe(latency / 1000.0)
            second.latencies.append(float(latency))
        if tokens_in:
            self.tokens_in.labels(route, model).inc(tokens_in)
        if tokens_out:
            self.tokens_out.labels(route, model).inc(tokens_out)
        if cost:
            self.cost.labels(route, model).inc(cost)
        if denied:
            self.refusals.labels(record.get("intervention") or "none", str(status)).inc()
        second.requests += 1
        second.tokens += tokens_out
        if status >= 400:
            second.errors += 1
        totals = self.totals
        totals["requests"] += 1
        if denied:
            totals["refusals"] += 1
        elif status >= 400:
            totals["errors"] += 1
        totals["tokens_in"] += tokens_in
        totals["tokens_out"] += tokens_out
        self.cost_usd += cost
        self._spend.add(record.get("claw_id"), record.get("route"), cost)

    def _model_label(self, model: Any) -> str:
        if not isinstance(model, str) or not model:
            return ""
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODEL_LABELS:
            return "other"
        self._models.add(model)
        return model

    def _second(self, at: int) -> _Second:
        seconds = self._seconds
        if seconds and seconds[-1].at == at:
            return seconds[-1]
        if not seconds or seconds[-1].at < at:
            seconds.append(_Second(at))
            return seconds[-1]
        # A batch committed before the newest second (a drain that ran late): find or insert its second.
        ats = [s.at for s in seconds]
        index = bisect.bisect_left(ats, at)
        if index < len(seconds) and seconds[index].at == at:
            return seconds[index]
        second = _Second(at)
        seconds.insert(index, second)
        return second

    def _trim(self, now: int) -> None:
        while self._seconds and self._seconds[0].at <= now - WINDOW_S:
            self._seconds.popleft()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d")


# Today's answers by caller and route: outcomes, and refusals (an intervention record denying the request).
_TODAY_SQL = (
    "SELECT c, rt, count(*), total(cost) FROM ("
    " SELECT claw_id AS c, json_extract(record, '$.route') AS rt, json_extract(record, '$.cost_usd') AS cost"
    " FROM ledger WHERE seq >= :first AND ts >= :day AND (type IN ('response', 'error')"
    " OR (type = 'intervention' AND json_extract(record, '$.decision') = 'denied'))"
    " LIMIT -1) GROUP BY c, rt"
)
