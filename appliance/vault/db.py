"""The vault's SQLite file: one writer thread with group commit, a read connection per thread, migrations.

Owns: the only connection that writes, the transaction boundaries, the durability pragmas (WAL with
``synchronous=FULL``: a commit is on disk when it returns), and schema migrations.

Group commit: the writer takes every write queued while the previous commit was on disk and runs them in
one ``BEGIN IMMEDIATE`` transaction, each inside its own savepoint (one write's failure does not undo the
others), then commits once: one fsync serves the whole batch. Callers learn the outcome only after the
commit, so "done" always means "durable".

Must never: write from any thread but the writer; keep a read transaction open across an ``await``.
Several processes (the server and an operator's CLI command) may share the file: ``BEGIN IMMEDIATE`` and
the busy timeout serialise their writers, and a write function must read what it depends on (the ledger's
previous hash, say) inside its own transaction rather than from a cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from appliance.errors import StorageUnavailable

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]
log = logging.getLogger("phi.vault.db")

_BUSY_TIMEOUT_MS = 10_000
_MAX_BATCH = 1024


@dataclass(frozen=True)
class Migration:
    """One schema step, applied once, in a transaction, in the order given to ``Database``."""

    name: str
    apply: Callable[[sqlite_utils.Database], None]


@dataclass
class _Write:
    fn: WriteFn
    after_commit: Callable[[Any], None] | None = None
    future: concurrent.futures.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    afuture: asyncio.Future[Any] | None = None
    result: Any = None
    error: BaseException | None = field(default=None)


_STOP = object()


class Database:
    """The vault file. ``start()`` before use, ``close()`` at the end (also a context manager)."""

    def __init__(self, path: Path | str, migrations: Sequence[Migration] = ()) -> None:
        self.path = Path(path)
        self._migrations = list(migrations)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.healthy = True
        """False after a commit failed (disk full, read-only file); True again after the next good one."""
        self.last_error: str | None = None
        self.commits = 0
        self.writes = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Database:
        if self._thread is not None:
            return self
        conn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")
        self._migrate(conn)
        self._thread = threading.Thread(target=self._run, args=(conn,), name="vault-writer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        with self._readers_lock:
            for reader in self._readers:
                with contextlib.suppress(sqlite3.Error):
                    reader.close()
            self._readers.clear()
        self._local = threading.local()

    def __enter__(self) -> Database:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------------

    def submit(
        self, fn: WriteFn, after_commit: Callable[[Any], None] | None = None
    ) -> concurrent.futures.Future[Any]:
        """Queue ``fn(conn)`` for the writer; the future resolves once its transaction is durable.

        ``after_commit(result)`` runs on the writer thread after the commit (used to print audit lines
        only for records that are on disk); its exceptions are logged, never raised.
        """
        self._require_started()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Write(fn, after_commit, future=fut))
        return fut

    def write(
        self, fn: Callable[[sqlite3.Connection], T], after_commit: Callable[[T], None] | None = None
    ) -> T:
        """Blocking write (CLI commands, start-up)."""
        result: T = self.submit(fn, after_commit).result()
        return result

    def awrite_nowait(
        self, fn: WriteFn, after_commit: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue a write from the event loop; the returned asyncio future resolves once it is durable."""
        self._require_started()
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Write(fn, after_commit, loop=loop, afuture=afut))
        return afut

    async def awrite(self, fn: WriteFn, after_commit: Callable[[Any], None] | None = None) -> Any:
        return await self.awrite_nowait(fn, after_commit)

    # -- reading -----------------------------------------------------------------------------------------

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (autocommit: every statement sees the latest commit)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def utils(self) -> sqlite_utils.Database:
        """sqlite-utils view over this thread's read connection (listings, introspection)."""
        return sqlite_utils.Database(self.reader())

    # -- internals ---------------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._thread is None:
            raise RuntimeError("Database.start() was not called")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot open the vault database: {exc}") from exc
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        db = sqlite_utils.Database(conn)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
        for migration in self._migrations:
            if migration.name in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                migration.apply(db)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ'))",
                    (migration.name,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _run(self, conn: sqlite3.Connection) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch: list[_Write] = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit_batch(conn, batch)
            self._settle(batch)
        conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                conn.execute("SAVEPOINT w")
                try:
                    item.result = item.fn(conn)
                except Exception as exc:
                    item.error = exc
                    conn.execute("ROLLBACK TO w")
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.healthy = False
            self.last_error = str(exc)
            log.error("vault commit failed: %s", exc)
            failure = StorageUnavailable(f"the vault database cannot be written: {exc}")
            for item in batch:
                item.error = failure
            return
        self.healthy = True
        self.last_error = None
        self.commits += 1
        self.writes += len(batch)
        for item in batch:
            if item.error is None and item.after_commit is not None:
                try:
                    item.after_commit(item.result)
                except Exception:
                    log.exception("after-commit hook failed")

    def _settle(self, batch: list[_Write]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
        for item in batch:
            if item.future is not None:
                if item.error is not None:
                    item.future.set_exception(item.error)
                else:
                    item.future.set_result(item.result)
            elif item.loop is not None:
                by_loop.setdefault(item.loop, []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed while the write was on disk
                loop.call_soon_threadsafe(_settle_async, items)


def _settle_async(items: list[_Write]) -> None:
    for item in items:
        fut = item.afuture
        if fut is None or fut.done():
            continue
        if item.error is not None:
            fut.set_exception(item.error)
        else:
            fut.set_result(item.result)
