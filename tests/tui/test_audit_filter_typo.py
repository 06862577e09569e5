"""A typo in the Audit filter's status term is the operator's, not the gateway's: the console keeps the
status line "connected", says what a status is, and goes on tailing; text terms ignore case on the gateway
as they do in the console."""

from __future__ import annotations

import asyncio

from textual.widgets import Static

from tests.tui.conftest import BusyGateway, wait_for
from tui.app import PhiConsole


def test_a_status_typo_is_not_the_gateway_refusing(busy_gateway: BusyGateway) -> None:
    async def drive() -> None:
        app = PhiConsole(busy_gateway.source(), cursor_blink=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("2")
            audit = app.get_screen("2")
            await wait_for(pilot, lambda: len(audit._records) > 0)
            await pilot.press("slash", *"status=4xx", "enter")
            await pilot.pause(2.5)
            assert app.gateway_error is None
            assert "connected" in str(app.screen.query_one("#status-line", Static).content)
            assert any("a status is a number" in n.message for n in app._notifications)

    asyncio.run(drive())


def test_text_terms_ignore_case_on_the_gateway(busy_gateway: BusyGateway) -> None:
    source = busy_gateway.source()
    page = source.audit(caller="CONSOLE-TEST")
    assert page["records"] and {r["claw_id"] for r in page["records"]} == {"console-test"}
