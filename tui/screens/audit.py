"""The Audit screen (key 2): the live tail of the audit ledger, filtered, pausable, each record openable and
provable.

Owns: the table of the newest records (at most ``MAX_ROWS``; rows added at most ten times a second), the
filter (``caller=x route=y status=429 …`` sent to the server as query filters and applied here too, with
free words matched locally), pause/resume (new records counted while paused, shown on resume), the record
detail (Enter) and ``prove`` (``v``). Never: reads the stream on the UI thread (``AuditTail`` does, in a
worker); moves the cursor off the operator's record when rows arrive or old ones are dropped.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.widgets import Static

from appliance.errors import OperatorError
from tui.screens.audit_tail import AuditTail
from tui.screens.base import Action, ConsoleScreen
from tui.screens.record import RecordScreen
from tui.widgets import numbers as fmt
from tui.widgets.filter_bar import FilterBar, RowFilter
from tui.widgets.tail_table import TailTable

MAX_ROWS = 2000
DRAIN_S = 0.1  # rows are added at most ten times a second, however fast records come
FILTER_SETTLE_S = 0.3  # the server is asked again once typing pauses, not at every key
ALIASES = {"caller": "claw_id", "status": "status_code"}  # typed name -> the record's field
SERVER_FILTERS = {"claw_id": "caller", "route": "route", "model": "model", "decision": "decision",
                  "status_code": "status", "intervention": "intervention", "type": "type"}  # fmt: skip
COLUMNS = [("seq", 8), ("time", 8), ("st", 3), ("decision", 8), ("caller", 16), ("model", 24), ("ms", 6),
           ("cost", 8), ("intervention", 16), ("route", 9)]  # fmt: skip


class AuditScreen(ConsoleScreen):
    TITLE = "Audit"
    KEY = "2"
    ACTIONS: ClassVar[list[Action]] = [
        ("space", "toggle_pause", "Pause: stop or resume the live tail (new records are counted)", False),
        ("p", "toggle_pause", "Pause: stop or resume the live tail (new records are counted)", False),
        ("enter", "open_record", "Open: every field of the record under the cursor", False),
        ("v", "prove", "Prove: show that the ledger holds the record under the cursor", False),
        ("escape", "clear_filter", "Clear filter: show every record again", False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_ROWS)
        self._filter = RowFilter()
        self._server_terms: dict[str, str] = {}
        self._paused = False
        self._waiting: deque[dict[str, Any]] = deque(maxlen=MAX_ROWS)  # the newest of those waiting
        self._waiting_count = 0
        self._tail: AuditTail | None = None
        self._settle: Any = None

    def compose(self) -> ComposeResult:
        yield FilterBar("caller=… route=… model=… decision=… status=… intervention=…, or any text")
        yield Static(id="audit-state", markup=False)
        yield TailTable(COLUMNS, MAX_ROWS, id="audit-table")

    def on_mount(self) -> None:
        self.set_interval(DRAIN_S, self._drain)

    def on_unmount(self) -> None:
        if self._tail is not None:
            self._tail.stop()

    def refresh_data(self) -> None:
        if self._tail is None:
            self._tail = AuditTail(self.source, self._report_from_thread)
            self._tail.follow(self._server_terms)
            self.run_worker(self._tail.run, name="audit-tail", group="audit-tail", thread=True)
        self._show_state()

    def _report_from_thread(self, error: OperatorError | None) -> None:
        self._from_thread(self.host.note_gateway, error)

    # -- rows --

    def _drain(self) -> None:
        if self._tail is None:
            return
        arrived = self._tail.take()
        if not arrived:
            return
        if self._paused:
            self._waiting.extend(arrived)
            self._waiting_count += len(arrived)
        else:
            self._add(arrived)
        self._show_state()

    def _add(self, records: list[dict[str, Any]]) -> None:
        records = records[-MAX_ROWS:]  # a burst larger than the window: only its newest can be shown
        self._records.extend(records)
        rows = [(str(r.get("seq")), _cells(r)) for r in records if self._filter.matches(r)]
        self.query_one("#audit-table", TailTable).append_rows(rows)

    def _rebuild(self) -> None:
        table = self.query_one("#audit-table", TailTable)
        rows = [(str(r.get("seq")), _cells(r)) for r in self._records if self._filter.matches(r)]
        table.replace_rows(rows, keep=table.cursor_key)

    def _show_state(self) -> None:
        shown = self.query_one("#audit-table", TailTable).row_count
        head = self._tail.head if self._tail is not None else None
        where = f"  ·  filter {self._describe_filter()}" if self._filter else ""
        if self._paused:
            state = f"⏸ PAUSED  ·  {self._waiting_count:,} new records waiting (space resumes)"
        else:
            state = "● live"
        self.query_one("#audit-state", Static).update(
            f"{state}  ·  {shown:,} shown  ·  head {fmt.count(head)}{where}"
        )

    def _describe_filter(self) -> str:
        terms = [f"{k}={v}" for k, v in self._filter.terms.items()]
        return " ".join([*terms, *self._filter.words])

    # -- the filter --

    @on(FilterBar.Changed)
    def _filter_typed(self, event: FilterBar.Changed) -> None:
        if self._settle is not None:
            self._settle.stop()
        self._settle = self.set_timer(FILTER_SETTLE_S, lambda: self.apply_filter(event.text))

    def apply_filter(self, text: str) -> None:
        """Filter by ``text`` now: locally at once, and on the server when its terms changed."""
        self._filter = RowFilter.parse(text, ALIASES)
        server = {SERVER_FILTERS[k]: v for k, v in self._filter.terms.items() if k in SERVER_FILTERS}
        status = server.get("status")
        if status is not None and not status.isdigit():
            # a typo, not the gateway's refusal: the gateway takes a number only, so it is matched here alone
            del server["status"]
            self.notify(f"status={status}: a status is a number (429); matched in the rows shown only")
        if server != self._server_terms:
            self._server_terms = server
            self._records.clear()
            self._waiting.clear()
            self._waiting_count = 0
            if self._tail is not None:
                self._tail.follow(server)
        self._rebuild()
        self._show_state()

    def action_clear_filter(self) -> None:
        self.query_one("#filter").value = ""  # type: ignore[attr-defined]
        self.apply_filter("")

    # -- pause, open, prove --

    def action_toggle_pause(self) -> None:
        self._paused = not self._paused
        if not self._paused and self._waiting:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._add(waiting)
        self._waiting_count = 0
        self._show_state()

    @on(TailTable.Selected, "#audit-table")
    def _row_selected(self, event: TailTable.Selected) -> None:
        event.stop()
        self.action_open_record()

    def _cursor_record(self) -> dict[str, Any] | None:
        key = self.query_one("#audit-table", TailTable).cursor_key
        for record in reversed(self._records):
            if str(record.get("seq")) == key:
                return record
        return None

    def action_open_record(self) -> RecordScreen | None:
        record = self._cursor_record()
        if record is None:
            self.notify("no record under the cursor")
            return None
        detail = RecordScreen(record, self._prove)
        self.app.push_screen(detail)
        return detail

    def action_prove(self) -> None:
        detail = self.action_open_record()
        if detail is not None:
            self.call_after_refresh(detail.action_prove)

    def _prove(self, detail: RecordScreen) -> None:
        seq = int(detail.record["seq"])

        def run() -> None:
            try:
                doc = self.source.prove(seq)
            except OperatorError as exc:
                self._from_thread(detail.show_proof_failed, str(exc))
                return
            self._from_thread(detail.show_proof, doc)

        self.run_worker(run, name=f"prove {seq}", group="prove", thread=True, exclusive=True)


def _cells(record: dict[str, Any]) -> tuple[str, ...]:
    latency, cost = record.get("latency_ms"), record.get("cost_usd")
    return (
        str(record.get("seq")),
        str(record.get("ts") or "")[11:19],
        str(record.get("status_code") or ""),
        str(record.get("decision") or record.get("type") or ""),
        str(record.get("claw_id") or ""),
        str(record.get("model") or ""),
        "" if latency is None else fmt.count(latency),
        fmt.usd(cost) if cost else "",
        str(record.get("intervention") or ""),
        str(record.get("route") or ""),
    )
