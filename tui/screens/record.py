"""``RecordScreen``: one audit record, every field, and the proof that the ledger holds it (``v``).

Owns: drawing a record and a proof result. Never: calls the gateway itself (the audit screen hands it a
``prove`` function that runs in a worker and calls ``show_proof`` back); changes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from tui.widgets.key_bar import KeyBar
from tui.widgets.panels import KeyValue


class RecordScreen(ModalScreen[None]):
    """An audit record in full; ``v`` proves it, ``escape`` goes back to the tail."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "close", "Back"),
        Binding("v", "prove", "Prove this record"),
    ]

    def __init__(self, record: dict[str, Any], prove: Callable[[RecordScreen], None]) -> None:
        super().__init__()
        self.record = record
        self._prove = prove

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="record-box") as box:
            box.border_title = f"audit record {self.record.get('seq')}"
            yield Static(id="proof", classes="hidden", markup=False)
            panel = KeyValue(id="record-fields")
            panel.show(sorted(self.record.items()))
            yield panel
        yield KeyBar()

    def action_close(self) -> None:
        self.dismiss()

    def action_prove(self) -> None:
        self.show_proof_pending()
        self._prove(self)

    def show_proof_pending(self) -> None:
        self._proof_text(f"proving record {self.record.get('seq')} …", "proof-pending")

    def show_proof(self, doc: dict[str, Any]) -> None:
        checkpoint = str(doc.get("checkpoint") or "").strip().splitlines()
        verified = doc.get("verified") is True
        lines = [
            f"record {doc.get('seq')}: {'VERIFIED' if verified else 'NOT VERIFIED'}",
            f"tree size {doc.get('tree_size')}",
            f"root {doc.get('root_sha256') or '—'}",
            "checkpoint " + (" / ".join(checkpoint[:3]) if checkpoint else "—"),
        ]
        self._proof_text("\n".join(lines), "proof-ok" if verified else "proof-bad")

    def show_proof_failed(self, message: str) -> None:
        self._proof_text(f"proof failed: {message}", "proof-bad")

    def _proof_text(self, text: str, state: str) -> None:
        proof = self.query_one("#proof", Static)
        proof.update(text)
        proof.set_classes(state)
        self.query_one("#record-box").scroll_home(animate=False)
