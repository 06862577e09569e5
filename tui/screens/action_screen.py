"""``ActionScreen``: what the screens that change the gateway (callers, models, policy, keys) share.

Owns: the confirm-then-act step, the outcome notification and refresh after an action, and the filtered
table of rows (hiding and refusing the changing actions in read-only mode is ``ConsoleScreen``'s).
Never: calls the source on the UI thread (``ConsoleScreen.fetch``/``act`` do, in workers); runs an action
that changes something without ``guard_action``; keeps an action's secret argument after the call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from textual import on
from textual.widgets import DataTable

from appliance.errors import OperatorError
from tui.client import ConsoleSource
from tui.modals import ConfirmModal
from tui.screens.base import ConsoleScreen
from tui.widgets.filter_bar import FilterBar, RowFilter
from tui.widgets.tables import row_key_at_cursor, sync_rows

T = TypeVar("T")

Row = tuple[str, Mapping[str, object], Sequence[object]]
"""(row key, fields the filter matches, cells shown)"""


class ActionScreen(ConsoleScreen):
    """A ``ConsoleScreen`` with actions that change the gateway and, optionally, one filtered table."""

    def __init__(self, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self._rows: list[Row] = []
        self._filter = RowFilter()

    # -- acting --

    def confirm_then(
        self, question: str, consequence: str, then: Callable[[], object], label: str = "Yes"
    ) -> None:
        """Ask with ``ConfirmModal``; run ``then`` only on an explicit yes."""

        def answered(yes: bool | None) -> None:
            if yes:
                then()
            else:
                self.notify("Cancelled: nothing was changed.", timeout=3)

        self.app.push_screen(ConfirmModal(question, consequence, label), answered)

    def act_and_report(
        self, verb: str, call: Callable[[ConsoleSource], T], outcome: Callable[[T], str]
    ) -> None:
        """Run an action in a worker; on success notify ``outcome(answer)``; either way refresh the screen.
        A failure is notified with the gateway's own message (``ConsoleScreen.act``)."""

        def done(answer: T) -> None:
            self.notify(outcome(answer), title=verb, timeout=5)
            self.refresh_data()

        self.act(verb, call, done)

    def ask_then(self, call: Callable[[ConsoleSource], T], then: Callable[[T | None], None]) -> None:
        """Read something an action's form needs (``None`` if the gateway does not answer), then ``then``."""

        def run() -> None:
            try:
                result: T | None = call(self.source)
            except OperatorError:
                result = None
            self._from_thread(then, result)

        self.run_worker(run, group="ask", thread=True, exit_on_error=False)

    # -- the filtered table --

    def show_rows(self, rows: list[Row]) -> None:
        """Remember ``rows`` and show those the filter lets through."""
        self._rows = rows
        self._apply_filter()

    def _apply_filter(self) -> None:
        for table in self.query("#rows").results(DataTable):
            shown = [(key, cells) for key, fields, cells in self._rows if self._filter.matches(fields)]
            selected = row_key_at_cursor(table)
            sync_rows(table, shown)
            # sync_rows may rebuild the table (rows re-ordered, e.g. after the filter changed): the cursor
            # then keeps its position, not its row. An action acts on the selected row: keep the row.
            if selected is not None and any(key == selected for key, _cells in shown):
                index = table.get_row_index(selected)
                if index != table.cursor_row:
                    table.move_cursor(row=index, animate=False)

    @on(FilterBar.Changed)
    def _filter_changed(self, event: FilterBar.Changed) -> None:
        self._filter = RowFilter.parse(event.text)
        self._apply_filter()

    @property
    def shown_rows(self) -> list[Mapping[str, object]]:
        """The fields of the rows the table shows (after the filter), in order."""
        return [fields for _key, fields, _cells in self._rows if self._filter.matches(fields)]

    def select_row(self, key: str) -> None:
        """Put the cursor on the row ``key`` (the operator's arrow keys do the same)."""
        table = self.query_one("#rows", DataTable)
        table.move_cursor(row=table.get_row_index(key), animate=False)

    def selected(self) -> Mapping[str, object] | None:
        """The fields of the row under the cursor, or ``None`` (with a notice) when there is none."""
        tables = list(self.query("#rows").results(DataTable))
        key = row_key_at_cursor(tables[0]) if tables else None
        for row_key, fields, _cells in self._rows:
            if row_key == key:
                return fields
        self.notify("Select a row first.", severity="warning", timeout=3)
        return None
