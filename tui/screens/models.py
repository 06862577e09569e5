"""``ModelsScreen`` (key 4): the policy's pinned local models, their state and load; loading, unloading.

Owns: the models table (model, state, memory, slots, active, queue, tokens/s) and the load / unload actions
(unload confirmed first: it ends the model's running and queued requests).
Never: reads a model file or its pin (the gateway verifies pins when it loads); loads a model already loaded.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from tui.client import Document
from tui.screens.action_screen import ActionScreen, Row
from tui.widgets.filter_bar import FilterBar

COLUMNS = ("model", "state", "memory", "slots", "active", "queue", "tok/s")
STATE_STYLE = {"ready": "green", "loading": "yellow", "failed": "red", "retiring": "dim", "not loaded": "dim"}
NOT_LOADED = "not loaded"


def memory_text(size: object) -> str:
    if not isinstance(size, int | float):
        return "-"
    mib = size / (1024 * 1024)
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def _count(value: object) -> str:
    return "-" if value is None else str(value)


def model_rows(models: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for model in models:
        name, state = str(model.get("model")), str(model.get("state", ""))
        rate = model.get("tokens_per_s")
        cells = (
            Text(name),
            Text(state, style=STATE_STYLE.get(state, "")),
            memory_text(model.get("memory_bytes")),
            _count(model.get("slots")),
            _count(model.get("active")),
            _count(model.get("queue_depth")),
            f"{rate:.1f}" if isinstance(rate, int | float) else "-",
        )
        rows.append((name, {"model": name, "state": state, "file": model.get("file")}, cells))
    return rows


class ModelsScreen(ActionScreen):
    """Local models: load (l) and unload (u) the selected one."""

    TITLE = "Models"
    KEY = "4"
    ACTIONS = [
        ("l", "load", "Load the selected local model", True),
        ("u", "unload", "Unload the selected local model", True),
    ]
    BINDINGS = [Binding("l", "load", "Load"), Binding("u", "unload", "Unload")]
    DEFAULT_CSS = """
    ModelsScreen #rows { height: 1fr; }
    ModelsScreen #models-note { height: 1; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield FilterBar("model, state=ready …")
        table: DataTable[object] = DataTable(id="rows", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static(id="models-note")

    def refresh_data(self) -> None:
        self.fetch("models", lambda source: source.models(), self._show)

    def _show(self, doc: Document) -> None:
        models = list(doc.get("models", []))
        self.show_rows(model_rows(models))
        loaded = sum(1 for m in models if m.get("state") == "ready")
        note = (
            f"{len(models)} pinned model(s), {loaded} ready" if models else "The policy pins no local model."
        )
        self.query_one("#models-note", Static).update(note)

    def action_load(self) -> None:
        if not self.guard_action("load"):
            return
        row = self.selected()
        if row is None:
            return
        model, state = str(row["model"]), str(row["state"])
        if state != NOT_LOADED and state != "failed":
            self.notify(f"{model} is {state}: nothing to load.", severity="warning", timeout=4)
            return
        self.notify(f"Loading {model}: its pin is verified first, which can take a while.", timeout=4)
        self.act_and_report("load", lambda source: source.load(model), lambda _answer: f"{model} is loaded.")

    def action_unload(self) -> None:
        if not self.guard_action("unload"):
            return
        row = self.selected()
        if row is None:
            return
        model, state = str(row["model"]), str(row["state"])
        if state == NOT_LOADED:
            self.notify(f"{model} is not loaded.", severity="warning", timeout=4)
            return
        self.confirm_then(
            f"Unload {model}?",
            "Its running and queued requests end with an error and its memory is freed; it loads again on "
            "its next request.",
            lambda: self.act_and_report(
                "unload", lambda source: source.unload(model), lambda _answer: f"{model} is unloaded."
            ),
            label="Unload",
        )
