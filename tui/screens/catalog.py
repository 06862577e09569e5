"""The catalog of everything the operator can do: every screen's keys, and the console's own.

Owns: ``Entry`` and ``build_catalog`` (what the help screen and the command palette list). Never: runs an
action; imports a screen module (the app hands the screen classes in).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tui.screens.base import Action, ConsoleScreen

CONSOLE_ACTIONS: list[Action] = [
    ("?", "help", "Help: every key of every screen (also F1)", False),
    ("ctrl+p", "command_palette", "Palette: every action, searchable", False),
    ("/", "focus_filter", "Filter: narrow the current screen's table (Enter or Escape leaves it)", False),
    ("q", "quit", "Quit: leave the console (the gateway keeps running)", False),
]
"""The keys that work on every screen (the number keys are added per screen)."""

KEY_NAMES = {"question_mark": "?", "slash": "/"}
"""How a key is written for people, where Textual's name for it differs."""


@dataclass(frozen=True)
class Entry:
    group: str  # "Console" or the screen's title
    screen_key: str | None  # the screen the action runs on; None: the console's own
    key: str
    action: str
    description: str
    changes: bool


def build_catalog(screens: Iterable[type[ConsoleScreen]], read_only: bool) -> list[Entry]:
    """Every action, the console's first; ``read_only`` leaves out those that change something."""
    screens = list(screens)
    entries = [Entry("Console", None, key, action, desc, False) for key, action, desc, _ in CONSOLE_ACTIONS]
    entries += [
        Entry(
            "Console", None, cls.KEY, f"show('{cls.KEY}')", f"{cls.TITLE}: show the {cls.TITLE} screen", False
        )
        for cls in screens
    ]
    for cls in screens:
        for key, action, description, changes in cls.ACTIONS:
            if changes and read_only:
                continue
            entries.append(Entry(cls.TITLE, cls.KEY, key, action, description, changes))
    return entries
