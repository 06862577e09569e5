"""In-place ``DataTable`` updates: a table that is refreshed every second changes only the cells that changed,
so nothing flickers and the cursor stays on the operator's row.

Owns: ``sync_rows`` and ``measure_now``. Never: talks to the gateway; sorts (rows come in the order the
caller wants).
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.widgets import DataTable
from textual.widgets.data_table import CursorType, RowKey


class ColumnsTable(DataTable[object]):
    """A ``DataTable`` given its columns up front; they are added when it is mounted (columns added before
    that leave stale row renders behind in Textual's caches)."""

    def __init__(
        self,
        columns: Sequence[str],
        *,
        id: str | None = None,
        classes: str | None = None,
        cursor_type: CursorType = "row",
        zebra_stripes: bool = False,
    ) -> None:
        super().__init__(id=id, classes=classes, cursor_type=cursor_type, zebra_stripes=zebra_stripes)
        self._column_names = tuple(columns)

    def on_mount(self) -> None:
        for name in self._column_names:
            self.add_column(name, key=name)


def sync_rows(table: DataTable[object], rows: Sequence[tuple[str, Sequence[object]]]) -> None:
    """Make ``table`` show ``rows`` ((key, cells) pairs), its columns measured for them at once. Rows are
    matched by key: a kept row's changed cells are updated in place, a new row is added, a vanished row
    removed. When the order of the kept keys changed (a top-N table re-ranked), cells are rewritten by
    position instead, keeping the row count."""
    wanted = [key for key, _ in rows]
    current = [str(row_key.value) for row_key in table.rows]
    columns = list(table.columns)
    if [k for k in current if k in set(wanted)] != [k for k in wanted if k in set(current)]:
        _sync_by_position(table, rows)
        return
    keep = set(wanted)
    for key in current:
        if key not in keep:
            table.remove_row(key)
    have = {str(row_key.value) for row_key in table.rows}
    for key, cells in rows:
        if key in have:
            old = table.get_row(key)
            for column, old_value, new_value in zip(columns, old, cells, strict=False):
                if old_value != new_value:
                    table.update_cell(key, column, new_value)
        else:
            table.add_row(*cells, key=key)
    measure_now(table)


def _sync_by_position(table: DataTable[object], rows: Sequence[tuple[str, Sequence[object]]]) -> None:
    cursor = table.cursor_row
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    measure_now(table)
    if table.row_count:
        table.move_cursor(row=min(cursor, table.row_count - 1), animate=False)


def measure_now(table: DataTable[object]) -> None:
    """Measure ``table``'s columns for the rows just added or changed, now rather than when idle. Textual
    8.2 does it when idle, and a line painted before that stayed cached, and on screen, at the header's
    widths ("opena" for "openai": the row cache's key has no widths; a flaky snapshot showed it). Measured
    in the same step as the change, no paint comes between. (Textual's own idle steps, used as they are.)"""
    if table._updated_cells:
        cells = table._updated_cells.copy()
        table._updated_cells.clear()
        table._update_column_widths(cells)
    if table._require_update_dimensions:
        table._require_update_dimensions = False
        rows = table._new_rows.copy()
        table._new_rows.clear()
        table._update_dimensions(rows)
    table._clear_caches()
    table.refresh()


def row_key_at_cursor(table: DataTable[object]) -> str | None:
    """The key of the row under the cursor, or ``None`` when the table is empty."""
    if not table.row_count:
        return None
    key: RowKey = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
    return None if key.value is None else str(key.value)
