"""``ConsoleCommands``: the command palette's provider (ctrl+p): every action of every screen, with its key.

Owns: matching what the operator types against the catalog and running the chosen entry through the app.
Never: lists an action that changes something in a read-only console (the catalog leaves them out); runs an
action itself (``run_entry`` on the app does, on the right screen).
"""

from __future__ import annotations

from collections.abc import Awaitable
from functools import partial
from typing import Protocol, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tui.screens.catalog import KEY_NAMES, Entry


class CatalogHost(Protocol):
    def catalog(self) -> list[Entry]: ...
    def run_entry(self, entry: Entry) -> Awaitable[None]: ...


def entry_text(entry: Entry) -> str:
    """One palette line; no square brackets, which the palette would read as markup."""
    text = f"{entry.group}: {entry.description}  ·  key {KEY_NAMES.get(entry.key, entry.key)}"
    return text.replace("[", "(").replace("]", ")")


class ConsoleCommands(Provider):
    """Every entry of the console's catalog."""

    @property
    def _host(self) -> CatalogHost:
        return cast("CatalogHost", self.app)

    async def discover(self) -> Hits:
        for entry in self._host.catalog():
            yield DiscoveryHit(entry_text(entry), partial(self._host.run_entry, entry), help=entry.action)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for entry in self._host.catalog():
            text = entry_text(entry)
            score = matcher.match(text)
            if score > 0:
                yield Hit(
                    score, matcher.highlight(text), partial(self._host.run_entry, entry), help=entry.action
                )
