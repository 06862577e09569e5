"""``KeyValue``: a two-column panel of labelled values, redrawn in place.

Owns: how a list of (label, value) pairs is drawn. Never: talks to the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from rich.text import Text
from textual.widgets import Static


class KeyValue(Static):
    """Labelled values, one a line; ``show(pairs)`` redraws only when they changed."""

    def __init__(self, title: str = "", *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.border_title = title or None
        self._shown: list[tuple[str, str]] | None = None

    @property
    def shown(self) -> dict[str, str]:
        """What the panel shows now, label -> value."""
        return dict(self._shown or [])

    def show(self, pairs: Iterable[tuple[str, object]]) -> None:
        rows = [(label, "" if value is None else str(value)) for label, value in pairs]
        if rows == self._shown:
            return
        self._shown = rows
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for label, value in rows:
            grid.add_row(label, Text(value))
        self.update(grid)
