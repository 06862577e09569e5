"""``AuditTail``: the live audit stream, read in a thread, handed to the UI in batches.

Owns: following ``/admin/audit/stream`` (a first page of the newest matching records, then the stream from
the last seq seen), reconnecting after the gateway restarts (resuming from that seq), and the hand-off
buffer the screen drains at most ten times a second. Never: touches a widget (it runs in a worker thread);
asks the gateway more than once every ``RETRY_S`` while it is down.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from appliance.errors import OperatorError
from tui.client import AUDIT_FILTERS, ConsoleSource

RETRY_S = 2.0
FIRST_PAGE = 200


class AuditTail:
    """Runs in one thread worker (``run``) for the life of the screen. ``follow(filters)`` restarts it on new
    server-side filters; ``take()`` hands the screen what arrived since."""

    def __init__(self, source: ConsoleSource, report: Callable[[OperatorError | None], None]) -> None:
        self._source = source
        self._report = report  # called from this thread: the caller makes it thread-safe
        self._wake = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()
        self._generation = 0
        self._filters: dict[str, str] = {}
        self._after: int | None = None
        self._arrived: deque[tuple[int, dict[str, Any]]] = deque()
        self.head: int | None = None

    # -- the UI thread --

    def follow(self, filters: Mapping[str, str]) -> int:
        """Start over with these server filters; returns the generation records will carry."""
        with self._lock:
            self._generation += 1
            self._filters = {k: v for k, v in filters.items() if k in AUDIT_FILTERS}
            self._after = None
            self._arrived.clear()
            self._wake.set()
            return self._generation

    def take(self) -> list[dict[str, Any]]:
        """The records that arrived for the current filters since the last call, oldest first."""
        out: list[dict[str, Any]] = []
        while self._arrived:
            generation, record = self._arrived.popleft()
            if generation == self._generation:
                out.append(record)
        return out

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    # -- the worker thread --

    def run(self) -> None:
        while not self._stopped:
            with self._lock:
                generation, filters, after = self._generation, dict(self._filters), self._after
                self._wake.clear()
            try:
                if after is None:
                    after = self._first_page(generation, filters)
                self._stream(generation, filters, after)
            except OperatorError as exc:
                self._report(exc)
                self._wake.wait(RETRY_S)
                continue
            if generation == self._generation:
                self._wake.wait(RETRY_S / 4)  # the stream ended: the gateway went away or restarted

    def _first_page(self, generation: int, filters: dict[str, str]) -> int:
        doc = self._source.audit(after=None, limit=FIRST_PAGE, **filters)
        self._report(None)
        records = doc.get("records", [])
        self.head = int(doc.get("head") or 0)
        for record in records:
            self._arrive(generation, record)
        after = max((int(r["seq"]) for r in records), default=self.head)
        self._set_after(generation, after)
        return after

    def _stream(self, generation: int, filters: dict[str, str], after: int) -> None:
        for doc in self._source.audit_stream(after=after, **filters):
            if self._stopped or generation != self._generation:
                return
            if "heartbeat" in doc:
                self.head = int(doc.get("head") or 0)
                self._report(None)
                continue
            self._arrive(generation, doc)
            self._set_after(generation, int(doc["seq"]))

    def _arrive(self, generation: int, record: dict[str, Any]) -> None:
        self._arrived.append((generation, record))
        self.head = max(self.head or 0, int(record.get("seq") or 0))

    def _set_after(self, generation: int, seq: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._after = seq
