"""The Ledger screen (key 7): the audit ledger's state, its checkpoints, and a full verify run on the gateway.

Owns: the ledger panel (records, writable, owed outcomes, last checkpoint's size, age and reason, the
verifier key), the verify job's progress (``r`` starts it; its progress comes with each refresh) and ``c``,
sign a checkpoint now. Never: reads the ledger itself (the gateway verifies; the console shows); reads the
clock (the checkpoint's age is the gateway's number); signs in a read-only console.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from tui.client import ConsoleSource
from tui.screens.base import Action, ConsoleScreen
from tui.widgets import numbers as fmt
from tui.widgets.panels import KeyValue


class LedgerScreen(ConsoleScreen):
    TITLE = "Ledger"
    KEY = "7"
    ACTIONS: ClassVar[list[Action]] = [
        # a run is itself recorded (two admin records): an action, refused in a read-only console
        ("r", "verify", "Verify: check the whole ledger on the gateway, in the background", True),
        ("c", "checkpoint", "Checkpoint: sign a checkpoint of the ledger now", True),
    ]

    def compose(self) -> ComposeResult:
        yield KeyValue("ledger", id="ledger-state")
        with Vertical(id="verify-box") as box:
            box.border_title = "verify (r)"
            yield Static(id="verify-state", markup=False)
            yield ProgressBar(id="verify-progress", show_eta=False)
            yield Static(id="verify-problems", markup=False)

    def refresh_data(self) -> None:
        self.fetch("ledger", _ledger_and_age, self.show_ledger)

    def show_ledger(self, docs: tuple[dict[str, Any], float | None]) -> None:
        doc, checkpoint_age = docs
        last = doc.get("last_checkpoint") or {}
        checkpoint = (
            f"size {fmt.count(last.get('size'))}, {fmt.age(checkpoint_age)} ({last.get('reason') or '—'})"
            if last
            else "none signed yet"
        )
        self.query_one("#ledger-state", KeyValue).show(
            [
                ("records", fmt.count(doc.get("records"))),
                ("writable", "yes" if doc.get("writable") else "NO — the gateway refuses requests"),
                ("owed outcomes", fmt.count(doc.get("owed_outcomes"))),
                ("checkpoints", fmt.count(doc.get("checkpoints"))),
                ("last checkpoint", checkpoint),
                ("signed at", last.get("at") or "—"),
                ("verifier key", doc.get("verifier_key") or "—"),
            ]
        )
        self.show_job(doc.get("verify") or {})

    def show_job(self, job: dict[str, Any]) -> None:
        state = job.get("state", "idle")
        checked, total = int(job.get("checked") or 0), int(job.get("total") or 0)
        words = {
            "idle": "not run since the gateway started — r runs it",
            "running": f"running: {checked:,} of {total:,} records checked",
            "passed": f"PASSED: {checked:,} records",
            "failed": f"FAILED after {checked:,} records",
        }.get(state, state)
        summary = job.get("summary")
        finished = job.get("finished_at")
        line = (
            words + (f"  ·  {summary}" if summary else "") + (f"  ·  finished {finished}" if finished else "")
        )
        self.query_one("#verify-state", Static).update(line)
        self.query_one("#verify-box").set_classes(f"verify-{state}")
        bar = self.query_one("#verify-progress", ProgressBar)
        if state == "idle":
            bar.update(total=None, progress=0)
        else:
            bar.update(total=max(total, 1), progress=checked if total else 1)
        problems = job.get("problems") or []
        self.query_one("#verify-problems", Static).update("\n".join(f"✖ {p}" for p in problems))

    def action_verify(self) -> None:
        if not self.guard_action("a ledger verify"):
            return
        self.act("ledger verify", lambda source: source.start_verify(), self._verify_started)

    def _verify_started(self, job: dict[str, Any]) -> None:
        self.notify("ledger verify started on the gateway")
        self.show_job(job)

    def action_checkpoint(self) -> None:
        if not self.guard_action("signing a checkpoint"):
            return
        self.act("sign a checkpoint", lambda source: source.checkpoint(), self._signed)

    def _signed(self, doc: dict[str, Any]) -> None:
        self.notify(f"checkpoint signed at tree size {fmt.count(doc.get('size'))}")
        self.refresh_data()


def _ledger_and_age(source: ConsoleSource) -> tuple[dict[str, Any], float | None]:
    """The ledger document, and the last checkpoint's age as the gateway counts it (``/admin/ledger`` gives
    only the time it was signed; the console never compares that with its own clock)."""
    ledger = source.ledger()
    age = source.activity().get("ledger", {}).get("last_checkpoint_age_s")
    return ledger, age
