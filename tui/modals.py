"""The console's modal screens: a confirmation, a secret shown once, and the forms of the action screens.

Owns: ``ConfirmModal`` (says exactly what will happen; Cancel has the focus), ``SecretOnceModal`` (an issued
token, shown once, with a copy action; it forgets the token when it closes), and the forms that collect an
action's arguments (``IssueTokenModal``, ``ExpiryModal``, ``ProviderKeyModal``). A form dismisses with what
was typed; the screen that pushed it makes the call, in a worker.
Never: calls the gateway; keeps a secret after it is dismissed; echoes a provider key or lets it be copied out
of its field; builds markup from a value (a caller name or a key could hold ``[``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

MODAL_CSS = """
.modal-box {
    width: 76; max-width: 100%; height: auto; max-height: 100%;
    border: thick $accent; background: $surface; padding: 0 1;
}
.modal-box > .modal-title { text-style: bold; width: 100%; margin-bottom: 1; }
.modal-box > .modal-detail { width: 100%; margin-bottom: 1; }
.modal-box > .modal-error { color: $error; width: 100%; height: auto; }
.modal-box > .modal-buttons { height: auto; width: 100%; align-horizontal: right; }
.modal-box > .modal-buttons > Button { margin-left: 2; }
.modal-box Input, .modal-box Select { width: 100%; }
.modal-box > .field { height: auto; width: 100%; margin-bottom: 1; }
.modal-box > .field > Label { width: 14; padding-right: 1; }
.modal-box > .field > Input, .modal-box > .field > Select { width: 1fr; }
.modal-box > .modal-hint { color: $text-muted; width: 100%; }
"""

EXPIRY_HINT = "30d, 12h, 45m or an ISO 8601 time; empty: never expires"


class ConsoleModal(ModalScreen[Any]):
    """What every console modal shares: centred, and its CSS."""

    DEFAULT_CSS = "ConsoleModal { align: center middle; }\n" + MODAL_CSS


class ConfirmModal(ConsoleModal):
    """Asks before anything that changes the gateway; dismisses with True only on an explicit yes."""

    AUTO_FOCUS = "#cancel"
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel"),
    ]

    def __init__(self, question: str, consequence: str = "", confirm_label: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.consequence = consequence
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal-box"):
            yield Static(Content(self.question), classes="modal-title", id="question")
            if self.consequence:
                yield Static(Content(self.consequence), classes="modal-detail", id="consequence")
            with Horizontal(classes="modal-buttons"):
                yield Button("Cancel (n)", id="cancel")
                yield Button(f"{self.confirm_label} (y)", id="confirm", variant="error")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")


class SecretOnceModal(ConsoleModal):
    """Shows a newly issued token once. On close it blanks its widget and drops every reference it holds."""

    AUTO_FOCUS = "#done"
    BINDINGS = [
        Binding("c", "copy", "Copy"),
        Binding("escape", "close", "Close"),
    ]

    def __init__(self, secret: str, caller: str, expires_at: str | None) -> None:
        super().__init__()
        self._secret: str | None = secret
        self.caller = caller
        self.expires_at = expires_at

    def compose(self) -> ComposeResult:
        expiry = f"expires {self.expires_at}" if self.expires_at else "never expires"
        with Vertical(classes="modal-box"):
            yield Static(Content(f"Token issued for {self.caller} ({expiry})"), classes="modal-title")
            yield Static(Content(self._secret or ""), id="secret", classes="modal-detail")
            yield Static(
                "This token is shown once and never again: the gateway keeps only its hash. Copy it now "
                "(c) and hand it to the application's owner.",
                classes="modal-detail",
                id="warning",
            )
            with Horizontal(classes="modal-buttons"):
                yield Button("Copy (c)", id="copy")
                yield Button("Done", id="done", variant="primary")

    @property
    def showing(self) -> bool:
        """Whether the modal still holds its token (False once it has closed)."""
        return self._secret is not None

    def action_copy(self) -> None:
        if self._secret is not None:
            self.app.copy_to_clipboard(self._secret)
            self.notify("Token copied to the clipboard.", timeout=3)

    def action_close(self) -> None:
        self._forget()
        self.dismiss(None)

    @on(Button.Pressed, "#copy")
    def _copy_pressed(self) -> None:
        self.action_copy()

    @on(Button.Pressed, "#done")
    def _done_pressed(self) -> None:
        self.action_close()

    def on_unmount(self) -> None:
        # Closed some other way than Done or escape (the console quit with it open): forget all the same.
        self._forget()

    def _forget(self) -> None:
        for node in self.query("#secret").results(Static):
            node.update("")
        # copy_to_clipboard also keeps the text in the app for in-app pastes; the terminal's clipboard
        # (OSC 52) already has it, so the app's copy is one more place the token would outlive this modal.
        if self._secret is not None and self.app.clipboard == self._secret:
            self.app._clipboard = ""
        self._secret = None


class SecretInput(Input):
    """A password field whose text cannot be copied or cut out of it."""

    def action_copy(self) -> None:
        return

    def action_cut(self) -> None:
        return


def field(label: str, widget: Input | Select[str]) -> Horizontal:
    """One line of a form: its label, then its (compact) input."""
    return Horizontal(Label(label), widget, classes="field")


def text_input(id: str, placeholder: str = "", value: str | None = None, disabled: bool = False) -> Input:
    return Input(value, placeholder=placeholder, id=id, compact=True, disabled=disabled)


def choice(id: str, options: list[str], allow_blank: bool = False) -> Select[str]:
    first = options[0] if options and not allow_blank else Select.NULL
    return Select([(o, o) for o in options], value=first, allow_blank=allow_blank, id=id, compact=True)


class _FormModal(ConsoleModal):
    """A form: Enter in the last field or the Apply button submits, escape cancels (dismisses None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    TITLE_TEXT = ""
    APPLY_LABEL = "Apply"

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal-box"):
            yield Static(Content(self.TITLE_TEXT), classes="modal-title")
            yield from self.fields()
            yield Static("", classes="modal-error", id="form-error")
            with Horizontal(classes="modal-buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self.APPLY_LABEL, id="apply", variant="primary")

    def fields(self) -> ComposeResult:
        raise NotImplementedError

    def collect(self) -> Any:
        """The form's result, or raise ``ValueError`` with what to fix."""
        raise NotImplementedError

    def value(self, selector: str) -> str:
        widget = self.query_one(selector)
        if isinstance(widget, Select):
            return "" if widget.value is Select.NULL else str(widget.value)
        assert isinstance(widget, Input)
        return widget.value.strip()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_submit(self) -> None:
        try:
            result = self.collect()
        except ValueError as exc:
            self.query_one("#form-error", Static).update(Content(str(exc)))
            return
        self.dismiss(result)

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    @on(Button.Pressed, "#apply")
    def _apply_pressed(self) -> None:
        self.action_submit()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        if event.input is inputs[-1]:
            self.action_submit()
        else:
            self.focus_next()


@dataclass(frozen=True)
class IssueRequest:
    caller: str
    org: str
    role: str
    expires: str | None
    note: str | None


class IssueTokenModal(_FormModal):
    """The arguments of ``/admin/callers/issue``; organizations and roles come from the policy when known."""

    TITLE_TEXT = "Issue a token"
    APPLY_LABEL = "Issue"

    def __init__(self, organizations: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.roles_of = {str(o["org"]): [str(r) for r in o.get("roles", [])] for o in organizations or []}

    def fields(self) -> ComposeResult:
        yield field("Caller", text_input("caller", "the application's name, e.g. radiology-bot"))
        if self.roles_of:
            orgs = sorted(self.roles_of)
            yield field("Organization", choice("org", orgs))
            yield field("Role", choice("role", self.roles_of[orgs[0]]))
        else:
            yield field("Organization", text_input("org", "as in the policy, e.g. stmarys"))
            yield field("Role", text_input("role", "as in the policy, e.g. radiology"))
        yield field("Expires", text_input("expires", "30d"))
        yield Static(EXPIRY_HINT, classes="modal-hint")
        yield field("Note", text_input("note", "who asked for it, a ticket"))

    @on(Select.Changed, "#org")
    def _org_changed(self, event: Select.Changed) -> None:
        roles = self.roles_of.get(str(event.value), [])
        self.query_one("#role", Select).set_options([(r, r) for r in roles])

    def collect(self) -> IssueRequest:
        caller, org, role = self.value("#caller"), self.value("#org"), self.value("#role")
        missing = [name for name, v in (("caller", caller), ("organization", org), ("role", role)) if not v]
        if missing:
            raise ValueError("Fill in: " + ", ".join(missing))
        return IssueRequest(caller, org, role, self.value("#expires") or None, self.value("#note") or None)


@dataclass(frozen=True)
class ExpiryRequest:
    expires: str | None


class ExpiryModal(_FormModal):
    """A token's new expiry (``/admin/callers/expiry``)."""

    APPLY_LABEL = "Set expiry"

    def __init__(self, caller: str, token_id: int, current: str | None) -> None:
        super().__init__()
        self.TITLE_TEXT = f"Expiry of {caller}'s token #{token_id} (now: {current or 'never'})"

    def fields(self) -> ComposeResult:
        yield field("New expiry", text_input("expires", "30d"))
        yield Static(EXPIRY_HINT, classes="modal-hint")

    def collect(self) -> ExpiryRequest:
        return ExpiryRequest(self.value("#expires") or None)


class KeyRequest:
    """A provider key on its way to ``/admin/keys/set``; its repr never shows the key."""

    __slots__ = ("key", "rotate", "route")

    def __init__(self, route: str, key: str, rotate: bool = False) -> None:
        self.route = route
        self.key = key
        self.rotate = rotate

    def __repr__(self) -> str:
        return f"KeyRequest(route={self.route!r}, key=<hidden>)"


class ProviderKeyModal(_FormModal):
    """A route's provider key (``/admin/keys/set``): typed into a password field, cleared on submit."""

    APPLY_LABEL = "Save key"

    def __init__(self, routes: list[str], route: str | None = None, rotate: bool = False) -> None:
        super().__init__()
        self.routes = routes
        self.route = route
        self.rotate = rotate
        self.TITLE_TEXT = f"Rotate the provider key of {route}" if rotate else "Set a provider key"

    def fields(self) -> ComposeResult:
        if self.route is not None:
            yield field("Route", text_input("route", value=self.route, disabled=True))
        elif self.routes:
            yield field("Route", choice("route", self.routes))
        else:
            yield field("Route", text_input("route", "the policy's route name, e.g. openai"))
        yield field("Key", SecretInput(password=True, id="key", compact=True))
        yield Static(
            "The key is never shown, here or anywhere; the gateway keeps it sealed.", classes="modal-hint"
        )

    def collect(self) -> KeyRequest:
        route = self.value("#route")
        field = self.query_one("#key", SecretInput)
        key = field.value.strip()
        if not route or not key:
            raise ValueError("Fill in the route and the key")
        field.value = ""
        return KeyRequest(route, key, self.rotate)

    def action_cancel(self) -> None:
        self._clear()
        super().action_cancel()

    def on_unmount(self) -> None:
        self._clear()

    def _clear(self) -> None:
        for node in self.query("#key").results(SecretInput):
            node.value = ""
