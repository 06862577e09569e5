"""Refusals of requests with no identified caller: one record per window, the rest counted.

An outsider with no token can send 401s (or malformed heads) as fast as the network allows; one durable
ledger row each grew the append-only ledger by ~5,000 rows a second (about 300 GB a day) until the disk
filled and every caller was refused. So a refusal with no caller is recorded in full only if it is the
first of its window (``window_s``, default 1 s); the others of that window are counted, and when the
window ends one counter record says how many were refused, by status, between which times. An outsider
can then add at most two rows per window; an identified caller's refusals are all recorded one by one.

Owns: the window, the counts and the counter record's wording. Never: records who the outsider claimed
to be (no token, no header, no path beyond the status) or lets a counted refusal go unmentioned: the
counter record is queued when the window ends, even if no refusal follows, and at shutdown (``flush``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from appliance.timestamps import rfc3339

CounterSink = Callable[[dict[str, Any]], None]


class FloodSampler:
    def __init__(
        self, sink: CounterSink, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``clock``: monotonic seconds (a wall clock stepped back must not stretch a window)."""
        self._sink = sink
        self._window_s = window_s
        self._clock = clock
        self._started = -float("inf")
        self._started_wall = 0.0
        self._counts: Counter[int] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def take(self, status: int) -> bool:
        """True: record this refusal in full (the first of a window). False: it is counted instead."""
        now = self._clock()
        if now - self._started >= self._window_s:
            self.flush()
            self._started, self._started_wall = now, time.time()
            return True
        self._counts[status] += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a CLI or a test): the next take() or flush() writes the count
                return False
            self._timer = loop.call_later(self._started + self._window_s - now, self._on_window_end)
        return False

    def flush(self) -> None:
        """Queue the counter record of the window so far, if anything was counted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        total = sum(self._counts.values())
        by_status = ", ".join(f"{status}: {n}" for status, n in sorted(self._counts.items()))
        started, ended = rfc3339(self._started_wall), rfc3339(time.time())
        self._counts.clear()
        self._sink(
            {
                "type": "error",
                "decision": "denied",
                "intervention": "flood_sampled",
                "detail": (
                    f"{total} more refusals of unidentified requests from {started} to {ended} "
                    f"({by_status}); only the first of each {self._window_s:g}-second window is recorded"
                ),
            }
        )

    def _on_window_end(self) -> None:
        self._timer = None
        self.flush()
