"""``ConsoleScreen``: the contract every console screen keeps with the app (``tui.app.PhiConsole``).

Owns: what a screen declares (``TITLE``, ``KEY``, ``ACTIONS``), what it is given (``source``, ``read_only``),
how it fetches (``fetch``/``act``: blocking calls in thread workers, results back on the UI thread), and the
two lines the app draws on every screen (the status line and the "gateway not running" banner).
Never: calls the source on the UI thread; imports ``tui.app`` (the app imports the screens); starts a
gateway; lets an ``OperatorError`` escape (it becomes the banner or a notification).

The contract, for whoever writes a screen:

* ``TITLE`` (shown in the status line and the help), ``KEY`` ("1".."7": the number key that shows it).
* ``ACTIONS``: ``(key, action, description, changes_something)`` for every key of the screen. The command
  palette and the help list them; in read-only mode the palette leaves out those that change something,
  and the screen hides them from its key bar and refuses their keys with a notice (``check_action``,
  ``on_key``).
  A key in ``ACTIONS`` that ``BINDINGS`` does not bind is bound for you, shown in the footer with the
  description up to its first ": " ("Prove: show that the ledger holds this record" -> "Prove").
* ``refresh_data()``: called once a second while the screen is visible (and once when it is first shown);
  override it. Fetch with ``self.fetch(name, call, apply)``: ``call(source)`` runs in a thread worker,
  ``apply(result)`` on the UI thread; a fetch whose previous one of the same name is still running is
  skipped (updates coalesce). Update widgets in place (``DataTable.update_cell``, ``Sparkline.data``),
  never rebuild them, so nothing flickers and the cursor stays where the operator left it.
* An action that changes something starts with ``if not self.guard_action("revoke"): return`` and runs
  with ``self.act(description, call, on_done)``; failures become an error notification.
* A screen with a filter gives its ``Input`` the id ``filter`` (``tui.widgets.FilterBar`` does); ``/``
  focuses it, Enter or Escape leaves it. A screen opens with its first ``DataTable`` focused (never the
  filter: the number keys must switch screens, not type into it).
* The app calls ``show_gateway(state_line, banner)`` on the visible screen: ``banner`` is ``None`` while the
  gateway answers. Screens keep their own state when the operator switches away: they are never rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Input, Static

from appliance.errors import OperatorError
from tui.widgets.key_bar import KeyBar

if TYPE_CHECKING:
    from tui.client import ConsoleSource

T = TypeVar("T")

Action = tuple[str, str, str, bool]
"""(binding key, action name, description, changes_something)"""


class ConsoleHost(Protocol):
    """What a screen needs of the app (``tui.app.PhiConsole`` is one)."""

    source: ConsoleSource
    read_only: bool

    def note_gateway(self, error: OperatorError | None) -> None:
        """Tell the app whether the gateway answered (``None``) or why it did not."""

    def screen_shown(self, screen: ConsoleScreen) -> None:
        """Tell the app a screen became visible (it draws the chrome and refreshes it at once)."""


def gateway_is_down(error: OperatorError) -> bool:
    """Whether an error means nothing answers on the socket (the client raises from the ``OSError``), as
    against a gateway that answered and refused."""
    return isinstance(error.__cause__, OSError)


class ConsoleScreen(Screen[None]):
    """A console screen: see the module docstring for the contract."""

    TITLE: ClassVar[str] = ""
    KEY: ClassVar[str] = ""
    ACTIONS: ClassVar[list[Action]] = []
    AUTO_FOCUS = "DataTable"  # not the filter: the number keys must switch screens, not type into it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # before Textual merges the bindings (in ``DOMNode.__init_subclass__``)
        if "ACTIONS" in cls.__dict__:
            own: list[BindingType] = list(cls.__dict__.get("BINDINGS", []))
            bound = {b.key if isinstance(b, Binding) else b[0] for b in own}
            shown: set[str] = set()
            for key, action, description, _changes in cls.ACTIONS:
                if key not in bound:
                    label = description.split(": ", 1)[0]  # "Pause: new records are counted…" -> "Pause"
                    own.append(Binding(key, action, label, show=action not in shown))
                    bound.add(key)
                    shown.add(action)
            cls.BINDINGS = own
        super().__init_subclass__(**kwargs)

    @classmethod
    def changing_actions(cls) -> frozenset[str]:
        return frozenset(action for _key, action, _desc, changes in cls.ACTIONS if changes)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """In read-only mode an action that changes something is hidden from the footer and disabled (its key
        still reaches ``guard_action`` through ``on_key``, so the operator hears why)."""
        if self.read_only and action in self.changing_actions():
            return False
        return True

    def on_key(self, event: events.Key) -> None:
        if not self.read_only:
            return
        for key, action, _desc, changes in self.ACTIONS:
            if changes and event.key == key:
                event.stop()
                self.guard_action(action)
                return

    def __init__(self, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self._fetching: set[str] = set()
        self._chrome: tuple[str, str | None] | None = None

    # -- what the screen is given --

    @property
    def host(self) -> ConsoleHost:
        return cast("ConsoleHost", self.app)

    @property
    def source(self) -> ConsoleSource:
        return self.host.source

    @property
    def read_only(self) -> bool:
        return self.host.read_only

    # -- what a screen overrides --

    def refresh_data(self) -> None:
        """Called once a second while visible. Override; fetch with ``self.fetch``."""

    # -- the chrome the app draws on every screen --

    # Handlers named ``_on_…`` run besides (not instead of) Textual's own and a subclass's ``on_…``.
    def _on_mount(self, event: events.Mount) -> None:
        top = Vertical(
            Static(id="status-line", markup=False),
            Static(id="down-banner", classes="hidden", markup=False),
            id="console-top",
        )
        self.mount(top, before=0 if self.children else None)
        self.mount(KeyBar())

    def _on_screen_resume(self, event: events.ScreenResume) -> None:
        # Textual restyles every widget of a screen it shows again, for a stylesheet that changed while it
        # was hidden; this console's never does (no theme switching, and classes set on a hidden screen
        # restyle at once). Measured: a third of the widgets restyled per switch. Runs before Screen's own.
        event.refresh_styles = False
        # after the refresh: on first showing, the screen's widgets finish mounting first
        self.call_after_refresh(self.host.screen_shown, self)

    def show_gateway(self, state_line: str, banner: str | None) -> None:
        """Draw the status line, and the banner when ``banner`` is not ``None`` (the app calls this)."""
        if self._chrome == (state_line, banner) or not self.is_mounted:
            return
        self._chrome = (state_line, banner)
        for node in self.query("#status-line"):
            cast(Static, node).update(state_line)
        for node in self.query("#down-banner"):
            cast(Static, node).update(banner or "")
            node.set_class(banner is None, "hidden")

    def focus_filter(self) -> bool:
        """Focus the screen's filter input, if it has one."""
        for node in self.query("#filter"):
            if isinstance(node, Input):
                node.focus()
                return True
        return False

    # -- fetching and acting --

    def show_error(self, message: str) -> None:
        self.notify(message, title="error", severity="error", timeout=6)

    def guard_action(self, action: str = "this action") -> bool:
        """False, with a notification, when the console is read-only."""
        if self.read_only:
            self.notify(f"read-only console: {action} is refused", severity="warning")
            return False
        return True

    def fetch(self, name: str, call: Callable[[ConsoleSource], T], apply: Callable[[T], None]) -> None:
        """Run ``call(source)`` in a thread worker and ``apply`` its result on the UI thread; skipped while
        the previous fetch of the same ``name`` is still running."""
        if name in self._fetching:
            return
        self._fetching.add(name)
        self.run_worker(
            lambda: self._fetch_in_thread(name, call, apply),
            name=name,
            group=f"fetch-{name}",
            thread=True,
            exit_on_error=False,
        )

    def _fetch_in_thread(
        self, name: str, call: Callable[[ConsoleSource], T], apply: Callable[[T], None]
    ) -> None:
        try:
            result = call(self.source)
        except OperatorError as exc:
            self._from_thread(self._fetched, name, exc, None)
            return
        except Exception:
            self._from_thread(self._fetching.discard, name)
            raise
        self._from_thread(self._fetched, name, None, lambda: apply(result))

    def _fetched(self, name: str, error: OperatorError | None, apply: Callable[[], None] | None) -> None:
        self._fetching.discard(name)
        self.host.note_gateway(error)
        if apply is not None:
            apply()

    def act(
        self,
        description: str,
        call: Callable[[ConsoleSource], T],
        on_done: Callable[[T], None] | None = None,
    ) -> None:
        """Run an action in a thread worker; its failure becomes an error notification naming it."""

        def run() -> None:
            try:
                result = call(self.source)
            except OperatorError as exc:
                self._from_thread(self.show_error, f"{description} failed: {exc}")
                return
            if on_done is not None:
                self._from_thread(on_done, result)

        self.run_worker(run, name=description, group="act", thread=True, exit_on_error=False)

    def _from_thread(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            self.app.call_from_thread(callback, *args)
        except RuntimeError:
            pass  # the app is closing: nobody is left to show the result to

    def compose(self) -> ComposeResult:
        yield from ()
