"""``VerifyJob``: one verification of the whole ledger at a time, run in its own thread, with its progress.

Owns: the job's state (idle, running, passed, failed), records checked of the total, and its outcome.
Never: reports a verification it did not finish as passed; runs two at once (``begin`` refuses with 409).
"""

from __future__ import annotations

import threading
from typing import Any

from appliance import timestamps
from appliance.errors import Conflict
from appliance.ledger.store import Ledger


class VerifyJob:
    """The last (or running) verification of the whole ledger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "idle"
        self.checked = 0
        self.total = 0
        self.started_at: str | None = None
        self.finished_at: str | None = None
        self.summary: str | None = None
        self.problems: list[str] = []

    def document(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state,
                "checked": self.checked,
                "total": self.total,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "summary": self.summary,
                "problems": list(self.problems),
            }

    def begin(self, total: int) -> None:
        with self._lock:
            if self.state == "running":
                raise Conflict("a verification of the ledger is already running")
            self.state, self.checked, self.total = "running", 0, total
            self.started_at, self.finished_at, self.summary, self.problems = timestamps.now(), None, None, []

    def abandon(self) -> None:
        """``begin`` without a run (its record could not be written): idle again."""
        with self._lock:
            self.state, self.started_at = "idle", None

    def run(self, ledger: Ledger) -> tuple[bool, str]:
        """Verify (blocking, in the job's thread); returns (passed, summary)."""
        try:
            report = ledger.verify(progress=self._progress)
        except Exception as exc:  # a storage failure mid-run: a failed run, said so
            passed, summary, problems, checked = (
                False,
                f"verification could not finish: {exc}",
                [str(exc)],
                None,
            )
        else:
            passed, summary = report.ok, report.message
            problems = [] if report.ok else [report.message]
            checked = report.records
        with self._lock:
            self.state = "passed" if passed else "failed"
            if checked is not None:  # records appended while it ran are checked too
                self.checked = checked
                self.total = max(self.total, checked)
            self.finished_at = timestamps.now()
            self.summary = summary
            self.problems = problems
        return passed, summary

    def _progress(self, checked: int) -> None:
        with self._lock:
            self.checked = checked
