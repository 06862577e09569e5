"""``KeyBar``: the console's footer, the keys of the current screen on one line.

Owns: drawing the active bindings the screen shows (``Binding.show``, and not refused by ``check_action``:
read-only mode hides the actions that change something) as ``key description`` pairs, redrawn only when
they change. It replaces Textual's ``Footer``, which builds one widget per key and restyles each at every
focus change and screen switch: measured at about two thirds of the widgets created and restyled by a
screen switch (40 switches: 514 footer keys mounted, 2,300 style updates), most of a switch's time on a
loaded 2-core appliance.
Never: handles keys itself (the bindings stay where they are declared); talks to the gateway.
"""

from __future__ import annotations

from rich.text import Text
from textual.screen import Screen
from textual.widgets import Static


class KeyBar(Static):
    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        background: $panel;
        color: $text-muted;
    }
    """

    def __init__(self) -> None:
        super().__init__("", id="key-bar", markup=False)
        self._shown: tuple[tuple[str, str, bool], ...] | None = None

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self.call_after_refresh(self.redraw)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Screen[object]) -> None:
        if screen is self.screen:
            self.redraw()

    def redraw(self) -> None:
        if not self.is_attached:
            return
        shown: list[tuple[str, str, bool]] = []
        actions: set[str] = set()
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if not binding.show or binding.action in actions:
                continue
            actions.add(binding.action)
            shown.append((self.app.get_key_display(binding), binding.description, active.enabled))
        keys = tuple(shown)
        if keys == self._shown:
            return
        self._shown = keys
        line = Text(no_wrap=True, overflow="ellipsis")
        for key, description, enabled in keys:
            line.append(f" {key} ", style="bold reverse" if enabled else "dim reverse")
            line.append(f" {description}  ", style="" if enabled else "dim")
        self.update(line)
