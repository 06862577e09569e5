"""Limits and budgets: each cap stops at its limit with the right code, rule and Retry-After; windows
slide, days and months roll over; settlement, expiry, concurrency (threads, tasks), rebuild from ledger."""

from __future__ import annotations

import asyncio
import calendar
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import LimitReached, RateLimited
from appliance.ledger.chain import GENESIS
from appliance.ledger.store import MIGRATIONS, Ledger
from appliance.pipeline.limits import (
    DEFAULT_MAX_TOKENS,
    IN_FLIGHT_RETRY_S,
    TICKET_TIMEOUT_S,
    LimitKeeper,
    Subject,
    Ticket,
    estimate_tokens,
)
from appliance.policy.limits_schema import Rate, RoleBudgets, RoleLimits, Spend
from appliance.vault.db import Database

NOV_20_NOON = float(calendar.timegm((2026, 11, 20, 12, 0, 0)))
ALICE = Subject("alice", "stmarys", "radiology")
BOB = Subject("bob", "stmarys", "radiology")
CAROL = Subject("carol", "stmarys", "billing")
ROLE = "organizations.stmarys.roles.radiology"


class Clock:
    def __init__(self, t: float = NOV_20_NOON) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keeper(clock: Clock) -> LimitKeeper:
    return LimitKeeper(clock)


def _admit(
    keeper: LimitKeeper,
    subject: Subject = ALICE,
    *,
    limits: RoleLimits | None = None,
    budgets: RoleBudgets | None = None,
    org: Spend | None = None,
    tokens: int = 100,
    cost: float = 0.0,
) -> Ticket:
    return keeper.admit(subject, limits, budgets, org, estimated_tokens=tokens, estimated_cost_usd=cost)


def _refused(keeper: LimitKeeper, subject: Subject = ALICE, **kwargs: Any) -> LimitReached:
    with pytest.raises(LimitReached) as info:
        _admit(keeper, subject, **kwargs)
    return info.value


def test_estimate_reserves_prompt_and_completion_with_a_default() -> None:
    assert estimate_tokens(400, 50) == 150
    assert estimate_tokens(401, 50) == 151  # a partial token counts
    assert estimate_tokens(0, None) == DEFAULT_MAX_TOKENS == 1024


# -- each limit stops at its cap ----------------------------------------------------------------------------

RATE_CASES = [
    # (limits, subjects admitted in turn, refused subject, rule)
    (RoleLimits(per_caller=Rate(requests_per_min=3)), [ALICE] * 3, ALICE, "per_caller.requests_per_min"),
    (RoleLimits(per_caller=Rate(tokens_per_min=300)), [ALICE] * 3, ALICE, "per_caller.tokens_per_min"),
    (RoleLimits(per_role=Rate(requests_per_min=3)), [ALICE, BOB, ALICE], BOB, "per_role.requests_per_min"),
    (RoleLimits(per_role=Rate(tokens_per_min=300)), [ALICE, BOB, BOB], ALICE, "per_role.tokens_per_min"),
]


@pytest.mark.parametrize(("limits", "admitted", "refused", "rule"), RATE_CASES)
def test_rate_limits_stop_at_the_cap(
    keeper: LimitKeeper,
    clock: Clock,
    limits: RoleLimits,
    admitted: list[Subject],
    refused: Subject,
    rule: str,
) -> None:
    for subject in admitted:
        _admit(keeper, subject, limits=limits, tokens=100)
        clock.advance(10)
    error = _refused(keeper, refused, limits=limits, tokens=100)
    assert isinstance(error, RateLimited) and error.status == 429
    assert error.code == "rate_limited"
    assert error.rule == f"{ROLE}.limits.{rule}"
    assert error.retry_after == 30  # the first admission (30 s ago) leaves the window in 30 s
    assert error.headers == [(b"Retry-After", b"30")]
    assert json.loads(error.body())["error"]["code"] == "rate_limited"
    # another role is counted apart, and (for per-caller rules) so is another caller
    _admit(keeper, CAROL, limits=limits, tokens=100)
    if "per_caller" in rule:
        _admit(keeper, BOB, limits=limits, tokens=100)


BUDGET_CASES = [
    # (budgets, org budget, other subject sharing the counter, rule, retry_after)
    (
        RoleBudgets(per_caller=Spend(usd_per_day=1.0)),
        None,
        None,
        f"{ROLE}.budgets.per_caller.usd_per_day",
        12 * 3600,
    ),
    (
        RoleBudgets(per_caller=Spend(usd_per_month=1.0)),
        None,
        None,
        f"{ROLE}.budgets.per_caller.usd_per_month",
        10 * 86400 + 12 * 3600,  # until 1 December
    ),
    (
        RoleBudgets(per_role=Spend(usd_per_day=1.0)),
        None,
        BOB,
        f"{ROLE}.budgets.per_role.usd_per_day",
        12 * 3600,
    ),
    (
        RoleBudgets(per_role=Spend(usd_per_month=1.0)),
        None,
        BOB,
        f"{ROLE}.budgets.per_role.usd_per_month",
        10 * 86400 + 12 * 3600,
    ),
    (None, Spend(usd_per_day=1.0), CAROL, "organizations.stmarys.budgets.usd_per_day", 12 * 3600),
    (
        None,
        Spend(usd_per_month=1.0),
        CAROL,
        "organizations.stmarys.budgets.usd_per_month",
        10 * 86400 + 12 * 3600,
    ),
]


@pytest.mark.parametrize(("budgets", "org", "sharer", "rule", "retry"), BUDGET_CASES)
def test_budgets_stop_at_the_cap(
    keeper: LimitKeeper,
    budgets: RoleBudgets | None,
    org: Spend | None,
    sharer: Subject | None,
    rule: str,
    retry: int,
) -> None:
    spenders = [ALICE, sharer or ALICE]
    for subject in spenders:
        ticket = _admit(keeper, subject, budgets=budgets, org=org, cost=0.25)
        keeper.settle(ticket, tokens=100, cost_usd=0.5)  # actual: exactly the cap between them
    error = _refused(keeper, ALICE, budgets=budgets, org=org, cost=0.01)
    assert error.code == "budget_exceeded" and error.status == 429
    assert error.rule == rule
    assert error.retry_after == retry
    assert error.headers == [(b"Retry-After", str(retry).encode())]
    # a zero-cost request still fits (the cap is reached, not exceeded)
    _admit(keeper, ALICE, budgets=budgets, org=org, cost=0.0)
    # someone outside the counter is unaffected
    outsider = (
        Subject("dave", "stmarys", "billing") if sharer is None else Subject("erin", "other", "radiology")
    )
    _admit(keeper, outsider, budgets=budgets, org=org, cost=0.5)


def test_the_refusal_names_the_rule_that_needs_the_longest_wait(keeper: LimitKeeper) -> None:
    limits = RoleLimits(per_caller=Rate(requests_per_min=1))
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=0.1))
    keeper.settle(_admit(keeper, limits=limits, budgets=budgets, cost=0.1), tokens=1, cost_usd=0.1)
    error = _refused(keeper, limits=limits, budgets=budgets, cost=0.1)
    assert error.rule == f"{ROLE}.budgets.per_caller.usd_per_day" and error.retry_after == 12 * 3600


def test_a_refused_request_counts_for_nothing(keeper: LimitKeeper, clock: Clock) -> None:
    limits = RoleLimits(per_caller=Rate(requests_per_min=2))
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=1.0))
    _admit(keeper, limits=limits, budgets=budgets, cost=0.5)
    _refused(keeper, limits=limits, budgets=budgets, cost=0.6)
    snap = keeper.snapshot(ALICE)["caller"]
    assert snap["requests_last_min"] == 1 and snap["usd_today"] == pytest.approx(0.5)
    _admit(keeper, limits=limits, budgets=budgets, cost=0.5)


# -- windows slide, days and months roll over --------------------------------------------------------------


def test_the_window_slides(keeper: LimitKeeper, clock: Clock) -> None:
    limits = RoleLimits(per_caller=Rate(requests_per_min=3, tokens_per_min=1000))
    for _ in range(3):
        _admit(keeper, limits=limits, tokens=200)
        clock.advance(10)
    assert _refused(keeper, limits=limits, tokens=200).retry_after == 30
    clock.advance(29.5)
    assert _refused(keeper, limits=limits, tokens=200).retry_after == 1  # 0.5 s, rounded up
    clock.advance(0.5)  # the first admission is now exactly 60 s old: out of the window
    _admit(keeper, limits=limits, tokens=200)
    snap = keeper.snapshot(ALICE)["caller"]
    assert (snap["requests_last_min"], snap["tokens_last_min"]) == (3, 600)
    # 500 more tokens need the oldest (t=10) gone, and so does a 4th request: both 10 s, the first named
    error = _refused(keeper, limits=limits, tokens=500)
    assert error.rule.endswith("per_caller.requests_per_min") and error.retry_after == 10
    error = _refused(keeper, limits=limits, tokens=900)  # 900 more need all three gone: the longest wait
    assert error.rule.endswith("per_caller.tokens_per_min") and error.retry_after == 60
    clock.advance(60)
    assert keeper.snapshot(ALICE)["caller"]["requests_last_min"] == 0


def test_a_request_bigger_than_the_token_cap_waits_for_an_empty_window(
    keeper: LimitKeeper, clock: Clock
) -> None:
    limits = RoleLimits(per_caller=Rate(tokens_per_min=1000))
    _admit(keeper, limits=limits, tokens=10)
    clock.advance(5)
    assert _refused(keeper, limits=limits, tokens=5000).retry_after == 55
    clock.advance(55)
    _admit(keeper, limits=limits, tokens=5000)
    assert _refused(keeper, limits=limits, tokens=1).retry_after == 60


def test_the_day_rolls_over_at_utc_midnight(keeper: LimitKeeper, clock: Clock) -> None:
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=1.0, usd_per_month=1.5))
    clock.t = calendar.timegm((2026, 11, 20, 23, 59, 50))
    keeper.settle(_admit(keeper, budgets=budgets, cost=1.0), tokens=1, cost_usd=1.0)
    assert _refused(keeper, budgets=budgets, cost=0.1).retry_after == 10
    clock.advance(10)
    keeper.settle(_admit(keeper, budgets=budgets, cost=0.5), tokens=1, cost_usd=0.5)
    snap = keeper.snapshot(ALICE)
    assert snap["day"] == "2026-11-21"
    assert snap["caller"]["usd_today"] == pytest.approx(0.5)
    assert snap["caller"]["usd_this_month"] == pytest.approx(1.5)
    error = _refused(keeper, budgets=budgets, cost=0.1)  # the month cap now binds: until 1 December
    assert error.rule.endswith("usd_per_month")
    assert error.retry_after == calendar.timegm((2026, 12, 1, 0, 0, 0)) - clock.t == 10 * 86400


def test_the_month_rolls_over(keeper: LimitKeeper, clock: Clock) -> None:
    org = Spend(usd_per_month=2.0)
    clock.t = calendar.timegm((2026, 12, 31, 23, 59, 0))
    keeper.settle(_admit(keeper, org=org, cost=2.0), tokens=1, cost_usd=2.0)
    error = _refused(keeper, org=org, cost=0.01)
    assert error.rule == "organizations.stmarys.budgets.usd_per_month" and error.retry_after == 60
    clock.advance(60)
    _admit(keeper, org=org, cost=2.0)
    snap = keeper.snapshot(ALICE)
    assert snap["month"] == "2027-01" and snap["organization"]["usd_this_month"] == pytest.approx(2.0)


# -- settlement and expiry -----------------------------------------------------------------------------------


def test_settle_replaces_the_reservation(keeper: LimitKeeper) -> None:
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=1.0))
    limits = RoleLimits(per_caller=Rate(tokens_per_min=1000))
    ticket = _admit(keeper, limits=limits, budgets=budgets, tokens=900, cost=0.9)
    assert ticket.state == "open" and (ticket.tokens, ticket.cost_usd) == (900, 0.9)
    _refused(keeper, limits=limits, budgets=budgets, tokens=200, cost=0.05)
    keeper.settle(ticket, tokens=300, cost_usd=0.3)  # cheaper than estimated: frees budget and tokens
    assert ticket.state == "settled"
    snap = keeper.snapshot(ALICE)["caller"]
    assert (snap["tokens_last_min"], snap["usd_today"], snap["usd_in_flight"]) == (
        300,
        pytest.approx(0.3),
        0.0,
    )
    second = _admit(keeper, limits=limits, budgets=budgets, tokens=200, cost=0.5)
    keeper.settle(second, tokens=650, cost_usd=0.8)  # dearer: counts in full, over the cap
    snap = keeper.snapshot(ALICE)["caller"]
    assert (snap["tokens_last_min"], snap["usd_today"]) == (950, pytest.approx(1.1))
    keeper.settle(second, tokens=1, cost_usd=0.0)  # idempotent
    assert keeper.snapshot(ALICE)["caller"]["usd_today"] == pytest.approx(1.1)
    assert _refused(keeper, budgets=budgets, cost=0.01).rule.endswith("usd_per_day")
    _admit(keeper, budgets=budgets, cost=0.0)  # a free request (a local model) cannot overspend


def test_a_budget_full_of_reservations_asks_for_a_short_retry(keeper: LimitKeeper) -> None:
    budgets = RoleBudgets(per_role=Spend(usd_per_day=1.0))
    held = _admit(keeper, budgets=budgets, cost=0.8)
    error = _refused(keeper, BOB, budgets=budgets, cost=0.5)
    assert error.retry_after == IN_FLIGHT_RETRY_S
    keeper.settle(held, tokens=1, cost_usd=0.1)
    _admit(keeper, BOB, budgets=budgets, cost=0.5)


def test_an_unsettled_ticket_is_released_after_the_timeout(keeper: LimitKeeper, clock: Clock) -> None:
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=1.0))
    limits = RoleLimits(per_caller=Rate(requests_per_min=10))
    crashed = _admit(keeper, limits=limits, budgets=budgets, cost=1.0)
    assert keeper.snapshot(ALICE)["caller"]["in_flight"] == 1
    clock.advance(TICKET_TIMEOUT_S - 1)
    _refused(keeper, budgets=budgets, cost=0.5)
    clock.advance(1)
    _admit(keeper, budgets=budgets, cost=0.5)  # the crashed request's reservation is gone
    assert crashed.state == "expired"
    snap = keeper.snapshot(ALICE)["caller"]
    assert snap["usd_today"] == pytest.approx(0.5) and snap["in_flight"] == 1
    # a stream that outlived the timeout still has its actual usage counted when it ends
    keeper.settle(crashed, tokens=70, cost_usd=0.25)
    snap = keeper.snapshot(ALICE)["caller"]
    assert (snap["usd_today"], snap["tokens_last_min"]) == (pytest.approx(0.75), 170)
    keeper.settle(crashed, tokens=70, cost_usd=0.25)
    assert keeper.snapshot(ALICE)["caller"]["usd_today"] == pytest.approx(0.75)


def test_idle_keys_are_dropped(keeper: LimitKeeper, clock: Clock) -> None:
    for i in range(1000):
        keeper.settle(_admit(keeper, Subject(f"c{i}", "stmarys", "radiology")), tokens=1, cost_usd=0.0)
    clock.advance(120)
    _admit(keeper)
    assert len(keeper._caller_windows) == 1  # memory follows the last minute's traffic, not history


# -- concurrency: the cap holds exactly ---------------------------------------------------------------------


def _admit_in_threads(keeper: LimitKeeper, n: int, **kwargs: Any) -> tuple[list[Ticket], list[LimitReached]]:
    barrier = threading.Barrier(n)
    admitted: list[Ticket] = []
    refused: list[LimitReached] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        subject = Subject(f"caller-{i % 8}", "stmarys", "radiology")
        barrier.wait()
        try:
            ticket = _admit(keeper, subject, **kwargs)
        except LimitReached as exc:
            with lock:
                refused.append(exc)
        else:
            with lock:
                admitted.append(ticket)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return admitted, refused


def test_64_threads_never_overshoot_a_rate_cap(keeper: LimitKeeper) -> None:
    limits = RoleLimits(per_role=Rate(requests_per_min=10, tokens_per_min=100_000))
    admitted, refused = _admit_in_threads(keeper, 64, limits=limits, tokens=100)
    assert (len(admitted), len(refused)) == (10, 54)
    assert {e.rule for e in refused} == {f"{ROLE}.limits.per_role.requests_per_min"}
    tokens = RoleLimits(per_role=Rate(tokens_per_min=1000))
    admitted, refused = _admit_in_threads(LimitKeeper(Clock()), 64, limits=tokens, tokens=150)
    assert (len(admitted), len(refused)) == (6, 58)  # 6 * 150 = 900 reserved; a 7th would make 1050


def test_64_threads_never_overshoot_a_budget_beyond_the_admitted(keeper: LimitKeeper) -> None:
    budgets = RoleBudgets(per_role=Spend(usd_per_day=1.0))
    admitted, refused = _admit_in_threads(keeper, 64, budgets=budgets, cost=0.1)
    assert (len(admitted), len(refused)) == (10, 54)
    assert all(e.code == "budget_exceeded" and e.retry_after == IN_FLIGHT_RETRY_S for e in refused)
    for ticket in admitted:  # each turned out dearer than estimated
        keeper.settle(ticket, tokens=100, cost_usd=0.15)
    spent = keeper.snapshot(ALICE)["role"]["usd_today"]
    assert spent == pytest.approx(1.5)  # the overshoot is exactly the admitted requests' excess
    admitted, refused = _admit_in_threads(keeper, 64, budgets=budgets, cost=0.0)
    assert len(admitted) == 64  # free requests fit; a costing one does not:
    admitted, refused = _admit_in_threads(keeper, 64, budgets=budgets, cost=0.01)
    assert (len(admitted), len(refused)) == (0, 64)
    assert all(e.retry_after == 12 * 3600 for e in refused)


def test_64_tasks_never_overshoot_a_cap(keeper: LimitKeeper) -> None:
    limits = RoleLimits(per_caller=Rate(requests_per_min=10))
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=0.5))

    async def request(i: int, outcomes: list[str]) -> None:
        await asyncio.sleep(0)
        try:
            ticket = _admit(keeper, limits=limits, budgets=budgets, cost=0.1)
        except LimitReached as exc:
            outcomes.append(exc.rule.rsplit(".", 1)[1])
            return
        outcomes.append("admitted")
        await asyncio.sleep(0.001 * (i % 4))  # the upstream call; other tasks admit meanwhile
        keeper.settle(ticket, tokens=10, cost_usd=0.1)

    async def main() -> list[str]:
        outcomes: list[str] = []
        await asyncio.gather(*(request(i, outcomes) for i in range(64)))
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes.count("admitted") == 5  # the budget (5 x 0.1) binds before the rate (10)
    assert outcomes.count("usd_per_day") == 59
    assert keeper.snapshot(ALICE)["caller"]["usd_today"] == pytest.approx(0.5)


# -- rebuild from the ledger --------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    secs, ms = divmod(int(ts * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs)) + f"{ms:03d}Z"


def _outcome(
    ts: float, subject: Subject, cost: float, tokens: tuple[int, int] = (10, 5), **extra: Any
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "ts": _iso(ts),
        "type": "response",
        "claw_id": subject.caller,
        "org": subject.org,
        "role": subject.role,
        "model": "openai/gpt-4o-mini",
        "status_code": 200,
        "decision": "allowed",
        "tokens_in": tokens[0],
        "tokens_out": tokens[1],
        "cost_usd": cost,
        "request_id": f"req-{ts}-{subject.caller}",
    }
    record.update(extra)
    return record


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "vault.db", MIGRATIONS) as database:
        yield database


def test_rebuild_from_the_ledger(db: Database, clock: Clock) -> None:
    ledger = Ledger(db, None)
    now = clock.t
    records = [
        _outcome(calendar.timegm((2026, 10, 31, 23, 0, 0)), ALICE, 9.0),  # last month: not counted
        _outcome(now - 2 * 86400, ALICE, 1.0),
        _outcome(now - 3600, ALICE, 0.25),
        _outcome(now - 3600, BOB, 0.5, type="error", status_code=502),  # admitted, failed upstream: counts
        _outcome(now - 90, BOB, 0.125),
        _outcome(now - 30, ALICE, 0.0625, tokens=(100, 50)),
        _outcome(now - 10, ALICE, 0.0625, tokens=(200, 0)),
        _outcome(now - 5, CAROL, 2.0),
        {"ts": _iso(now - 20), "type": "request", "claw_id": "alice", "org": "stmarys", "role": "radiology"},
        _outcome(now - 4, ALICE, 0.0, type="error", status_code=429, tokens=(0, 0)),  # refused: not counted
        # denied by the policy: not counted
        _outcome(now - 3, ALICE, 0.0, type="error", status_code=403, decision="denied"),
        {"ts": _iso(now - 2), "type": "error", "status_code": 401, "detail": "invalid_api_key"},  # nobody
    ]
    for record in records:
        ledger.append_sync(record)
    keeper = LimitKeeper(clock)
    stale = _admit(keeper, cost=5.0)
    assert keeper.rebuild(db) == 8  # the outcomes of this month that were admitted (and the anonymous one)
    snap = keeper.snapshot(ALICE)
    assert snap["caller"] == {
        "requests_last_min": 2,
        "tokens_last_min": 350,
        "usd_today": pytest.approx(0.375),
        "usd_this_month": pytest.approx(1.375),
        "usd_in_flight": 0.0,
        "in_flight": 0,
    }
    assert snap["role"]["requests_last_min"] == 2
    assert snap["role"]["usd_today"] == pytest.approx(1.0)
    assert snap["role"]["usd_this_month"] == pytest.approx(2.0)
    assert snap["organization"]["usd_this_month"] == pytest.approx(4.0)
    assert keeper.snapshot(CAROL)["role"]["usd_today"] == pytest.approx(2.0)
    keeper.settle(stale, tokens=10, cost_usd=5.0)  # admitted before the rebuild: the ledger already decides
    assert keeper.snapshot(ALICE)["organization"]["usd_this_month"] == pytest.approx(4.0)
    # the rebuilt counters bind admission
    error = _refused(keeper, budgets=RoleBudgets(per_caller=Spend(usd_per_month=1.4)), cost=0.05)
    assert error.rule == f"{ROLE}.budgets.per_caller.usd_per_month"
    error = _refused(keeper, limits=RoleLimits(per_caller=Rate(requests_per_min=2)))
    assert error.retry_after == 30  # the older of the two (30 s ago) leaves in 30 s


def test_rebuild_of_an_empty_ledger(db: Database, keeper: LimitKeeper) -> None:
    assert keeper.rebuild(db) == 0
    assert keeper.snapshot(ALICE)["caller"]["usd_this_month"] == 0.0


def test_rebuild_of_200k_records_is_fast(db: Database, clock: Clock) -> None:
    month_start = calendar.timegm((2026, 11, 1, 0, 0, 0))
    span = clock.t - month_start
    n = 200_000

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            subject = Subject(f"c{i % 300}", f"o{i % 3}", f"r{i % 20}")
            record = dict.fromkeys(Ledger.FIELDS)
            record.update(_outcome(month_start + span * i / n, subject, 0.001))
            record["type"] = "request" if i % 2 else "response"
            text = json.dumps(record, separators=(",", ":"))
            yield (
                i + 1,
                record["ts"],
                record["type"],
                record["request_id"],
                record["claw_id"],
                text,
                GENESIS,
                GENESIS,
            )

    # The columns the ledger writes, inserted directly: a month of traffic without hashing 200k records.
    conn = sqlite3.connect(db.path)
    with conn:
        conn.executemany(
            "INSERT INTO ledger (seq, ts, type, request_id, claw_id, record, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
    conn.close()
    keeper = LimitKeeper(clock)
    started = time.perf_counter()
    assert keeper.rebuild(db) == n // 2
    elapsed = time.perf_counter() - started
    o0 = sum(1 for i in range(0, n, 2) if i % 3 == 0)
    snap = keeper.snapshot(Subject("c0", "o0", "r0"))
    assert snap["organization"]["usd_this_month"] == pytest.approx(o0 * 0.001)
    assert elapsed < 10  # about 0.25 s on the dev machine


def test_a_budget_429_names_the_settled_spend_the_reservations_and_its_own_estimate(
    keeper: LimitKeeper,
) -> None:
    budgets = RoleBudgets(per_caller=Spend(usd_per_day=1.0))
    settled = _admit(keeper, ALICE, budgets=budgets, cost=0.25)
    keeper.settle(settled, tokens=100, cost_usd=0.5)
    _admit(keeper, ALICE, budgets=budgets, cost=0.3)  # still in flight: reserved, not spent
    error = _refused(keeper, ALICE, budgets=budgets, cost=0.4)
    assert error.code == "budget_exceeded"
    message = str(error)
    assert "1 USD per day" in message
    assert "spent $0.5000" in message
    assert "reserved $0.3000 by requests in flight" in message
    assert "this request estimated at $0.4000" in message


def test_a_shared_budget_429_names_no_other_callers_spend(keeper: LimitKeeper) -> None:
    org = Spend(usd_per_month=100.0)
    settled = _admit(keeper, ALICE, org=org, cost=1.0)  # radiology's caller
    keeper.settle(settled, tokens=100, cost_usd=73.1234)
    _admit(keeper, ALICE, org=org, cost=20.0)  # ... with $20 in flight
    message = str(_refused(keeper, CAROL, org=org, cost=10.0))  # billing's caller
    assert "73.1234" not in message and "20.0000" not in message
    assert "100 USD per month" in message and "shared by the organization" in message
    assert "requests in flight hold part of it" in message and "estimated at $10.0000" in message
