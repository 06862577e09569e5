"""Outcome records written while the ledger cannot be written are owed, not lost: kept in memory (at most
``MAX_OWED``), written ahead of the next batch that commits or by ``tick``, and until then the ledger is
not healthy. The failures are those a full disk gives the vault writer: an INSERT refused (the write
fails, ``LedgerUnavailable``) and a whole commit refused (``StorageUnavailable`` from the writer)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import LedgerUnavailable
from appliance.ledger import store
from appliance.ledger.store import MIGRATIONS, Ledger
from appliance.vault.db import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "vault.db", MIGRATIONS) as database:
        yield database


def _request(n: int) -> dict[str, Any]:
    return {"type": "request", "request_id": f"req-{n}", "claw_id": "bot", "decision": "allowed"}


def _outcome(n: int) -> dict[str, Any]:
    return {"type": "response", "request_id": f"req-{n}", "claw_id": "bot", "status_code": 200}


def _insert_refused(db: Database) -> Callable[[], None]:
    """Every ledger INSERT fails (as SQLITE_FULL does); returns the function that lifts it."""
    conn = sqlite3.connect(db.path, isolation_level=None)
    conn.execute(
        "CREATE TRIGGER disk_full BEFORE INSERT ON ledger"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )

    def lift() -> None:
        conn.execute("DROP TRIGGER disk_full")
        conn.close()

    return lift


def _commit_refused(db: Database) -> Callable[[], None]:
    """Every commit of the writer fails as a whole (the writer's StorageUnavailable path)."""
    original = db._commit_batch

    def failing(conn: sqlite3.Connection, batch: list[Any]) -> None:
        conn.execute("PRAGMA query_only=1")
        try:
            original(conn, batch)
        finally:
            conn.execute("PRAGMA query_only=0")

    db._commit_batch = failing  # type: ignore[method-assign]

    def lift() -> None:
        db._commit_batch = original  # type: ignore[method-assign]

    return lift


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.parametrize("fault", [_insert_refused, _commit_refused], ids=["insert", "commit"])
def test_an_outcome_of_a_full_disk_is_written_by_the_next_write_after_recovery(
    db: Database, fault: Callable[[Database], Callable[[], None]]
) -> None:
    ledger = Ledger(db, None)

    async def scenario() -> None:
        assert await ledger.append(_request(1)) == 1  # durable before forwarding
        lift = fault(db)
        outcome = ledger.append(_outcome(1), lazy=True)  # the answer completed while the disk was full
        await _until(lambda: ledger.owed_outcomes == 1)
        assert not outcome.done() and not ledger.healthy
        with pytest.raises(LedgerUnavailable):  # the next request is refused (503), its record with it
            await ledger.append(_request(2))
        assert ledger.owed_outcomes == 1 and not ledger.healthy
        lift()
        assert await ledger.append({"type": "admin", "detail": "after"}) == 3
        assert await asyncio.wait_for(outcome, 5) == 2  # written ahead of the batch that committed
        assert ledger.healthy and ledger.owed_outcomes == 0

    asyncio.run(scenario())
    assert ledger.pending_outcomes() == []
    assert [r["type"] for r in ledger.tail(10)] == ["request", "response", "admin"]
    assert ledger.verify().ok


def test_tick_retries_owed_outcomes_with_no_other_traffic(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "RETRY_BACKOFF_S", (0.0, 0.0))
    ledger = Ledger(db, None)

    async def scenario() -> None:
        await ledger.append(_request(1))
        lift = _insert_refused(db)
        outcome = ledger.append(_outcome(1), lazy=True)
        await _until(lambda: ledger.owed_outcomes == 1)
        await ledger.tick()  # still full: the outcome stays owed
        assert ledger.owed_outcomes == 1 and not ledger.healthy and not outcome.done()
        lift()
        await ledger.tick()
        assert await asyncio.wait_for(outcome, 5) == 2
        assert ledger.healthy

    asyncio.run(scenario())
    assert ledger.pending_outcomes() == []
    assert ledger.verify().ok


def test_past_the_bound_an_outcome_is_lost_loudly(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MAX_OWED", 2)
    ledger = Ledger(db, None)

    async def scenario() -> None:
        for n in (1, 2, 3):
            await ledger.append(_request(n))
        lift = _insert_refused(db)
        owed = [ledger.append(_outcome(n), lazy=True) for n in (1, 2, 3)]
        with pytest.raises(LedgerUnavailable):
            await asyncio.wait_for(owed[2], 5)
        assert ledger.owed_outcomes == 2 and ledger.outcomes_lost == 1 and not ledger.healthy
        lift()
        await ledger.append({"type": "admin", "detail": "after"})
        assert sorted(await asyncio.gather(*owed[:2])) == [4, 5]

    asyncio.run(scenario())
    assert ledger.pending_outcomes() == ["req-3"]  # the lost one stays visibly open
    assert ledger.healthy
