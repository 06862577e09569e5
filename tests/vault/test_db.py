"""The single writer: group commit, savepoint isolation, async settlement, failure reporting."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from appliance.errors import StorageUnavailable
from appliance.vault.db import Database, Migration


def _schema(db) -> None:  # type: ignore[no-untyped-def]
    db["items"].create({"id": int, "name": str}, pk="id")


MIGRATIONS = [Migration("test-0001", _schema)]


def test_write_is_durable_and_visible_to_readers(tmp_path: Path) -> None:
    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        db.write(lambda c: c.execute("INSERT INTO items (name) VALUES ('a')"))
        assert db.reader().execute("SELECT name FROM items").fetchall() == [("a",)]
    assert sqlite3.connect(tmp_path / "v.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failed_write_does_not_undo_its_batch_neighbours(tmp_path: Path) -> None:
    def boom(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO items (name) VALUES ('doomed')")
        raise ValueError("no")

    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        futs = [
            db.submit(lambda c: c.execute("INSERT INTO items (name) VALUES ('x')").lastrowid)
            for _ in range(50)
        ]
        bad = db.submit(boom)
        futs += [
            db.submit(lambda c: c.execute("INSERT INTO items (name) VALUES ('y')").lastrowid)
            for _ in range(50)
        ]
        assert all(isinstance(f.result(), int) for f in futs)
        with pytest.raises(ValueError):
            bad.result()
        names = [r[0] for r in db.reader().execute("SELECT name FROM items")]
        assert "doomed" not in names and len(names) == 100
        assert db.commits < 101  # batched: fewer commits than writes


def test_async_writes_settle_on_the_loop(tmp_path: Path) -> None:
    seen: list[int] = []

    async def main(db: Database) -> list[int]:
        futs = [
            db.awrite(
                lambda c, i=i: c.execute("INSERT INTO items (id, name) VALUES (?, 'z')", (i,)).lastrowid,
                after_commit=seen.append,
            )
            for i in range(1, 201)
        ]
        return list(await asyncio.gather(*futs))

    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        assert asyncio.run(main(db)) == list(range(1, 201))
    assert sorted(seen) == list(range(1, 201))


def test_migrations_apply_once(tmp_path: Path) -> None:
    with Database(tmp_path / "v.db", MIGRATIONS):
        pass
    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        rows = db.reader().execute("SELECT name FROM _migrations").fetchall()
    assert rows == [("test-0001",)]


def test_unwritable_database_reports_storage_unavailable(tmp_path: Path) -> None:
    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        db.write(lambda c: c.execute("INSERT INTO items (name) VALUES ('a')"))
        # another connection holds the write lock longer than the busy timeout would wait: simulate with a
        # trigger that makes the commit itself fail instead (a full disk behaves the same for the writer)
        db.write(
            lambda c: c.execute(
                "CREATE TRIGGER stop BEFORE INSERT ON items BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        )
        with pytest.raises(sqlite3.IntegrityError):
            db.write(lambda c: c.execute("INSERT INTO items (name) VALUES ('b')"))
        assert db.healthy


def test_commit_failure_marks_database_unhealthy(tmp_path: Path) -> None:
    with Database(tmp_path / "v.db", MIGRATIONS) as db:

        def broken_commit(c: sqlite3.Connection) -> None:
            c.execute("COMMIT")  # leaves the batch without a transaction: the writer's COMMIT fails

        with pytest.raises(StorageUnavailable):
            db.write(broken_commit)
        assert not db.healthy
        db.write(lambda c: c.execute("INSERT INTO items (name) VALUES ('c')"))
        assert db.healthy


def test_lazy_writes_join_the_next_commit_or_go_alone_after_the_delay(tmp_path: Path) -> None:
    async def main(db: Database) -> tuple[int, int]:
        lazy = db.awrite_lazy(lambda c: c.execute("INSERT INTO items (name) VALUES ('lazy')").lastrowid)
        urgent = db.awrite(lambda c: c.execute("INSERT INTO items (name) VALUES ('urgent')").lastrowid)
        first = await asyncio.gather(lazy, urgent)
        commits_together = db.commits
        alone = await asyncio.wait_for(
            db.awrite_lazy(lambda c: c.execute("INSERT INTO items (name) VALUES ('alone')").lastrowid), 1
        )
        assert first == [1, 2] and alone == 3
        return commits_together, db.commits

    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        together, after = asyncio.run(main(db))
    assert together == 1, "the lazy write shared the urgent write's commit"
    assert after == 2


def test_close_commits_pending_lazy_writes(tmp_path: Path) -> None:
    async def main(db: Database) -> None:
        db.awrite_lazy(lambda c: c.execute("INSERT INTO items (name) VALUES ('last')"))

    db = Database(tmp_path / "v.db", MIGRATIONS).start()
    asyncio.run(main(db))
    db.close()
    with Database(tmp_path / "v.db", MIGRATIONS) as again:
        assert again.reader().execute("SELECT name FROM items").fetchall() == [("last",)]


def test_a_lazy_write_queued_while_the_writer_takes_the_others_is_not_stranded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a lazy write announced in the drain window once waited for the next urgent write."""
    import threading

    async def main(db: Database) -> None:
        loop = asyncio.get_running_loop()
        original = Database._take_lazy
        queued: list[asyncio.Future[object]] = []

        def take_and_race(self: Database) -> list[object]:
            taken = original(self)
            if not queued:  # once: the event loop queues a lazy write at exactly this moment
                done = threading.Event()

                def queue_one() -> None:
                    queued.append(
                        db.awrite_lazy(lambda c: c.execute("INSERT INTO items (name) VALUES ('r')"))
                    )
                    done.set()

                loop.call_soon_threadsafe(queue_one)
                done.wait(5)
            return taken  # type: ignore[return-value]

        monkeypatch.setattr(Database, "_take_lazy", take_and_race)
        await db.awrite(lambda c: None)
        await asyncio.wait_for(asyncio.shield(queued[0]), 1.0)

    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        asyncio.run(main(db))
        assert db.reader().execute("SELECT count(*) FROM items").fetchone() == (1,)


def test_a_failing_batch_writer_fails_its_batch_and_the_writer_lives_on(tmp_path: Path) -> None:
    class Broken:
        def write_batch(self, conn: sqlite3.Connection, items: list[object]) -> list[object]:
            return []  # one result short: a programming error

        def after_commit(self, items: list[object], results: list[object]) -> None:
            pass

        def commit_failed(self, exc: StorageUnavailable) -> Exception:
            return exc

    with Database(tmp_path / "v.db", MIGRATIONS) as db:
        with pytest.raises(StorageUnavailable):
            db.write_batched(Broken(), "x")
        assert db.write(lambda c: c.execute("INSERT INTO items (name) VALUES ('ok')").lastrowid) == 1
