"""``CallersScreen`` (key 3): the gateway's tokens, by their metadata, and the actions on them.

Owns: the tokens table (caller, org, role, state, created, expires, note), showing or hiding revoked tokens,
and the issue / revoke / expiry actions (each through its modal, confirmed when it takes access away).
Never: shows, logs or keeps a token secret: the one issue answer that carries it goes straight into
``SecretOnceModal`` and no reference to it stays on this screen.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from tui.client import ConsoleSource, Document
from tui.modals import ExpiryModal, ExpiryRequest, IssueRequest, IssueTokenModal, SecretOnceModal
from tui.screens.action_screen import ActionScreen, Row
from tui.widgets.filter_bar import FilterBar

COLUMNS = ("caller", "org", "role", "state", "created", "expires", "note")
STATE_STYLE = {"active": "green", "expired": "yellow", "revoked": "red dim"}


def short_time(ts: object) -> str:
    """``2026-12-02T13:00:00.123Z`` -> ``2026-12-02 13:00`` (UTC, as the gateway gave it)."""
    if not ts:
        return "never"
    text = str(ts)
    return text[:16].replace("T", " ") if len(text) >= 16 else text


def token_rows(tokens: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for token in tokens:
        state = str(token.get("state", ""))
        fields = {
            "id": token.get("id"),
            "caller": token.get("caller"),
            "org": token.get("org"),
            "role": token.get("role"),
            "state": state,
            "created": token.get("created_at"),
            "expires": token.get("expires_at"),
            "note": token.get("note") or "",
        }
        cells = (
            Text(str(fields["caller"])),
            Text(str(fields["org"])),
            Text(str(fields["role"])),
            Text(state, style=STATE_STYLE.get(state, "")),
            str(token.get("created_at") or "")[:10],
            short_time(token.get("expires_at")),
            Text(str(fields["note"])),
        )
        rows.append((str(token.get("id")), fields, cells))
    return rows


class CallersScreen(ActionScreen):
    """Tokens of the gateway's callers: issue (i), revoke (x), change expiry (e), show revoked (a)."""

    TITLE = "Callers"
    KEY = "3"
    ACTIONS = [
        ("i", "issue", "Issue a token", True),
        ("x", "revoke", "Revoke the selected caller's tokens", True),
        ("e", "expiry", "Change the selected token's expiry", True),
        ("a", "toggle_revoked", "Show or hide revoked tokens", False),
    ]
    BINDINGS = [
        Binding("i", "issue", "Issue"),
        Binding("x", "revoke", "Revoke"),
        Binding("e", "expiry", "Expiry"),
        Binding("a", "toggle_revoked", "Revoked"),
    ]
    DEFAULT_CSS = """
    CallersScreen #rows { height: 1fr; }
    CallersScreen #callers-note { height: 1; color: $text-muted; }
    """

    def __init__(self, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.show_revoked = False

    def compose(self) -> ComposeResult:
        yield FilterBar("caller, org, role, state=active …")
        table: DataTable[object] = DataTable(id="rows", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static(id="callers-note")

    def refresh_data(self) -> None:
        show_all = self.show_revoked
        self.fetch("callers", lambda source: source.callers(all=show_all), self._show)

    def _show(self, doc: Document) -> None:
        tokens = list(doc.get("tokens", []))
        self.show_rows(token_rows(tokens))
        shown = "all tokens" if self.show_revoked else "revoked tokens hidden (a shows them)"
        self.query_one("#callers-note", Static).update(f"{len(tokens)} token(s); {shown}")

    # -- actions --

    def action_toggle_revoked(self) -> None:
        self.show_revoked = not self.show_revoked
        self.notify("Showing revoked tokens." if self.show_revoked else "Hiding revoked tokens.", timeout=2)
        self.refresh_data()

    def action_issue(self) -> None:
        if not self.guard_action("issue"):
            return

        def with_policy(policy: Document | None) -> None:
            orgs = list(((policy or {}).get("summary") or {}).get("organizations") or [])
            self.app.push_screen(IssueTokenModal(orgs), self._issue)

        self.ask_then(lambda source: source.policy(), with_policy)

    def _issue(self, request: IssueRequest | None) -> None:
        if request is None:
            return

        def call(source: ConsoleSource) -> Document:
            return source.issue(request.caller, request.org, request.role, request.expires, request.note)

        # The answer is handed to the modal and dropped: the worker's frame and this callback are the only
        # places it passes through.
        self.act("issue", call, self._show_secret)

    def _show_secret(self, answer: Document) -> None:
        secret = str(answer.pop("token", ""))
        modal = SecretOnceModal(secret, str(answer.get("caller")), answer.get("expires_at"))
        del secret
        self.app.push_screen(modal)
        self.notify(f"Issued a token for {answer.get('caller')}.", title="issue", timeout=5)
        self.refresh_data()

    def action_revoke(self) -> None:
        if not self.guard_action("revoke"):
            return
        row = self.selected()
        if row is None:
            return
        caller = str(row["caller"])
        self.confirm_then(
            f"Revoke every token of {caller}?",
            "Its applications are refused from their next request. A revoked token cannot be restored.",
            lambda: self.act_and_report(
                "revoke",
                lambda source: source.revoke(caller=caller),
                lambda answer: f"Revoked {answer.get('revoked', 0)} token(s) of {caller}.",
            ),
            label="Revoke",
        )

    def action_expiry(self) -> None:
        if not self.guard_action("expiry"):
            return
        row = self.selected()
        if row is None:
            return
        token_id, caller = int(str(row["id"])), str(row["caller"])
        current = str(row["expires"]) if row.get("expires") else None

        def chosen(request: ExpiryRequest | None) -> None:
            if request is None:
                return
            self.act_and_report(
                "expiry",
                lambda source: source.set_expiry(token_id, request.expires),
                lambda answer: (
                    f"{caller}'s token #{token_id} now "
                    + (f"expires {answer['expires_at']}." if answer.get("expires_at") else "never expires.")
                ),
            )

        self.app.push_screen(ExpiryModal(caller, token_id, current), chosen)
