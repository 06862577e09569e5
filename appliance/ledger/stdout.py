"""The audit lines on stdout: written by their own thread, so a stalled reader never stalls the ledger.

Owns: the thread that writes the JSON lines the ledger hands over after each commit, the bounded queue
between them, and what happens when the reader (a log shipper, journald, a pipe) stops reading: lines
are dropped and counted, never waited for. The ledger, not stdout, is the record; ``/health`` shows the
count of dropped lines so an operator can see that the side channel lost some.
Never: blocks the caller; writes a line for a record that is not durable (it is only handed lines after
the commit).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TextIO

log = logging.getLogger("phi.audit")

_MAX_PENDING_BATCHES = 1024


class AuditPrinter:
    def __init__(self, out: TextIO, max_pending: int = _MAX_PENDING_BATCHES) -> None:
        self._out = out
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_pending)
        self.dropped_lines = 0
        self._broken = False
        self._thread = threading.Thread(target=self._run, name="audit-stdout", daemon=True)
        self._thread.start()

    def put(self, text: str) -> None:
        """Hand over one or more complete lines; drops them (counted) if the reader has fallen behind."""
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            if self.dropped_lines == 0:
                log.warning(
                    "stdout is not being read: audit lines are dropped (the ledger keeps every record)"
                )
            self.dropped_lines += text.count("\n")

    def wait(self) -> None:
        """Block until every handed-over line was written (tests and short-lived commands)."""
        self._queue.join()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending, then stop; gives up after ``timeout`` if the reader is stalled."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            try:
                if text is None:
                    return
                if not self._broken:
                    self._out.write(text)
                    self._out.flush()
            except (OSError, ValueError) as exc:  # a closed stdout: the records are on disk regardless
                self._broken = True
                log.warning("cannot print audit lines (records are still written): %s", exc)
            finally:
                self._queue.task_done()
