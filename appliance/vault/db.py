"""The vault's SQLite file: one writer thread with group commit, a read connection per thread, migrations.

Owns: the only connection that writes, the transaction boundaries, the durability pragmas (WAL with
``synchronous=FULL``: a commit is on disk when it returns), and schema migrations.

Group commit: the writer takes every write queued while the previous commit was on disk and runs them in
one ``BEGIN IMMEDIATE`` transaction, each inside its own savepoint (one write's failure does not undo the
others), then commits once: one fsync serves the whole batch. Callers learn the outcome only after the
commit, so "done" always means "durable".

Batched writes (``awrite_batched``) hand many items of one kind to a single ``BatchWriter`` call per
commit: the audit ledger turns a whole batch into one SELECT and one multi-row INSERT. This matters more
than it looks: the writer thread must retake the GIL after every SQLite statement, and while the event
loop is busy each retake can wait, so statements per commit, not rows, set the throughput.

Lazy writes (``awrite_lazy``, and ``lazy=True`` on batched writes) ask for no commit of their own: they
join the next commit, or are committed alone ``LAZY_DELAY_S`` after they were queued when nothing else
comes. The audit ledger uses them for outcome records, so a request's outcome shares the fsync of the
next request's durable record instead of making that request wait for a second fsync.

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
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlite_utils

from appliance.errors import StorageUnavailable

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]
log = logging.getLogger("phi.vault.db")

_BUSY_TIMEOUT_MS = 10_000
_MAX_BATCH = 1024
LAZY_DELAY_S = 0.002


@dataclass(frozen=True)
class Migration:
    """One schema step, applied once, in a transaction, in the order given to ``Database``."""

    name: str
    apply: Callable[[sqlite_utils.Database], None]


class BatchWriter(Protocol):
    """Writes many queued items of one kind in one call, inside the writer's transaction."""

    def write_batch(self, conn: sqlite3.Connection, items: list[Any]) -> list[Any]:
        """One result per item, in order; raising fails every item of the call (nothing of it is kept)."""
        ...

    def after_commit(self, items: list[Any], results: list[Any]) -> None:
        """Runs on the writer thread once the items are durable."""
        ...

    def commit_failed(self, exc: StorageUnavailable) -> Exception:
        """The error its items get when the whole commit fails (a full disk, a read-only file)."""
        ...


@dataclass
class _Write:
    fn: WriteFn | None
    after_commit: Callable[[Any], None] | None = None
    batch: BatchWriter | None = None
    item: Any = None
    future: concurrent.futures.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    afuture: asyncio.Future[Any] | None = None
    result: Any = None
    error: BaseException | None = field(default=None)


_RECORD_MIGRATION = "INSERT INTO _migrations (name, applied_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ'))"
_STOP = object()
_WAKE = object()  # a lazy write is waiting: commit within LAZY_DELAY_S


class Database:
    """The vault file. ``start()`` before use, ``close()`` at the end (also a context manager)."""

    def __init__(self, path: Path | str, migrations: Sequence[Migration] = ()) -> None:
        self.path = Path(path)
        self._migrations = list(migrations)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lazy: deque[_Write] = deque()
        self._lazy_signalled = False
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.healthy = True
        """False after a commit failed (disk full, read-only file); True again after the next good one."""
        self.last_error: str | None = None
        self.commits = 0
        self.applied: list[str] = []
        """Migrations this object applied when it started (an upgrade may want to act once on them)."""
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
        return self._queue_async(_Write(fn, after_commit), lazy=False)

    def awrite_lazy(
        self, fn: WriteFn, after_commit: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Like ``awrite_nowait``, but joins the next commit (at most ``LAZY_DELAY_S`` away)."""
        return self._queue_async(_Write(fn, after_commit), lazy=True)

    def awrite_batched(self, writer: BatchWriter, item: Any, *, lazy: bool = False) -> asyncio.Future[Any]:
        """Queue ``item`` for ``writer.write_batch`` with every other item of that writer in the commit."""
        return self._queue_async(_Write(None, batch=writer, item=item), lazy=lazy)

    def write_batched(self, writer: BatchWriter, item: Any) -> Any:
        """Blocking form of ``awrite_batched`` (CLI commands)."""
        self._require_started()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Write(None, batch=writer, item=item, future=fut))
        return fut.result()

    def _queue_async(self, write: _Write, *, lazy: bool) -> asyncio.Future[Any]:
        self._require_started()
        write.loop = loop = asyncio.get_running_loop()
        write.afuture = afut = loop.create_future()
        if not lazy:
            self._queue.put(write)
            return afut
        self._lazy.append(write)
        if not self._lazy_signalled:
            self._lazy_signalled = True
            self._queue.put(_WAKE)
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
                # Another process (a CLI command beside the server) may have applied it since we looked.
                applied = conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (migration.name,))
                if applied.fetchone() is None:
                    migration.apply(db)
                    conn.execute(_RECORD_MIGRATION, (migration.name,))
                    self.applied.append(migration.name)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _run(self, conn: sqlite3.Connection) -> None:
        stop = False
        lazy_deadline: float | None = None
        while not stop:
            try:
                wait = None if lazy_deadline is None else max(0.0, lazy_deadline - time.monotonic())
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                first = None  # the lazy writes waited long enough: commit them alone
            if first is _STOP:
                break
            if first is _WAKE:
                if lazy_deadline is None:
                    lazy_deadline = time.monotonic() + LAZY_DELAY_S
                continue
            batch: list[_Write] = [] if first is None else [first]
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if item is not _WAKE:  # the lazy write it announces is taken just below
                    batch.append(item)
            # Lazy writes are taken after the drain: a _WAKE dropped above announced one already queued.
            batch[:0] = self._take_lazy()
            lazy_deadline = None
            if batch:
                self._commit_and_settle(conn, batch)
        # Closing: whatever is still queued or lazy (even if queued after close began) is committed.
        rest = self._take_lazy()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Write):
                rest.append(item)
        if rest:
            self._commit_and_settle(conn, rest)
        conn.close()

    def _commit_and_settle(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        try:
            self._commit_batch(conn, batch)
        except Exception as exc:  # a bug, not a storage failure: fail this batch, keep the writer alive
            log.exception("the vault writer failed a batch")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.healthy = False
            failure = StorageUnavailable(f"the vault writer failed: {exc}")
            for item in batch:
                item.error = failure
        self._settle(batch)

    def _take_lazy(self) -> list[_Write]:
        # Clear the flag before draining: a write queued after this point signals again, none is stranded.
        self._lazy_signalled = False
        taken: list[_Write] = []
        while self._lazy:
            taken.append(self._lazy.popleft())
        return taken

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        groups: dict[int, tuple[BatchWriter, list[_Write]]] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                if item.batch is not None:
                    groups.setdefault(id(item.batch), (item.batch, []))[1].append(item)
                    continue
                assert item.fn is not None
                conn.execute("SAVEPOINT w")
                try:
                    item.result = item.fn(conn)
                except Exception as exc:
                    item.error = exc
                    conn.execute("ROLLBACK TO w")
                conn.execute("RELEASE w")
            # A batch of one writer's items alone needs no savepoint: if the writer fails, the whole
            # transaction is rolled back instead. Two statements fewer per commit is measurable (each
            # statement retakes the GIL on this thread, see above).
            sole = len(groups) == 1 and len(batch) == len(next(iter(groups.values()))[1])
            for writer, items in groups.values():
                self._write_group(conn, writer, items, savepoint=not sole)
            if sole and batch[0].error is not None:
                conn.execute("ROLLBACK")
                return
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.healthy = False
            self.last_error = str(exc)
            log.error("vault commit failed: %s", exc)
            failure = StorageUnavailable(f"the vault database cannot be written: {exc}")
            for item in batch:
                item.error = failure if item.batch is None else item.batch.commit_failed(failure)
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
        for writer, items in groups.values():
            if items[0].error is None:
                try:
                    writer.after_commit([i.item for i in items], [i.result for i in items])
                except Exception:
                    log.exception("after-commit hook failed")

    @staticmethod
    def _write_group(
        conn: sqlite3.Connection, writer: BatchWriter, items: list[_Write], *, savepoint: bool
    ) -> None:
        if savepoint:
            conn.execute("SAVEPOINT b")
        try:
            results = writer.write_batch(conn, [i.item for i in items])
        except Exception as exc:
            if savepoint:
                conn.execute("ROLLBACK TO b")
            for item in items:
                item.error = exc
        else:
            for item, result in zip(items, results, strict=True):
                item.result = result
        if savepoint:
            conn.execute("RELEASE b")

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
