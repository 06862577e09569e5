"""``TailTable``: a table for a fast, endless stream of rows (the audit tail), drawn a line at a time.

Owns: a bounded window of rows (the oldest fall off the top), a cursor that stays on the operator's row
as rows arrive and fall off (or follows the newest when it is on the last row), and drawing only the lines
on screen. Appending is O(rows appended) and never re-measures the table: columns have fixed widths.
Why not ``DataTable``: it re-measures every new row and rebuilds its index on every removal, so at a few
thousand records a second the console stopped answering keys (``bench/console.py`` showed it).
Never: talks to the gateway; parses markup in a cell (a caller name may hold ``[``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

Row = tuple[str, Sequence[str]]
"""(key, cells)"""


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


class TailTable(ScrollView, can_focus=True):
    """Rows of text in fixed-width columns; Enter posts ``TailTable.Selected`` with the row's key."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(-1)", "Oldest", show=False),
        Binding("end", "edge(1)", "Newest (follow)", show=False),
        Binding("enter", "select", "Open", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"tail-table--header", "tail-table--cursor", "tail-table--odd"}
    DEFAULT_CSS = """
    TailTable { background: $surface; }
    TailTable > .tail-table--header { text-style: bold; background: $panel; }
    TailTable > .tail-table--cursor { background: $block-cursor-background; color: $block-cursor-foreground; }
    TailTable:blur > .tail-table--cursor { background: $block-cursor-blurred-background; }
    TailTable > .tail-table--odd { background: $surface-lighten-1; }
    """

    class Selected(Message):
        def __init__(self, table: TailTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> TailTable:
            return self.table

    def __init__(self, columns: Sequence[tuple[str, int]], capacity: int, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._columns = list(columns)
        self._rows: deque[Row] = deque(maxlen=capacity)
        self.cursor_row = 0
        self._width = sum(width + 1 for _, width in self._columns) + 1

    # -- rows --

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def cursor_key(self) -> str | None:
        return self._rows[self.cursor_row][0] if self._rows else None

    @property
    def following(self) -> bool:
        return not self._rows or self.cursor_row >= len(self._rows) - 1

    def append_rows(self, rows: Sequence[Row]) -> None:
        """Add rows at the bottom; the oldest fall off past the capacity. The cursor follows the newest if it
        was on the last row, else it stays on its row."""
        if not rows:
            return
        following = self.following
        capacity = self._rows.maxlen or len(rows)
        dropped = max(0, len(self._rows) + len(rows) - capacity)
        self._rows.extend(rows)
        self.cursor_row = len(self._rows) - 1 if following else max(0, self.cursor_row - dropped)
        self._changed(follow=following)

    def replace_rows(self, rows: Iterable[Row], keep: str | None = None) -> None:
        """Show these rows instead; the cursor goes to the row keyed ``keep`` if it is there, else the
        last."""
        self._rows.clear()
        self._rows.extend(rows)
        keys = [key for key, _ in self._rows]
        self.cursor_row = keys.index(keep) if keep in keys else max(0, len(keys) - 1)
        self._changed(follow=True)

    def _changed(self, follow: bool) -> None:
        self.virtual_size = Size(self._width, len(self._rows) + 1)
        if follow:
            self.call_after_refresh(self._follow)  # once the new size is laid out
        self.refresh()

    def _follow(self) -> None:
        if self.following:
            self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True)

    def on_resize(self, event: events.Resize) -> None:
        self._follow()

    # -- keys --

    def action_move(self, delta: int) -> None:
        self._put_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self._put_cursor(self.cursor_row + direction * max(1, self.scrollable_content_region.height - 2))

    def action_edge(self, direction: int) -> None:
        self._put_cursor(0 if direction < 0 else len(self._rows) - 1)

    def action_select(self) -> None:
        if self.cursor_key is not None:
            self.post_message(self.Selected(self, self.cursor_key))

    def on_click(self, event: events.Click) -> None:
        row = int(self.scroll_offset.y) + event.y - 1
        if 0 <= row < len(self._rows):
            self._put_cursor(row)

    def _put_cursor(self, row: int) -> None:
        self.cursor_row = max(0, min(row, len(self._rows) - 1))
        top = int(self.scroll_offset.y)
        height = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= top + height:
            self.scroll_to(y=self.cursor_row - height + 1, animate=False, immediate=True)
        self.refresh()

    # -- drawing --

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        scroll_x, scroll_y = int(self.scroll_offset.x), int(self.scroll_offset.y)
        if y == 0:
            cells = [name for name, _ in self._columns]
            style = self.get_component_rich_style("tail-table--header")
        else:
            index = scroll_y + y - 1
            if index >= len(self._rows):
                return Strip.blank(width, self.rich_style)
            cells = list(self._rows[index][1])
            style = self.rich_style
            if index == self.cursor_row:
                style = style + self.get_component_rich_style("tail-table--cursor")
            elif index % 2:
                style = style + self.get_component_rich_style("tail-table--odd")
        text = (
            " "
            + " ".join(_fit(str(cell), w) for cell, (_, w) in zip(cells, self._columns, strict=False))
            + " "
        )
        strip = Strip([Segment(text, style)], len(text))
        return strip.crop_extend(scroll_x, scroll_x + width, Style.null() + style)
