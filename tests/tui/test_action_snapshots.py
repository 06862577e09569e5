"""SVG snapshots of the action screens (Callers, Models, Policy, Keys) and their modals (confirmation, the
token shown once, the bundle verification report and a refused bundle), at 80x24 and 120x40, from fixed data.

Update with ``pytest tests/tui/test_action_snapshots.py --snapshot-update`` and look at the report.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

import tui.policy_import
from tests.tui.fixed import ActionSource
from tui.app import PhiConsole
from tui.modals import ConfirmModal, IssueTokenModal, SecretOnceModal
from tui.policy_import import ImportBundleModal

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
BUNDLE_PATH = "/media/usb/policy-v15.dsse.json"

Step = Callable[[Pilot[None]], Awaitable[None]]


async def settle(pilot: Pilot[None], ready: Callable[[], bool], what: str) -> None:
    """Wait (in app time) until ``ready()``: the screens fetch in thread workers."""
    for _ in range(200):
        if ready():
            # and the repaint that follows (a table re-measures its columns when idle, then draws again)
            await pilot.pause(0.3)
            if ready():
                return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def table_filled(pilot: Pilot[None]) -> bool:
    """Rows are in, and the table has measured its columns for them (it does so when idle: a snapshot taken
    before that shows cells cut at the header's width)."""
    tables = list(pilot.app.screen.query("#rows").results(DataTable))
    return (
        bool(tables)
        and tables[0].row_count > 0
        and not tables[0]._require_update_dimensions
        and not tables[0]._updated_cells
    )


def show(key: str, then: Iterable[Step] = ()) -> Step:
    """Show screen ``key``, wait for its data, then run ``then``."""

    async def run(pilot: Pilot[None]) -> None:
        await pilot.press(key)
        await settle(pilot, lambda: _screen_ready(pilot, key), f"screen {key}")
        for step in then:
            await step(pilot)

    return run


def _screen_ready(pilot: Pilot[None], key: str) -> bool:
    screen = pilot.app.screen
    if getattr(screen, "KEY", None) != key:
        return False
    if key == "5":
        return getattr(screen, "doc", None) is not None
    return table_filled(pilot)


def press(*keys: str, until: type | None = None) -> Step:
    async def run(pilot: Pilot[None]) -> None:
        await pilot.press(*keys)
        if until is not None:
            await settle(pilot, lambda: isinstance(pilot.app.screen, until), until.__name__)

    return run


def fill_issue_form() -> Step:
    async def run(pilot: Pilot[None]) -> None:
        modal = pilot.app.screen
        assert isinstance(modal, IssueTokenModal)
        modal.query_one("#caller").value = "radiology-bot"  # type: ignore[attr-defined]
        modal.query_one("#expires").value = "30d"  # type: ignore[attr-defined]
        modal.action_submit()
        await settle(pilot, lambda: isinstance(pilot.app.screen, SecretOnceModal), "the token")

    return run


def verify_bundle(path: str) -> Step:
    async def run(pilot: Pilot[None]) -> None:
        await pilot.press(*path, "enter")
        modal = pilot.app.screen
        assert isinstance(modal, ImportBundleModal)
        await settle(pilot, lambda: modal.report is not None or modal.problem is not None, "the report")

    return run


@pytest.fixture(autouse=True)
def bundle_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The modal reads the typed path in a worker; here the 'file' is named by its path (fixed data)."""
    monkeypatch.setattr(
        tui.policy_import, "_read_bundle", lambda path: b"west" if "west" in str(path) else b"bundle"
    )


def console() -> PhiConsole:
    return PhiConsole(ActionSource(), cursor_blink=False)


def snap(snap_compare: Callable[..., bool], size: tuple[int, int], step: Step) -> None:
    assert snap_compare(console(), terminal_size=size, run_before=step)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("key", ["3", "4", "5", "6"], ids=["callers", "models", "policy", "keys"])
def test_screen(snap_compare: Callable[..., bool], size: tuple[int, int], key: str) -> None:
    snap(snap_compare, size, show(key))


@pytest.mark.parametrize("size", SIZES)
def test_revoke_confirmation(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    snap(snap_compare, size, show("3", [press("x", until=ConfirmModal)]))


@pytest.mark.parametrize("size", SIZES)
def test_issue_form(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    snap(snap_compare, size, show("3", [press("i", until=IssueTokenModal)]))


@pytest.mark.parametrize("size", SIZES)
def test_token_shown_once(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    snap(snap_compare, size, show("3", [press("i", until=IssueTokenModal), fill_issue_form()]))


@pytest.mark.parametrize("size", SIZES)
def test_bundle_report(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    snap(snap_compare, size, show("5", [press("m", until=ImportBundleModal), verify_bundle(BUNDLE_PATH)]))


@pytest.mark.parametrize("size", SIZES)
def test_bundle_refused(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    path = str(Path(BUNDLE_PATH).with_name("policy-v15-west.dsse.json"))
    snap(snap_compare, size, show("5", [press("m", until=ImportBundleModal), verify_bundle(path)]))


@pytest.mark.parametrize("size", SIZES)
def test_activate_confirmation(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    async def activate(pilot: Pilot[None]) -> None:
        modal = pilot.app.screen
        assert isinstance(modal, ImportBundleModal)
        modal.action_activate()
        await settle(pilot, lambda: isinstance(pilot.app.screen, ConfirmModal), "the confirmation")

    snap(
        snap_compare,
        size,
        show("5", [press("m", until=ImportBundleModal), verify_bundle(BUNDLE_PATH), activate]),
    )
