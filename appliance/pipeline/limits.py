"""Rate limits and spend budgets: the counters, the reservations and the 429 (the rules are authored in
``appliance.policy.limits_schema``).

Owns: requests/min and tokens/min per caller and per role over a sliding 60-second window; spend in USD
per UTC day and per UTC month per caller, per role and per organization; the admission decision made
before a request is forwarded (``LimitKeeper.admit``), its ``Ticket`` and the settlement of the actual
usage (``LimitKeeper.settle``); rebuilding the counters from the audit ledger after a restart.

Admission is atomic under one lock: it checks every rule, then counts the request and *reserves* its
estimated tokens and cost in every counter at once. Parallel requests therefore see each other's
reservations, and a cap is never overshot except by requests already admitted (whose actual usage turned
out dearer than their estimate). The estimate is ``estimate_tokens``: prompt characters / 4 plus
``max_tokens``, or ``DEFAULT_MAX_TOKENS`` (1024) when the request sets none, and the cost of that many
tokens from the price table.

Streaming: the reservation holds for the whole stream and is replaced by the actual usage when the stream
ends (``settle``). Tokens count in the window at the moment of admission. A ticket never settled (its
request crashed) is released after ``TICKET_TIMEOUT_S``: the request still counts, its tokens and cost do
not (its ledger record has no outcome either, so a rebuild agrees).

Keys: a caller is counted per ``(org, role, caller)``, a role per ``(org, role)``, an organization per
``org``. Rule ids are the policy paths, e.g.
``organizations.<org>.roles.<role>.limits.per_caller.tokens_per_min``,
``organizations.<org>.roles.<role>.budgets.per_role.usd_per_day``,
``organizations.<org>.budgets.usd_per_month``.

Memory is bounded: window entries older than 60 s are trimmed on use and, for idle keys, by a sweep
every minute; spend counters exist only for keys seen this month.

Must never: block on I/O while holding the lock (``rebuild`` reads the ledger first, then swaps state);
decide anything but limits and budgets; let a refused request count against any counter; put a token
secret, a provider key or prompt text in an error message.
"""

from __future__ import annotations

import calendar
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from appliance import timestamps
from appliance.errors import LimitReached, StorageUnavailable
from appliance.ledger.store import first_seq_at
from appliance.pipeline.counters import WINDOW_S, Entry, SpendCounter, Window, drop_idle, drop_old
from appliance.policy.limits_schema import Rate, RoleBudgets, RoleLimits, Spend
from appliance.vault.db import Database

DEFAULT_MAX_TOKENS: Final = 1024
"""Completion tokens reserved for a request that sets no ``max_tokens`` (conservative for chat turns)."""
TICKET_TIMEOUT_S: Final = 600.0
"""An admitted request not settled after this long is released (its request crashed)."""
IN_FLIGHT_RETRY_S: Final = 5.0
"""Retry-After when a budget is full only because of reservations still in flight (they may free it)."""
_SWEEP_EVERY_S: Final = 60.0
_EPS: Final = 1e-9  # float sums of prices: a cap reached exactly must not read as exceeded
_REBUILD_SLACK_S: Final = 86400.0  # ts may lag seq slightly (lazy writes); search the ledger from a day early


def estimate_tokens(prompt_chars: int, max_tokens: int | None) -> int:
    """What a request reserves: its prompt at ~4 characters a token plus the completion it may produce."""
    return -(-max(0, prompt_chars) // 4) + (DEFAULT_MAX_TOKENS if max_tokens is None else max(0, max_tokens))


@dataclass(frozen=True, slots=True)
class Subject:
    """Who is counted: the caller (token id / claw_id), its organization and role."""

    caller: str
    org: str
    role: str


_OPEN, _SETTLED, _EXPIRED = "open", "settled", "expired"


class Ticket:
    """An admitted request's reservation; hand it to ``LimitKeeper.settle`` when the request ends."""

    __slots__ = (
        "_day",
        "_entries",
        "_generation",
        "_month",
        "admitted_at",
        "cost_usd",
        "state",
        "subject",
        "tokens",
    )

    def __init__(
        self,
        subject: Subject,
        admitted_at: float,
        tokens: int,
        cost_usd: float,
        day: int,
        month: int,
        entries: list[tuple[Window, Entry]],
        generation: int,
    ) -> None:
        self.subject = subject
        self.admitted_at = admitted_at
        self.tokens = tokens
        """Tokens reserved (the estimate)."""
        self.cost_usd = cost_usd
        """USD reserved (the estimate)."""
        self.state = _OPEN
        """``open``, ``settled``, or ``expired`` (released after ``TICKET_TIMEOUT_S``, not yet settled)."""
        self._day = day
        self._month = month
        self._entries = entries
        self._generation = generation


def _periods(now: float) -> tuple[int, int]:
    """The UTC day (days since the epoch) and month (year * 12 + month - 1) of ``now``."""
    t = time.gmtime(now)
    return int(now // 86400), t.tm_year * 12 + t.tm_mon - 1


def _month_start(month: int) -> float:
    year, index = divmod(month, 12)
    return float(calendar.timegm((year, index + 1, 1, 0, 0, 0)))


def _caps(spec: Spend | None) -> tuple[float | None, float | None]:
    return (None, None) if spec is None else (spec.usd_per_day, spec.usd_per_month)


_Refusal = tuple[float, str, str, str]  # retry_after, code, rule, message
_CallerKey = tuple[str, str, str]
_RoleKey = tuple[str, str]


class LimitKeeper:
    """The counters of every caller, role and organization; one per gateway process."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, ticket_timeout_s: float = TICKET_TIMEOUT_S
    ) -> None:
        """``clock``: wall-clock seconds since the epoch (UTC days and months are cut from it)."""
        self._clock = clock
        self._ticket_timeout_s = ticket_timeout_s
        self._lock = threading.Lock()
        self._generation = 0
        self._caller_windows: dict[_CallerKey, Window] = {}
        self._role_windows: dict[_RoleKey, Window] = {}
        self._caller_spend: dict[_CallerKey, SpendCounter] = {}
        self._role_spend: dict[_RoleKey, SpendCounter] = {}
        self._org_spend: dict[str, SpendCounter] = {}
        self._open: dict[Ticket, None] = {}  # in admission order: the oldest expire first
        self._next_sweep = 0.0

    # -- admission ----------------------------------------------------------------------------------------

    def admit(
        self,
        subject: Subject,
        limits: RoleLimits | None,
        role_budgets: RoleBudgets | None,
        org_budget: Spend | None,
        *,
        estimated_tokens: int,
        estimated_cost_usd: float,
    ) -> Ticket:
        """Check every limit and budget of ``subject``; count the request and reserve its estimate.

        Raises ``LimitReached`` (a ``RateLimited``) naming the rule that needs the longest wait, with
        Retry-After rounded up to whole seconds: until enough of the window has slid past, until the next
        UTC midnight or month, or ``IN_FLIGHT_RETRY_S`` when only in-flight reservations fill a budget.
        A request whose estimate alone exceeds a tokens/min cap is admitted once the window is empty; a
        request estimated to cost nothing is never refused by a budget (it cannot add to the spend).
        """
        tokens = max(0, estimated_tokens)
        cost = max(0.0, estimated_cost_usd)
        org, role = subject.org, subject.role
        caller_key = (org, role, subject.caller)
        role_key = (org, role)
        with self._lock:
            now = self._clock()
            day, month = _periods(now)
            self._housekeep(now, month)
            caller_window = self._window(self._caller_windows, caller_key, now)
            role_window = self._window(self._role_windows, role_key, now)
            spends = (
                self._spend(self._caller_spend, caller_key, day, month),
                self._spend(self._role_spend, role_key, day, month),
                self._spend(self._org_spend, org, day, month),
            )
            prefix = f"organizations.{org}.roles.{role}"
            refusals: list[_Refusal] = []
            if limits is not None:
                _check_rate(
                    refusals, caller_window, limits.per_caller, tokens, now, f"{prefix}.limits.per_caller"
                )
                _check_rate(refusals, role_window, limits.per_role, tokens, now, f"{prefix}.limits.per_role")
            if role_budgets is not None:
                _check_spend(
                    refusals, spends[0], role_budgets.per_caller, cost, now, f"{prefix}.budgets.per_caller"
                )
                _check_spend(
                    refusals, spends[1], role_budgets.per_role, cost, now, f"{prefix}.budgets.per_role"
                )
            _check_spend(refusals, spends[2], org_budget, cost, now, f"organizations.{org}.budgets")
            if refusals:
                retry, code, rule, message = max(refusals, key=lambda r: r[0])  # the first of the longest
                raise LimitReached(
                    message, rule=rule, retry_after=float(max(1, math.ceil(retry - 1e-6))), code=code
                )
            entries = [(caller_window, Entry(now, 1, tokens)), (role_window, Entry(now, 1, tokens))]
            for window, entry in entries:
                window.add(entry)
            for spend in spends:
                spend.reserve(cost)
            ticket = Ticket(subject, now, tokens, cost, day, month, entries, self._generation)
            self._open[ticket] = None
            return ticket

    def check_rate(self, subject: Subject, limits: RoleLimits | None) -> None:
        """Before the body is read: refuse at once a caller (or role) already at its requests or tokens per
        minute, so a limited caller cannot hold a connection and a request slot while it sends the body.
        Counts nothing; ``admit`` decides with the request's estimate once the body is known."""
        if limits is None:
            return
        org, role = subject.org, subject.role
        with self._lock:
            now = self._clock()
            refusals: list[_Refusal] = []
            prefix = f"organizations.{org}.roles.{role}"
            caller_window = self._caller_windows.get((org, role, subject.caller))
            role_window = self._role_windows.get((org, role))
            if caller_window is not None:
                caller_window.trim(now)
                _check_rate(refusals, caller_window, limits.per_caller, 0, now, f"{prefix}.limits.per_caller")
            if role_window is not None:
                role_window.trim(now)
                _check_rate(refusals, role_window, limits.per_role, 0, now, f"{prefix}.limits.per_role")
        if refusals:
            retry, code, rule, message = max(refusals, key=lambda r: r[0])
            raise LimitReached(
                message, rule=rule, retry_after=float(max(1, math.ceil(retry - 1e-6))), code=code
            )

    def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """Replace the ticket's reservation with the actual usage (for a stream: when it has ended).

        Idempotent: a second call does nothing. A ticket released by the timeout still has its actual
        usage counted (tokens in the window from now, cost in the current day and month).
        """
        tokens = max(0, tokens)
        cost_usd = max(0.0, cost_usd)
        with self._lock:
            if ticket.state == _SETTLED:
                return
            state, ticket.state = ticket.state, _SETTLED
            if ticket._generation != self._generation:
                return  # admitted before a rebuild: the rebuilt counters come from the ledger alone
            now = self._clock()
            day, month = _periods(now)
            subject = ticket.subject
            caller_key = (subject.org, subject.role, subject.caller)
            role_key = (subject.org, subject.role)
            if state == _OPEN:
                self._open.pop(ticket, None)
                for window, entry in ticket._entries:
                    window.set_tokens(entry, tokens)
                reserved = ticket.cost_usd
            else:  # expired: nothing reserved any more; the usage arrives now
                for window in (
                    self._window(self._caller_windows, caller_key, now),
                    self._window(self._role_windows, role_key, now),
                ):
                    window.add(Entry(now, 0, tokens))
                reserved = 0.0
            for spend in (
                self._spend(self._caller_spend, caller_key, day, month),
                self._spend(self._role_spend, role_key, day, month),
                self._spend(self._org_spend, subject.org, day, month),
            ):
                spend.replace(ticket._day, ticket._month, reserved, cost_usd)

    # -- status -------------------------------------------------------------------------------------------

    def snapshot(self, subject: Subject) -> dict[str, Any]:
        """The counters that apply to ``subject`` now (in-flight reservations included): status, explain."""
        caller_key = (subject.org, subject.role, subject.caller)
        role_key = (subject.org, subject.role)
        with self._lock:
            now = self._clock()
            day, month = _periods(now)
            self._housekeep(now, month)

            def window(table: dict[Any, Window], key: Any) -> dict[str, int]:
                w = table.get(key)
                if w is None:
                    return {"requests_last_min": 0, "tokens_last_min": 0}
                w.trim(now)
                return {"requests_last_min": w.requests, "tokens_last_min": w.tokens}

            def spend(table: dict[Any, SpendCounter], key: Any) -> dict[str, float]:
                s = table.get(key)
                if s is None:
                    return {"usd_today": 0.0, "usd_this_month": 0.0, "usd_in_flight": 0.0}
                s.roll(day, month)
                return {
                    "usd_today": s.day_usd,
                    "usd_this_month": s.month_usd,
                    "usd_in_flight": s.month_reserved,
                }

            in_flight = sum(1 for t in self._open if t.subject == subject)
            return {
                "day": time.strftime("%Y-%m-%d", time.gmtime(now)),
                "month": time.strftime("%Y-%m", time.gmtime(now)),
                "caller": {
                    **window(self._caller_windows, caller_key),
                    **spend(self._caller_spend, caller_key),
                    "in_flight": in_flight,
                },
                "role": {**window(self._role_windows, role_key), **spend(self._role_spend, role_key)},
                "organization": spend(self._org_spend, subject.org),
            }

    # -- restart ------------------------------------------------------------------------------------------

    def rebuild(self, db: Database) -> int:
        """Recompute every counter from the ledger's outcome records; returns how many were read.

        Reads the "response"/"error" records of the current UTC month (not refusals: status 429 or a
        "denied" decision): spend per caller, role and organization for the month and today, and the
        requests and tokens of the last 60 s. Replaces all counters; call it at start-up, before the first
        ``admit`` (tickets admitted earlier settle into nothing). A request that was in flight at the
        crash has no outcome record and counts for nothing.

        Cost: the month's records are found by a binary search on ``seq`` (ts grows with seq), then
        aggregated in SQL with ``json_extract``; no index is needed. Blocking: run it at start-up or from
        a worker thread. Measured on the dev machine (SQLite 3.40, 2 cores, warm page cache), a month with
        one request record beside each outcome: 1M outcome records (2.3M rows) 4.0-4.7 s; 200k outcome
        records (400k rows) 0.25-0.5 s: 2.5-4.5 us a record, most of it parsing each record's JSON.
        """
        now = self._clock()
        day, month = _periods(now)
        month_start = _month_start(month)
        day_start = day * 86400.0
        conn = db.reader()
        try:
            first = first_seq_at(conn, timestamps.rfc3339(month_start - _REBUILD_SLACK_S))
            params = {
                "first": first,
                "month": timestamps.rfc3339(month_start),
                "day": timestamps.rfc3339(day_start),
            }
            totals = conn.execute(_MONTH_SQL, params).fetchall()
            recent_first = first_seq_at(
                conn, timestamps.rfc3339(max(month_start, now - WINDOW_S) - _REBUILD_SLACK_S)
            )
            recent = conn.execute(
                _RECENT_SQL,
                {
                    "first": max(first, recent_first),
                    "since": timestamps.rfc3339(max(month_start, now - WINDOW_S)),
                },
            ).fetchall()
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot read the ledger to rebuild limits: {exc}") from exc

        caller_windows: dict[_CallerKey, Window] = {}
        role_windows: dict[_RoleKey, Window] = {}
        caller_spend: dict[_CallerKey, SpendCounter] = {}
        role_spend: dict[_RoleKey, SpendCounter] = {}
        org_spend: dict[str, SpendCounter] = {}
        read = 0
        for org, role, caller, count, month_usd, day_usd in totals:
            read += count
            targets: list[SpendCounter] = []
            if org is not None:
                targets.append(org_spend.setdefault(org, SpendCounter(day, month)))
                if role is not None:
                    targets.append(role_spend.setdefault((org, role), SpendCounter(day, month)))
                    if caller is not None:
                        targets.append(caller_spend.setdefault((org, role, caller), SpendCounter(day, month)))
            for spend in targets:
                spend.month_usd += month_usd
                spend.day_usd += day_usd
        for org, role, caller, t, tokens in recent:
            if org is None or role is None or t is None:
                continue
            windows = [role_windows.setdefault((org, role), Window())]
            if caller is not None:
                windows.append(caller_windows.setdefault((org, role, caller), Window()))
            for window in windows:
                window.add(Entry(t, 1, int(tokens)))
        with self._lock:
            self._generation += 1
            self._caller_windows, self._role_windows = caller_windows, role_windows
            self._caller_spend, self._role_spend, self._org_spend = caller_spend, role_spend, org_spend
            self._open = {}
            self._next_sweep = 0.0
        return read

    # -- internals ----------------------------------------------------------------------------------------

    @staticmethod
    def _window(table: dict[Any, Window], key: Any, now: float) -> Window:
        window = table.get(key)
        if window is None:
            window = table[key] = Window()
        else:
            window.trim(now)
        return window

    @staticmethod
    def _spend(table: dict[Any, SpendCounter], key: Any, day: int, month: int) -> SpendCounter:
        spend = table.get(key)
        if spend is None:
            spend = table[key] = SpendCounter(day, month)
        else:
            spend.roll(day, month)
        return spend

    def _housekeep(self, now: float, month: int) -> None:
        """Release expired tickets; once a minute drop idle windows and last month's spend."""
        deadline = now - self._ticket_timeout_s
        while self._open:
            oldest = next(iter(self._open))
            if oldest.admitted_at > deadline:
                break
            del self._open[oldest]
            self._expire(oldest, now)
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        for windows in (self._caller_windows, self._role_windows):
            drop_idle(windows, now)
        for spends in (self._caller_spend, self._role_spend, self._org_spend):
            drop_old(spends, month)

    def _expire(self, ticket: Ticket, now: float) -> None:
        """Release a ticket nobody settled: its request stays counted, its tokens and cost do not."""
        ticket.state = _EXPIRED
        for window, entry in ticket._entries:
            window.set_tokens(entry, 0)
        day, month = _periods(now)
        subject = ticket.subject
        for spend in (
            self._spend(self._caller_spend, (subject.org, subject.role, subject.caller), day, month),
            self._spend(self._role_spend, (subject.org, subject.role), day, month),
            self._spend(self._org_spend, subject.org, day, month),
        ):
            spend.replace(ticket._day, ticket._month, ticket.cost_usd, 0.0)


def _check_rate(
    refusals: list[_Refusal], window: Window, rate: Rate | None, tokens: int, now: float, rule: str
) -> None:
    if rate is None:
        return
    cap = rate.requests_per_min
    if cap is not None and window.requests + 1 > cap:
        wait = window.wait(now, window.requests + 1 - cap, tokens=False)
        refusals.append(
            (
                wait,
                "rate_limited",
                f"{rule}.requests_per_min",
                f"rate limit reached: {cap} requests per minute",
            )
        )
    cap = rate.tokens_per_min
    if cap is not None:
        need = min(tokens, cap)  # a request bigger than the cap waits for an empty window
        if window.tokens + need > cap:
            wait = window.wait(now, window.tokens + need - cap, tokens=True)
            refusals.append(
                (
                    wait,
                    "rate_limited",
                    f"{rule}.tokens_per_min",
                    f"rate limit reached: {cap} tokens per minute",
                )
            )


def _check_spend(
    refusals: list[_Refusal], spend: SpendCounter, spec: Spend | None, cost: float, now: float, rule: str
) -> None:
    if cost <= 0:
        return  # a request that costs nothing (a local model) cannot overspend
    day_cap, month_cap = _caps(spec)
    if day_cap is not None and spend.day_usd + cost > day_cap + _EPS:
        wait = 86400.0 - now % 86400.0
        if spend.day_usd - spend.day_reserved + cost <= day_cap + _EPS:
            wait = min(wait, IN_FLIGHT_RETRY_S)
        refusals.append(
            (
                wait,
                "budget_exceeded",
                f"{rule}.usd_per_day",
                f"budget exhausted: {day_cap:g} USD per day; "
                + _accounts(spend.day_usd, spend.day_reserved, cost, rule),
            )
        )
    if month_cap is not None and spend.month_usd + cost > month_cap + _EPS:
        wait = _month_start(spend.month + 1) - now
        if spend.month_usd - spend.month_reserved + cost <= month_cap + _EPS:
            wait = min(wait, IN_FLIGHT_RETRY_S)
        refusals.append(
            (
                wait,
                "budget_exceeded",
                f"{rule}.usd_per_month",
                f"budget exhausted: {month_cap:g} USD per month; "
                + _accounts(spend.month_usd, spend.month_reserved, cost, rule),
            )
        )


def _accounts(total: float, reserved: float, cost: float, rule: str) -> str:
    """Where the budget went, so the caller can tell spend that is settled from reservations of requests
    still in flight, and this request's own estimate. A budget shared by a role or an organization names no
    amounts but the estimate: they are other callers' spend, not this caller's to read."""
    if not rule.endswith(".per_caller"):
        held = "; requests in flight hold part of it" if reserved > _EPS else ""
        shared = "the role's callers" if rule.endswith(".per_role") else "the organization"
        return f"shared by {shared}{held}; this request estimated at ${cost:.4f}"
    return (
        f"spent ${max(total - reserved, 0.0):.4f}, reserved ${reserved:.4f} by requests in flight, "
        f"this request estimated at ${cost:.4f}"
    )


# Outcome records of admitted requests: a 429 or a policy denial never counted (error records only).
# json_extract parses the whole record on every call (SQLite < 3.45 caches nothing), so the month's sum
# extracts each field once, in a subquery that LIMIT -1 keeps from being flattened into the aggregate.
_MONTH_SQL = (
    "SELECT o, r, c, count(*), total(cost), total(CASE WHEN ts >= :day THEN cost ELSE 0 END) FROM ("
    " SELECT json_extract(record, '$.org') AS o, json_extract(record, '$.role') AS r, claw_id AS c, ts,"
    " json_extract(record, '$.cost_usd') AS cost"
    " FROM ledger WHERE seq >= :first AND type IN ('response', 'error') AND ts >= :month"
    " AND (type = 'response' OR (json_extract(record, '$.status_code') IS NOT 429"
    " AND json_extract(record, '$.decision') IS NOT 'denied'))"
    " LIMIT -1) GROUP BY o, r, c"
)
_RECENT_SQL = (
    "SELECT json_extract(record, '$.org'), json_extract(record, '$.role'), claw_id,"
    " round((julianday(ts) - 2440587.5) * 86400.0, 3) AS t,"
    " coalesce(json_extract(record, '$.tokens_in'), 0) + coalesce(json_extract(record, '$.tokens_out'), 0)"
    " FROM ledger WHERE seq >= :first AND type IN ('response', 'error') AND ts > :since"
    " AND (type = 'response' OR (json_extract(record, '$.status_code') IS NOT 429"
    " AND json_extract(record, '$.decision') IS NOT 'denied'))"
    " ORDER BY t"
)
