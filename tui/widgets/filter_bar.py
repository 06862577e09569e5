"""``FilterBar``: the ``/`` input that narrows a table, and ``RowFilter``, what the operator typed.

Owns: the filter language (words match as case-insensitive substrings of any column; ``field=value`` terms
match a field exactly, case-insensitively) and the message a screen listens for.
Never: talks to the gateway (a screen that sends the terms to the server as query filters does so itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Input, Label


@dataclass(frozen=True)
class RowFilter:
    """What the filter bar holds: ``terms`` (field -> value) and free ``words``."""

    terms: Mapping[str, str] = field(default_factory=dict)
    words: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, aliases: Mapping[str, str] | None = None) -> RowFilter:
        """``caller=x status=429 timeout`` -> terms {caller: x, status: 429}, words (timeout,).
        ``aliases`` renames a typed field to the row's field (``status`` -> ``status_code``)."""
        terms: dict[str, str] = {}
        words: list[str] = []
        for part in text.split():
            name, eq, value = part.partition("=")
            if eq and name and value:
                terms[(aliases or {}).get(name, name)] = value
            elif part:
                words.append(part.lower())
        return cls(terms, tuple(words))

    def __bool__(self) -> bool:
        return bool(self.terms or self.words)

    def matches(self, row: Mapping[str, object]) -> bool:
        for name, value in self.terms.items():
            if _text(row.get(name)).lower() != value.lower():
                return False
        if self.words:
            haystack = " ".join(_text(v) for v in row.values()).lower()
            return all(word in haystack for word in self.words)
        return True


def _text(value: object) -> str:
    return "" if value is None else str(value)


class FilterBar(Horizontal):
    """A one-line filter input (id ``filter``, focused by ``/``); posts ``FilterBar.Changed`` on Enter and
    on every edit."""

    class Changed(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "leave", "Leave the filter", show=False)]

    def __init__(self, placeholder: str = "text, or field=value …", *, id: str | None = "filter-bar") -> None:
        super().__init__(id=id)
        self._placeholder = placeholder

    def compose(self) -> ComposeResult:
        yield Label("/ filter ", classes="filter-label")
        yield Input(placeholder=self._placeholder, id="filter")

    @property
    def text(self) -> str:
        return self.query_one("#filter", Input).value

    @on(Input.Changed, "#filter")
    def _edited(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.Changed(event.value))

    @on(Input.Submitted, "#filter")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Changed(event.value))
        self.action_leave()

    def action_leave(self) -> None:
        """Give the keys back to the screen (its table), so the number keys switch screens again."""
        self.screen.focus_next()
