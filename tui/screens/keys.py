"""``KeysScreen`` (key 6): the provider keys the gateway holds, by route and fingerprint, and setting them.

Owns: the keys table (route, fingerprint, updated; routes of the policy that need a key and have none are
flagged), and the set / rotate / remove actions (rotate and remove confirmed first).
Never: shows, returns or keeps a key value: it goes from the password field to one ``set_key`` call in a
worker and nowhere else; the gateway answers with a fingerprint only.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from tui.client import ConsoleSource, Document
from tui.modals import KeyRequest, ProviderKeyModal
from tui.screens.action_screen import ActionScreen, Row
from tui.screens.callers import short_time
from tui.widgets.filter_bar import FilterBar

COLUMNS = ("route", "fingerprint", "updated", "")
MISSING = "no key: its requests fail"


def key_rows(doc: Document) -> list[Row]:
    rows: list[Row] = []
    held: set[str] = set()
    for key in doc.get("keys", []):
        route = str(key.get("route"))
        held.add(route)
        fields = {"route": route, "fingerprint": key.get("fingerprint"), "state": "set"}
        cells: tuple[object, ...] = (
            Text(route),
            str(key.get("fingerprint") or ""),
            short_time(key.get("updated_at")),
            "",
        )
        rows.append((route, fields, cells))
    for route in doc.get("routes_needing_keys", []):
        if str(route) not in held:
            fields = {"route": str(route), "fingerprint": None, "state": "missing"}
            cells = (Text(str(route), style="bold red"), "", "", Text(MISSING, style="bold red"))
            rows.append((str(route), fields, cells))
    return rows


class KeysScreen(ActionScreen):
    """Provider keys: set (s), rotate (o) and remove (d)."""

    TITLE = "Keys"
    KEY = "6"
    ACTIONS = [
        ("s", "set_key", "Set a provider key for a route without one", True),
        ("o", "rotate_key", "Rotate the selected route's provider key", True),
        ("d", "remove_key", "Remove the selected route's provider key", True),
    ]
    BINDINGS = [
        Binding("s", "set_key", "Set"),
        Binding("o", "rotate_key", "Rotate"),
        Binding("d", "remove_key", "Remove"),
    ]
    DEFAULT_CSS = """
    KeysScreen #rows { height: 1fr; }
    KeysScreen #keys-note { height: auto; color: $text-muted; }
    """

    def __init__(self, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self._doc: Document = {}

    def compose(self) -> ComposeResult:
        yield FilterBar("route, state=missing …")
        table: DataTable[object] = DataTable(id="rows", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static(id="keys-note")

    def refresh_data(self) -> None:
        self.fetch("keys", lambda source: source.keys(), self._show)

    def _show(self, doc: Document) -> None:
        self._doc = doc
        self.show_rows(key_rows(doc))
        missing = self.missing_routes()
        note = (
            f"{len(missing)} route(s) of the policy need a key and have none: {', '.join(missing)}"
            if missing
            else "Every route of the policy that needs a key has one."
        )
        self.query_one("#keys-note", Static).update(Text(note, style="bold red" if missing else ""))

    def held_routes(self) -> list[str]:
        return [str(k.get("route")) for k in self._doc.get("keys", [])]

    def missing_routes(self) -> list[str]:
        held = set(self.held_routes())
        return [str(r) for r in self._doc.get("routes_needing_keys", []) if str(r) not in held]

    # -- actions --

    def action_set_key(self) -> None:
        if not self.guard_action("set key"):
            return
        self.app.push_screen(ProviderKeyModal(self.missing_routes()), self._save)

    def _route_with_key(self, action: str, missing: str) -> str | None:
        """The selected route, when it has a key and ``action`` is allowed; else None (and say why)."""
        if not self.guard_action(action):
            return None
        row = self.selected()
        if row is None:
            return None
        route = str(row["route"])
        if row.get("state") != "set":
            self.notify(f"{route} has no key to {missing}.", severity="warning", timeout=4)
            return None
        return route

    def action_rotate_key(self) -> None:
        route = self._route_with_key("rotate key", "rotate: set one with s")
        if route is None:
            return
        self.confirm_then(
            f"Replace the provider key of {route}?",
            "Its requests use the new key from their next call; the old key is forgotten by the gateway.",
            lambda: self.app.push_screen(ProviderKeyModal([route], route, rotate=True), self._save),
            label="Rotate",
        )

    def action_remove_key(self) -> None:
        route = self._route_with_key("remove key", "remove")
        if route is None:
            return
        self.confirm_then(
            f"Remove the provider key of {route}?",
            f"Requests to {route} fail from their next call until a key is set again.",
            lambda: self.act_and_report(
                "remove key",
                lambda source: source.remove_key(route),
                lambda _answer: f"The provider key of {route} is removed.",
            ),
            label="Remove",
        )

    def _save(self, request: KeyRequest | None) -> None:
        if request is None:
            return
        route = request.route
        if route in self.held_routes() and not request.rotate:
            self.notify(f"{route} already has a key: rotate it with o.", severity="warning", timeout=5)
            request.key = ""
            return
        holder = [request]
        del request

        def call(source: ConsoleSource) -> Document:
            # Take the key out of the one holder so that nothing here keeps it after the call.
            pending = holder.pop()
            key, pending.key = pending.key, ""
            return source.set_key(route, key)

        self.act_and_report("set key", call, _set_outcome)


def _set_outcome(answer: dict[str, Any]) -> str:
    verb = "rotated" if answer.get("rotated") else "set"
    return f"The provider key of {answer.get('route')} is {verb} (fingerprint {answer.get('fingerprint')})."
