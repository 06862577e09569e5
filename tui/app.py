"""``PhiConsole``: the operator console (``phi-gateway console``), a Textual app over the admin socket.

Owns: the seven screens on the number keys (installed once, so switching never loses the operator's place),
the once-a-second poll of the visible screen, the gateway's connection state (status line and the "gateway
not running" banner on every screen), the help screen, the command palette and the keys that work
everywhere. Never: starts, stops or restarts a gateway; calls the source on the UI thread; imports the
server side (it talks to ``ConsoleSource`` only).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import ClassVar

from textual import events
from textual.app import App
from textual.binding import Binding, BindingType
from textual.widgets import Input

from appliance.errors import OperatorError
from tui.client import ConsoleSource
from tui.palette import ConsoleCommands
from tui.screens.audit import AuditScreen
from tui.screens.base import ConsoleScreen, gateway_is_down
from tui.screens.callers import CallersScreen
from tui.screens.catalog import Entry, build_catalog
from tui.screens.dashboard import DashboardScreen
from tui.screens.help import HelpScreen
from tui.screens.keys import KeysScreen
from tui.screens.ledger import LedgerScreen
from tui.screens.models import ModelsScreen
from tui.screens.policy import PolicyScreen

SCREENS: tuple[type[ConsoleScreen], ...] = (
    DashboardScreen,
    AuditScreen,
    CallersScreen,
    ModelsScreen,
    PolicyScreen,
    KeysScreen,
    LedgerScreen,
)
POLL_S = 1.0
FREEZE_AFTER_S = 2.0
"""Once the screens are built, their objects leave the collector's view (``gc.freeze``): a full collection
over Textual's tens of thousands of long-lived objects took 150-190 ms, the console's worst key presses."""
GC_THRESHOLDS = (25_000, 20, 20)
"""Collect the young generation every 25,000 allocations rather than 700: under a full audit tail the
default spent ~1 s of every 12 in 945 collections (bench/console.py), and paused a key press by up to 73 ms
in a full one; the same work in far fewer, rarer passes."""
RETRY_EVERY = 2  # ticks: while the gateway is down, ask every 2 s (the banner says so)


class PhiConsole(App[None]):
    """The console. ``source`` answers every question; ``read_only`` refuses every action that changes
    something (and hides it from the palette)."""

    CSS_PATH = "console.tcss"
    TITLE = "Phi Gateway console"
    COMMANDS: ClassVar = {ConsoleCommands}
    ENABLE_COMMAND_PALETTE = True
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(cls.KEY, f"show('{cls.KEY}')", cls.TITLE, show=False) for cls in SCREENS),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("slash", "focus_filter", "Filter", key_display="/"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        source: ConsoleSource,
        *,
        read_only: bool = False,
        cursor_blink: bool = True,
        poll_s: float = POLL_S,
        screens: Sequence[type[ConsoleScreen]] = SCREENS,
        tune_gc: bool = False,
    ) -> None:
        """``tune_gc``: the console owns its process (``phi-gateway console``, the bench), so it may set the
        garbage collector for a live screen (``GC_THRESHOLDS``, ``FREEZE_AFTER_S``); tests leave it as is."""
        super().__init__()
        self._tune_gc = tune_gc
        self.source = source
        self.read_only = read_only
        self.cursor_blink = cursor_blink
        self.screen_classes = {cls.KEY: cls for cls in screens}
        self._poll_s = poll_s
        self._ticks = 0
        self.gateway_error: OperatorError | None = None

    # -- screens --

    def on_mount(self) -> None:
        for key, cls in self.screen_classes.items():
            self.install_screen(cls(), name=key)
        self.push_screen(next(iter(self.screen_classes)))
        self.set_interval(self._poll_s, self._tick)
        if self._tune_gc:
            self.set_timer(FREEZE_AFTER_S, gc.freeze)
            gc.set_threshold(*GC_THRESHOLDS)

    def console_screen(self) -> ConsoleScreen | None:
        """The console screen the operator sees (under any modal or help on top of it)."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ConsoleScreen):
                return screen
        return None

    async def action_show(self, key: str) -> None:
        while len(self.screen_stack) > 1 and not isinstance(self.screen, ConsoleScreen):
            await self.pop_screen()
        if self.screen is not self.get_screen(key):
            await self.switch_screen(key)

    def screen_shown(self, screen: ConsoleScreen) -> None:
        self._draw_chrome(screen)
        screen.refresh_data()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen_classes.values(), self.read_only))

    def action_focus_filter(self) -> None:
        screen = self.console_screen()
        if screen is not None and screen is self.screen and not screen.focus_filter():
            self.notify(f"the {screen.TITLE} screen has no filter")

    def catalog(self) -> list[Entry]:
        return build_catalog(self.screen_classes.values(), self.read_only)

    async def run_entry(self, entry: Entry) -> None:
        """Run a palette entry: on its screen (shown first), or the console's own."""
        if entry.screen_key is None:
            await self.run_action(entry.action)
            return
        await self.action_show(entry.screen_key)
        await self.run_action(entry.action, self.get_screen(entry.screen_key))

    # -- polling and the gateway's state --

    def _tick(self) -> None:
        self._ticks += 1
        if self.gateway_error is not None and self._ticks % RETRY_EVERY:
            return
        screen = self.console_screen()
        # a screen switched to in this tick may not have its widgets yet: screen_shown refreshes it then
        if screen is not None and screen.is_mounted:
            screen.refresh_data()

    def note_gateway(self, error: OperatorError | None) -> None:
        was = None if self.gateway_error is None else str(self.gateway_error)
        self.gateway_error = error
        if was != (None if error is None else str(error)):
            screen = self.console_screen()
            if screen is not None:
                self._draw_chrome(screen)

    def _draw_chrome(self, screen: ConsoleScreen) -> None:
        where = self.source.where
        error = self.gateway_error
        if error is None:
            state, banner = "● connected", None
        elif gateway_is_down(error):
            state = "✖ not running"
            banner = f"gateway not running — nothing answers on {where}; retrying every {RETRY_EVERY} s"
        else:
            state = "▲ refused"
            banner = f"the gateway refused: {error}; retrying every {RETRY_EVERY} s"
        mode = "  READ-ONLY" if self.read_only else ""
        screen.show_gateway(f" {screen.KEY} {screen.TITLE}  ·  {where}  ·  {state}{mode}", banner)

    # -- tests: no blinking cursor --

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        if not self.cursor_blink and isinstance(event.widget, Input):
            event.widget.cursor_blink = False
