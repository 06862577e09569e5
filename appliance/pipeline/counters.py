"""The counters behind rate limits and budgets: a sliding 60-second window and a day/month spend.

Owns: ``Window`` (requests and tokens of the last ``WINDOW_S`` seconds for one key, entries in admission
order with their sums kept) and ``SpendCounter`` (USD in the current UTC day and month, reservations in
flight included), and the sweeps that drop idle windows and last month's spend. ``limits.LimitKeeper``
decides with them under its lock. Never: locks, reads a clock, or decides anything.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

WINDOW_S: Final = 60.0
"""The sliding window of requests/min and tokens/min."""


class Entry:
    __slots__ = ("live", "requests", "t", "tokens")

    def __init__(self, t: float, requests: int, tokens: int) -> None:
        self.t = t
        self.requests = requests
        self.tokens = tokens
        self.live = True


class Window:
    """Requests and tokens of the last 60 s for one key: entries in admission order, sums kept."""

    __slots__ = ("entries", "requests", "tokens")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.requests = 0
        self.tokens = 0

    def trim(self, now: float) -> None:
        horizon = now - WINDOW_S
        entries = self.entries
        while entries and entries[0].t <= horizon:
            entry = entries.popleft()
            entry.live = False
            self.requests -= entry.requests
            self.tokens -= entry.tokens

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.requests += entry.requests
        self.tokens += entry.tokens

    def set_tokens(self, entry: Entry, tokens: int) -> None:
        if entry.live:  # an entry already out of the window no longer counts either way
            self.tokens += tokens - entry.tokens
            entry.tokens = tokens

    def wait(self, now: float, excess: int, tokens: bool) -> float:
        """Seconds until entries worth ``excess`` requests (or tokens) have left the window."""
        freed = 0
        for entry in self.entries:
            freed += entry.tokens if tokens else entry.requests
            if freed >= excess:
                return entry.t + WINDOW_S - now
        return WINDOW_S


class SpendCounter:
    """USD for one key in the current UTC day and month, reservations in flight included."""

    __slots__ = ("day", "day_reserved", "day_usd", "month", "month_reserved", "month_usd")

    def __init__(self, day: int, month: int) -> None:
        self.day = day
        self.month = month
        self.day_usd = self.day_reserved = self.month_usd = self.month_reserved = 0.0

    def roll(self, day: int, month: int) -> None:
        if self.day != day:
            self.day, self.day_usd, self.day_reserved = day, 0.0, 0.0
        if self.month != month:
            self.month, self.month_usd, self.month_reserved = month, 0.0, 0.0

    def reserve(self, usd: float) -> None:
        self.day_usd += usd
        self.day_reserved += usd
        self.month_usd += usd
        self.month_reserved += usd

    def replace(self, day: int, month: int, reserved: float, actual: float) -> None:
        """Swap a reservation made in ``day``/``month`` for the actual cost; a reservation whose period has
        rolled over is gone already, and the actual cost counts in the current period (as in the ledger)."""
        if self.day == day:
            self.day_usd += actual - reserved
            self.day_reserved -= reserved
        else:
            self.day_usd += actual
        if self.month == month:
            self.month_usd += actual - reserved
            self.month_reserved -= reserved
        else:
            self.month_usd += actual


def drop_idle(windows: dict[Any, Window], now: float) -> None:
    for key in list(windows):
        window = windows[key]
        window.trim(now)
        if not window.entries:
            del windows[key]


def drop_old(spends: dict[Any, SpendCounter], month: int) -> None:
    for key in [k for k, s in spends.items() if s.month != month]:
        del spends[key]
