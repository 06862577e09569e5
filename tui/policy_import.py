"""``ImportBundleModal``: the console's policy import: read a bundle file, have the gateway verify it, show
the full report and the diff, ask, then import exactly the bytes that were verified.

Owns: the import flow's steps and how a verification report is drawn (``report_text``).
Never: activates a bundle the operator has not seen verified and confirmed; sends bytes other than those
verified (the import names their sha256, and the gateway refuses a mismatch); reads a file on the UI thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Static

from appliance.errors import OperatorError
from tui.client import ConsoleSource, Document
from tui.modals import ConfirmModal, ConsoleModal

MAX_FILE_BYTES = 4 * 1024 * 1024
"""Larger than any bundle the gateway accepts (1 MiB), small enough that a wrong path is not read whole."""


def report_text(report: Document) -> Group:
    """A verification (or import) report, drawn in full: the verdict, every check, every change."""
    if not report.get("ok"):
        return Group(
            Text.assemble(("REFUSED", "bold red"), f" by the check {report.get('check')!r}:"),
            Text(str(report.get("message", ""))),
            Text("Nothing was changed.", style="bold"),
        )
    previous = report.get("previous_version")
    verdict = "imported and in force" if report.get("imported") else "verified, not imported yet"
    head = Text.assemble(
        ("Policy v", "bold"),
        (str(report.get("version")), "bold"),
        f" ({verdict}); in force now: {'v' + str(previous) if previous is not None else 'none'}",
    )
    facts = Table.grid(padding=(0, 1))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("sha256", Text(str(report.get("sha256"))))
    facts.add_row("signed by", Text(", ".join(str(k) for k in report.get("keyids", [])) or "-"))
    rotation = report.get("trust_rotation")
    facts.add_row("trust", Text("unchanged" if not rotation else f"rotation: {rotation}"))
    checks = Table.grid(padding=(0, 1))
    checks.add_column(no_wrap=True)
    checks.add_column(style="bold", no_wrap=True)
    checks.add_column(overflow="fold")
    for check in report.get("checks", []):
        mark = Text("✓", style="green") if check.get("ok") else Text("✗", style="bold red")
        checks.add_row(mark, Text(str(check.get("check"))), Text(str(check.get("detail", ""))))
    changes = report.get("changes", [])
    diff = Table.grid(padding=(0, 1))
    for _ in range(3):
        diff.add_column(no_wrap=True)
    diff.add_column(overflow="fold")
    for change in changes:
        kind = str(change.get("change"))
        style = {"added": "green", "removed": "red", "changed": "yellow"}.get(kind, "")
        diff.add_row(
            Text(kind, style=style),
            Text(str(change.get("section"))),
            Text(str(change.get("name"))),
            Text(change_detail(change)),
        )
    return Group(
        head,
        facts,
        Text("Checks", style="bold underline"),
        checks,
        Text(f"Changes ({len(changes)})" if changes else "Changes: none", style="bold underline"),
        diff,
    )


def change_detail(change: dict[str, Any]) -> str:
    """The gateway's own line for a change when it gives one, else the fields that differ, else the values."""
    if change.get("line"):
        return str(change["line"])
    if change.get("fields"):
        return "fields: " + ", ".join(str(f) for f in change["fields"])
    before, after = change.get("before"), change.get("after")
    if isinstance(before, dict | list) or isinstance(after, dict | list):
        return ""
    if before is None:
        return "" if after is None else str(after)
    return f"{before} -> {after}"


class ImportBundleModal(ConsoleModal):
    """Dismisses with the gateway's import report once a bundle is in force, or ``None``."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    ImportBundleModal > .modal-box { height: 100%; }
    ImportBundleModal #report { height: 1fr; border: round $panel; }
    ImportBundleModal #path-row { height: auto; }
    ImportBundleModal #path-row > Input { width: 1fr; }
    """

    def __init__(self, source: ConsoleSource, path: str = "") -> None:
        super().__init__()
        self.source = source
        self.initial_path = path
        self._verified: tuple[bytes, Document] | None = None
        self.report: Document | None = None
        """The last report shown (verification, then import), for whoever drives the modal."""
        self.problem: str | None = None
        """Why the last verification or import did not produce a report (unreadable file, gateway error)."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal-box"):
            yield Static("Import a policy bundle", classes="modal-title")
            yield Label("Bundle file (Enter verifies it; nothing changes before you confirm)")
            with Horizontal(id="path-row"):
                yield Input(self.initial_path, placeholder="/media/usb/policy-v8.dsse.json", id="path")
                yield Button("Verify", id="verify")
            with VerticalScroll(id="report"):
                yield Static("No bundle verified yet.", id="report-text")
            with Horizontal(classes="modal-buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Activate", id="activate", variant="error", disabled=True)

    @property
    def verified_version(self) -> object:
        return self._verified[1].get("version") if self._verified else None

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted, "#path")
    @on(Button.Pressed, "#verify")
    def action_verify(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            self._show_problem("Type the path of the bundle file first.")
            return
        self._verified = None
        self.report = self.problem = None
        self.query_one("#activate", Button).disabled = True
        self.query_one("#report-text", Static).update(Text(f"Reading and verifying {path} …"))
        self.run_worker(
            lambda: self._verify_in_thread(path), group="bundle", thread=True, exit_on_error=False
        )

    def _verify_in_thread(self, path: str) -> None:
        try:
            data = _read_bundle(Path(path).expanduser())
            report = self.source.verify_bundle(data)
        except (OperatorError, OSError) as exc:
            self.app.call_from_thread(self._show_problem, str(exc))
            return
        self.app.call_from_thread(self._show_report, data, report)

    def _show_report(self, data: bytes, report: Document) -> None:
        self.report = report
        self.query_one("#report-text", Static).update(report_text(report))
        activate = self.query_one("#activate", Button)
        if report.get("ok") and report.get("sha256"):
            self._verified = (data, report)
            activate.label = f"Activate v{report.get('version')}"
            activate.disabled = False
        else:
            self.notify(f"The bundle is refused by the check {report.get('check')!r}.", severity="error")

    def _show_problem(self, message: str) -> None:
        self.problem = message
        self.query_one("#report-text", Static).update(Text.assemble(("Not verified: ", "bold red"), message))
        self.notify(message, title="import", severity="error", timeout=6)

    @on(Button.Pressed, "#activate")
    def action_activate(self) -> None:
        if self._verified is None:
            return
        data, report = self._verified
        previous = report.get("previous_version")
        count = len(report.get("changes", []))
        self.app.push_screen(
            ConfirmModal(
                f"Activate policy v{report.get('version')}"
                + (f" in place of v{previous}?" if previous is not None else "?"),
                "Every request is decided by it from the gateway's next reload (within seconds); the "
                f"{count} change(s) shown take effect and the old version cannot be imported again.",
                "Activate",
            ),
            lambda yes: self._import(data, str(report["sha256"])) if yes else None,
        )

    def _import(self, data: bytes, sha256: str) -> None:
        self.query_one("#activate", Button).disabled = True
        self.run_worker(
            lambda: self._import_in_thread(data, sha256), group="bundle", thread=True, exit_on_error=False
        )

    def _import_in_thread(self, data: bytes, sha256: str) -> None:
        try:
            report = self.source.import_bundle(data, sha256)
        except OperatorError as exc:
            self.app.call_from_thread(self._show_problem, f"the import failed: {exc}")
            return
        self.app.call_from_thread(self._imported, report)

    def _imported(self, report: Document) -> None:
        self.report = report
        if report.get("ok") and report.get("imported"):
            self.dismiss(report)
            return
        self._verified = None
        self.query_one("#report-text", Static).update(report_text(report))
        self.notify(f"The import was refused by the check {report.get('check')!r}.", severity="error")


def _read_bundle(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise OSError(f"{path} is {size} bytes: not a policy bundle (the limit is 1 MiB)")
    return path.read_bytes()


def import_outcome(report: dict[str, Any]) -> str:
    return f"Policy v{report.get('version')} is in force (sha256 {str(report.get('sha256'))[:16]}…)."
