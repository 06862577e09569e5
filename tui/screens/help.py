"""``HelpScreen`` (F1 or ``?``): every key of every screen, grouped by screen.

Owns: drawing the catalog. Never: runs an action; hides one (in a read-only console the actions that
change something are listed, marked as refused).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from tui.screens.base import ConsoleScreen
from tui.screens.catalog import KEY_NAMES, build_catalog
from tui.widgets.key_bar import KeyBar

CHANGES = "  (changes the gateway)"
CHANGES_REFUSED = "  (changes the gateway; refused here)"


class HelpScreen(Screen[None]):
    """Every key, by screen; ``escape``, ``?``, F1 or ``q`` closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,f1,q", "close", "Close help"),
    ]

    def __init__(self, screens: Iterable[type[ConsoleScreen]], read_only: bool) -> None:
        super().__init__(id="help")
        self._screens = list(screens)
        self._read_only = read_only

    def compose(self) -> ComposeResult:
        refused = "  (read-only: actions that change something are refused)" if self._read_only else ""
        title = "Phi Gateway console — keys" + refused
        yield Static(title, id="help-title", markup=False)
        with VerticalScroll(id="help-body"):
            for group, entries in groupby(build_catalog(self._screens, False), key=lambda e: e.group):
                table = Table(box=None, show_header=False, padding=(0, 1), expand=True)
                table.add_column(width=8, style="bold", no_wrap=True)
                table.add_column(ratio=1)
                for entry in entries:
                    text = Text(entry.description)
                    if entry.changes:
                        text.append(CHANGES_REFUSED if self._read_only else CHANGES, style="italic")
                    table.add_row(KEY_NAMES.get(entry.key, entry.key), text)
                panel = Static(table, classes="help-group")
                panel.border_title = group
                yield panel
        yield KeyBar()

    def action_close(self) -> None:
        self.dismiss()
