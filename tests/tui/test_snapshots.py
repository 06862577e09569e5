"""SVG snapshots of the console over fixed data (``tests/tui/fixed.py``), at 80x24 and 120x40.

Regenerate after a deliberate change with ``pytest tests/tui/test_snapshots.py --snapshot-update`` and look
at the report before committing the SVGs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from tests.tui.conftest import wait_for
from tests.tui.fixed import AUDIT, DownSource, FixedSource
from tui.app import PhiConsole
from tui.widgets.tail_table import TailTable

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


def _console(source: Any = None) -> PhiConsole:
    return PhiConsole(source or FixedSource(), cursor_blink=False)


def _rows(pilot: Pilot[None], table: str) -> int:
    """The table's rows once it has measured its columns for them (-1 before: a snapshot then would show
    cells cut at the header's width)."""
    found = pilot.app.screen.query_one(table, DataTable)
    measured = not found._require_update_dimensions and not found._updated_cells
    return found.row_count if measured else -1


async def _dashboard(pilot: Pilot[None]) -> None:
    await wait_for(pilot, lambda: _rows(pilot, "#spend-caller") == 5 and _rows(pilot, "#local") == 2)


def _tail_shown(pilot: Pilot[None]) -> bool:
    """Every record is in, and the table has scrolled to the newest (the cursor follows the tail)."""
    table = pilot.app.screen.query_one("#audit-table", TailTable)
    return table.row_count == len(AUDIT) and table.max_scroll_y > 0 and table.scroll_y == table.max_scroll_y


async def _audit(pilot: Pilot[None]) -> None:
    await pilot.press("2")
    await wait_for(pilot, lambda: _tail_shown(pilot))


async def _ledger(pilot: Pilot[None]) -> None:
    await pilot.press("7")
    state = pilot.app.screen.query_one("#verify-state", Static)
    await wait_for(pilot, lambda: "running" in str(state.content))


async def _help(pilot: Pilot[None]) -> None:
    await _dashboard(pilot)
    await pilot.press("question_mark")
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "run_before",
    [
        pytest.param(_dashboard, id="dashboard"),
        pytest.param(_audit, id="audit"),
        pytest.param(_ledger, id="ledger"),
        pytest.param(_help, id="help"),
    ],
)
def test_screen(
    snap_compare: Any, run_before: Callable[[Pilot[None]], Awaitable[None]], size: tuple[int, int]
) -> None:
    assert snap_compare(_console(), terminal_size=size, run_before=run_before)


def _banner_shown(pilot: Pilot[None]) -> bool:
    return not pilot.app.screen.query_one("#down-banner").has_class("hidden")


async def _down_audit(pilot: Pilot[None]) -> None:
    await pilot.press("2")
    await wait_for(pilot, lambda: _banner_shown(pilot))


@pytest.mark.parametrize("size", SIZES)
def test_gateway_not_running(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(_console(DownSource()), terminal_size=size, run_before=_down_audit)
