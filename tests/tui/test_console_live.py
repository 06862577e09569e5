"""The console against a real gateway (``busy_gateway``: real requests through the OpenAI SDK), driven by
Pilot: every screen on its number key, the audit tail receiving new records, filter, pause and resume, a
record's detail and proof, ledger verify and checkpoint, help, the palette, read-only mode, quitting, a
gateway restart, and a socket where nothing runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import Static

from tests.tui.conftest import REQUESTS, BusyGateway, wait_for
from tui.app import SCREENS, PhiConsole
from tui.client import AdminSource
from tui.palette import ConsoleCommands
from tui.screens.audit import AuditScreen
from tui.screens.help import HelpScreen
from tui.screens.ledger import LedgerScreen
from tui.screens.record import RecordScreen
from tui.widgets.panels import KeyValue
from tui.widgets.tail_table import TailTable

SIZE = (120, 40)


def _table(pilot: Pilot[None]) -> TailTable:
    return pilot.app.get_screen("2").query_one("#audit-table", TailTable)


def _audit(pilot: Pilot[None]) -> AuditScreen:
    screen = pilot.app.get_screen("2")
    assert isinstance(screen, AuditScreen)
    return screen


def _text(pilot: Pilot[None], selector: str) -> str:
    return str(pilot.app.screen.query_one(selector, Static).content)


def test_every_screen_on_its_number_key(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: _panel(pilot, "#ledger-policy").get("policy") == "version 1")
            for cls in SCREENS:
                await pilot.press(cls.KEY)
                await wait_for(pilot, lambda cls=cls: type(app.screen) is cls)  # type: ignore[misc]
                assert app.gateway_error is None
            await pilot.press("1")
            assert app.screen.query_one("#down-banner").has_class("hidden")

    asyncio.run(drive())


def test_audit_tail_filter_pause_detail_and_proof(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("2")
            audit = _audit(pilot)
            await wait_for(pilot, lambda: _requests(audit) >= REQUESTS)
            before = _table(pilot).row_count

            await asyncio.to_thread(busy_gateway.chat, "one more, live")  # the tail shows it
            await wait_for(
                pilot, lambda: _requests(audit) >= REQUESTS + 1 and _table(pilot).row_count > before
            )

            await pilot.press("slash", *"type=request", "enter")  # sent to the server and applied here
            await wait_for(pilot, lambda: audit._server_terms == {"type": "request"})
            await wait_for(pilot, lambda: 0 < _table(pilot).row_count == len(audit._records))
            assert {r["type"] for r in audit._records} == {"request"}
            assert _table(pilot).row_count == REQUESTS + 1

            await pilot.press("p")  # paused: new records are counted, not shown
            await asyncio.to_thread(busy_gateway.chat, "while paused")
            await wait_for(pilot, lambda: len(audit._waiting) >= 1)
            assert _table(pilot).row_count == REQUESTS + 1
            assert "PAUSED" in _text(pilot, "#audit-state")
            await pilot.press("space")  # resume shows them
            await wait_for(pilot, lambda: _table(pilot).row_count == REQUESTS + 2)

            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, RecordScreen))
            detail = app.screen
            assert isinstance(detail, RecordScreen) and detail.record["type"] == "request"
            await pilot.press("v")
            await wait_for(pilot, lambda: "VERIFIED" in _text(pilot, "#proof"), within=20)
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, AuditScreen))

    asyncio.run(drive())


def _requests(audit: AuditScreen) -> int:
    return sum(1 for r in audit._records if r.get("type") == "request")


def test_ledger_verify_passes_and_checkpoint_is_signed(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("7")
            await wait_for(
                pilot, lambda: isinstance(app.screen, LedgerScreen) and "records" in _ledger(pilot)
            )
            await pilot.press("r")
            await wait_for(pilot, lambda: "PASSED" in _text(pilot, "#verify-state"), within=30)
            checkpoints = busy_gateway.source().ledger()["checkpoints"]
            await pilot.press("c")
            await wait_for(pilot, lambda: busy_gateway.source().ledger()["checkpoints"] > checkpoints)

    asyncio.run(drive())


def _ledger(pilot: Pilot[None]) -> str:
    return " ".join(_panel(pilot, "#ledger-state"))


def _panel(pilot: Pilot[None], selector: str) -> dict[str, str]:
    return pilot.app.screen.query_one(selector, KeyValue).shown


def test_help_palette_and_quit(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("ctrl+p")
            await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
            await pilot.press(*"checkpoint")
            await pilot.pause(0.5)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, CommandPalette))
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running)

    asyncio.run(drive())


def test_palette_runs_an_action_on_its_screen(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            entry = next(e for e in app.catalog() if e.action == "verify")
            await app.run_entry(entry)
            assert isinstance(app.screen, LedgerScreen)
            await wait_for(pilot, lambda: "PASSED" in _text(pilot, "#verify-state"), within=30)

    asyncio.run(drive())


def test_read_only_refuses_and_hides_actions(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), read_only=True, cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            assert all(not entry.changes for entry in app.catalog())
            hits = [hit async for hit in ConsoleCommands(app.screen).search("checkpoint")]
            assert hits == []
            await pilot.press("7")
            await wait_for(pilot, lambda: "records" in _ledger(pilot))
            checkpoints = busy_gateway.source().ledger()["checkpoints"]
            records = busy_gateway.source().ledger()["records"]
            await pilot.press("c")
            await pilot.press("r")  # a verify run is recorded in the ledger: refused too
            await pilot.pause(0.5)
            assert sum("read-only console" in n.message for n in app._notifications) == 2
            assert busy_gateway.source().ledger()["checkpoints"] == checkpoints
            assert busy_gateway.source().ledger()["records"] == records
            assert busy_gateway.source().verify_job()["state"] == "idle"
            assert "Verify" not in _text(pilot, "#key-bar") and "Checkpoint" not in _text(pilot, "#key-bar")
            assert "READ-ONLY" in _text(pilot, "#status-line")

    asyncio.run(drive())


def test_tail_resumes_after_the_gateway_restarts(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("2")
            audit = _audit(pilot)
            await wait_for(pilot, lambda: _requests(audit) >= REQUESTS)
            await asyncio.to_thread(busy_gateway.harness.stop)
            await wait_for(pilot, lambda: not app.screen.query_one("#down-banner").has_class("hidden"))
            assert "gateway not running" in _text(pilot, "#down-banner")
            await asyncio.to_thread(busy_gateway.harness.start)
            await asyncio.to_thread(busy_gateway.chat, "after the restart")
            await wait_for(pilot, lambda: _requests(audit) >= REQUESTS + 1, within=20)
            await wait_for(pilot, lambda: app.screen.query_one("#down-banner").has_class("hidden"))
            seqs = [r["seq"] for r in audit._records]
            assert seqs == sorted(set(seqs))  # resumed from the last seq seen: nothing twice, in order

    asyncio.run(drive())


def test_nothing_running_shows_the_banner_on_every_screen(tmp_path: Path) -> None:
    socket = tmp_path / "admin.sock"

    async def drive() -> None:
        app = PhiConsole(AdminSource(socket), cursor_blink=False)
        async with app.run_test(size=(80, 24)) as pilot:
            for cls in SCREENS:
                await pilot.press(cls.KEY)
                await wait_for(pilot, lambda: not app.screen.query_one("#down-banner").has_class("hidden"))
                banner = _text(pilot, "#down-banner")
                assert f"gateway not running — nothing answers on {socket}; retrying every 2 s" in banner
            await pilot.pause(2.5)  # it keeps retrying, and never raises
            await pilot.press("q")

    asyncio.run(drive())
    assert not socket.exists()  # the console never starts anything
