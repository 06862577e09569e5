"""``Ledger``: append-only, hash-chained records in the vault, echoed as JSON lines on stdout.

Owns: the ``ledger`` table and the one list of the ledger's migrations (``MIGRATIONS``: its own, then
those of ``tiles``, ``checkpoints`` and ``archive``), what a record may hold (``Ledger.FIELDS``, which is
``chain.FIELDS``; ``TYPES``; at most ``MAX_RECORD_CHARS``), appending (each record chained with
``chain.chain_hash`` and added to the Merkle tree of ``tiles``, the head signed by ``checkpoints``), the
stdout audit line, the reads the operator's commands need, and ``Ledger.verify``, which runs
``verify.verify_database`` with this ledger's verifier key.

Every append is a vault write, chained on from the newest record in the file: the writer thread keeps
the tree of its last commit, and when another process (an operator's CLI command) appended meanwhile,
the batch's first seq is taken, nothing of it is inserted, and it is chained again from what the file
holds. The stdout line is printed only after the batch is durable. A record that cannot be written fails
its future with ``LedgerUnavailable`` so the gateway answers 503 (fail closed).

Outcome records (``lazy``) are owed, not dropped: one whose write fails (a full disk) waits in memory, at
most ``MAX_OWED`` of them, and is written ahead of the next batch that commits, or by ``tick`` (backing
off from 1 to 30 s), its future resolving then. While any is owed the ledger is not ``healthy`` (the
gateway's /health says refusing), and a request's own record commits in the same transaction as every
owed outcome, so no request is let through before the outcomes of the earlier ones are durable. Past the
bound an outcome is lost: its future fails, ``outcomes_lost`` counts it, and its request stays open in
``audit pending``.

Must never: hold prompt or completion text, token secrets or provider keys (records are metadata and
SHA-256 digests; long strings in an oversized record are clipped to length and digest); update or
delete a record (nothing here does; ``verify`` catches whoever does it with the file); print a line for
a record that is not on disk; import ``export``, ``follow`` or ``operations`` (they build on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TextIO

import sqlite_utils

from appliance import timestamps
from appliance.errors import LedgerUnavailable, StorageUnavailable, TreeInconsistent
from appliance.ledger import archive, checkpoints, merkle, signed_note, tiles
from appliance.ledger.chain import FIELDS, canonical_json, chain_hash, encode_record, sha256_hex
from appliance.ledger.checkpoints import CheckpointSigner
from appliance.ledger.stdout import AuditPrinter
from appliance.ledger.tiles import TreeState, insert_tiles
from appliance.ledger.verify import VerifyReport, verify_database
from appliance.vault.db import Database, Migration

log = logging.getLogger("phi.ledger")

TYPES: Final = frozenset({"request", "response", "error", "intervention", "admin"})
MAX_RECORD_CHARS: Final = 4096
"""A record is a few hundred characters of metadata; anything this large is text that must not be here."""
CLIP_CHARS: Final = 128
"""In an oversized record, string values longer than this are replaced by their length and digest."""

MAX_OWED: Final = 4096
"""Outcome records kept for a retry at most: far above the concurrency cap, the most that can be in
flight when the disk fills (new requests are refused from then on); at 4 KiB a record, 16 MiB at worst."""
RETRY_BACKOFF_S: Final = (1.0, 30.0)
"""``tick`` retries owed outcomes after the first, doubling up to the second, while writes fail."""

_LAST = "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1"
_INSERT_HEAD = "INSERT INTO ledger (seq, ts, type, request_id, claw_id, record, prev_hash, hash) VALUES "
_ROWS_PER_INSERT = 256  # 8 parameters a row: well under SQLite's 32766 bound variables


@functools.cache
def _insert_sql(rows: int) -> str:
    placeholders = ",".join(["(?,?,?,?,?,?,?,?)"] * rows)  # placeholders only: every value is bound
    return _INSERT_HEAD + placeholders


def _create_table(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE ledger ("
        " seq INTEGER PRIMARY KEY,"
        " ts TEXT NOT NULL,"
        " type TEXT NOT NULL,"
        " request_id TEXT,"
        " claw_id TEXT,"
        " record TEXT NOT NULL,"
        " prev_hash TEXT NOT NULL,"
        " hash TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX ledger_request_id ON ledger (request_id)")


def _append_only(db: sqlite_utils.Database) -> None:
    # A guard against mistakes and casual edits, not against someone with the file (they can drop these);
    # what catches them is verify, and, for a consistently rewritten chain, signed checkpoints.
    for event in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER ledger_append_only_{event.lower()} BEFORE {event} ON ledger"
            " BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END"
        )


MIGRATIONS = [
    Migration("ledger-0001-create", _create_table),
    Migration("ledger-0002-append-only", _append_only),
    tiles.MIGRATION,
    checkpoints.MIGRATION,
    archive.MIGRATION,
]


class _SeqTaken(sqlite3.IntegrityError):
    """The first seq of a batch is already in the file: another process appended meanwhile."""


_Item = tuple[dict[str, Any], str]
_RETRY: Final = object()
"""A batch item standing for nothing: queued by ``tick`` so that owed outcomes get a commit of their own."""


class _Owed:
    """Outcome records whose write failed, with the futures their callers hold, until they are durable.

    Two threads touch it: the event loop adds (a lazy write failed), the writer thread takes a batch's
    worth (``begin``), then settles it (``done`` after the commit, ``abort`` when it failed)."""

    __slots__ = ("_lock", "_waiting", "_writing", "backoff", "lost", "retry_at")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: deque[tuple[_Item, asyncio.Future[int]]] = deque()
        self._writing: list[tuple[_Item, asyncio.Future[int]]] = []
        self.lost = 0
        self.retry_at = 0.0
        self.backoff = RETRY_BACKOFF_S[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._writing)

    def add(self, item: _Item, future: asyncio.Future[int]) -> bool:
        """Keep ``item`` for a retry; False when ``MAX_OWED`` are owed already (the caller loses it)."""
        with self._lock:
            if len(self._waiting) + len(self._writing) >= MAX_OWED:
                self.lost += 1
                return False
            if not self._waiting and not self._writing:
                self.backoff = RETRY_BACKOFF_S[0]
                self.retry_at = time.monotonic() + self.backoff
            self._waiting.append((item, future))
            return True

    def begin(self) -> list[tuple[_Item, asyncio.Future[int]]]:
        """Everything owed, for the batch being written (a batch whose settling never came gives its
        items back first: the writer failed it outside ``commit_failed``)."""
        with self._lock:
            self._writing = [*self._writing, *self._waiting]
            self._waiting.clear()
            return list(self._writing)

    def abort(self) -> None:
        """The batch did not commit: what it carried is owed again, ahead of later failures."""
        with self._lock:
            self._waiting.extendleft(reversed(self._writing))
            self._writing = []

    def done(self) -> list[tuple[_Item, asyncio.Future[int]]]:
        """The batch committed: what it carried is durable; returns it to be settled."""
        with self._lock:
            written, self._writing = self._writing, []
            self.backoff = RETRY_BACKOFF_S[0]
            return written

    def due(self) -> bool:
        """Whether ``tick`` should retry now (and, if so, when next: the backoff doubles)."""
        with self._lock:
            if not self._waiting or time.monotonic() < self.retry_at:
                return False
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, RETRY_BACKOFF_S[1])
            return True


def _resolve(future: asyncio.Future[int], seq: int) -> None:
    if not future.done():
        future.set_result(seq)


class _Stdout:
    """Default for ``Ledger(out=...)``: whatever ``sys.stdout`` is when the ledger is built."""


STDOUT: Final = _Stdout()


class Ledger:
    """Appends audit records (hot path, from the event loop) and answers the operator's questions."""

    FIELDS: Final = FIELDS  # the stored order, from ``chain``: the cllama audit line first, then ours
    _FIELD_SET: Final = frozenset(FIELDS)

    def __init__(
        self,
        db: Database,
        out: TextIO | _Stdout | None = STDOUT,
        *,
        signer: CheckpointSigner | None = None,
    ) -> None:
        """``signer``: the appliance key's checkpoint signer; without it nothing is signed or required."""
        self._db = db
        self._signer = signer
        # The writer thread's: the tree as of this process's last commit, and the one a batch is building.
        self._tree: TreeState | None = None
        self._uncommitted: TreeState | None = None
        self._appended = False  # by this process: only then is the head signed at close
        stream: TextIO | None = sys.stdout if isinstance(out, _Stdout) else out
        self._printer = None if stream is None else AuditPrinter(stream)
        self._ok = True  # only the writer thread changes it, so it follows commit order
        self._owed = _Owed()
        self._owed_seqs: list[int] = []
        self._watchers: list[Callable[[list[tuple[dict[str, Any], int]]], None]] = []

    def watch(self, watcher: Callable[[list[tuple[dict[str, Any], int]]], None]) -> None:
        """Call ``watcher`` with each committed batch's (record, seq) pairs, in commit order, from the
        writer thread: the live counters and the audit stream. It must not block or raise."""
        self._watchers.append(watcher)

    @property
    def healthy(self) -> bool:
        """False after a ledger write failed, until a later one succeeds, and while outcomes are owed."""
        return self._ok and self._db.healthy and not len(self._owed)

    @property
    def owed_outcomes(self) -> int:
        """Outcome records waiting for a write that succeeds (their requests show in ``audit pending``)."""
        return len(self._owed)

    @property
    def outcomes_lost(self) -> int:
        """Outcome records given up because ``MAX_OWED`` were owed already (each logged as an error)."""
        return self._owed.lost

    # -- appending ----------------------------------------------------------------------------------------

    def append(self, record: dict[str, Any], *, lazy: bool = False) -> asyncio.Future[int]:
        """Queue ``record``; the future gives its seq once it is durable, or raises LedgerUnavailable.

        ``lazy``: the record asks for no fsync of its own and joins the next commit (a few ms at most);
        for records nobody waits on before answering (outcomes), so they share the next request's fsync.

        A record with unknown fields or a bad type raises ValueError at once (a programming error); in an
        oversized record, long strings are clipped to their length and digest (``CLIP_CHARS``). A lazy
        record whose write fails is owed (see the module's docstring): its future waits for the retry.
        """
        item = self._prepare(record)
        written = self._db.awrite_batched(self, item, lazy=lazy)
        if not lazy:
            return written
        future: asyncio.Future[int] = written.get_loop().create_future()
        written.add_done_callback(functools.partial(self._settle_lazy, item, future))
        return future

    def _settle_lazy(self, item: _Item, future: asyncio.Future[int], written: asyncio.Future[int]) -> None:
        if written.cancelled():
            future.cancel()
            return
        error = written.exception()
        if error is None:
            _resolve(future, written.result())
        elif not isinstance(error, StorageUnavailable):  # not the disk: a bug, not worth a retry
            future.set_exception(error)
        elif not self._owed.add(item, future):
            log.error(
                "an outcome record is lost: %d are owed already, the most kept for a retry; its request "
                "stays in audit pending",
                MAX_OWED,
            )
            future.set_exception(error)

    def append_sync(self, record: dict[str, Any]) -> int:
        """Blocking append (CLI commands); returns the record's seq."""
        seq: int = self._db.write_batched(self, self._prepare(record))
        self.flush_output()
        return seq

    def record_in(self, conn: sqlite3.Connection, record: dict[str, Any]) -> int:
        """Append ``record`` inside a write the caller is already in (the writer thread), so that an
        operator change and its audit record commit together; no stdout line (the terminal says it)."""
        seq = self._write_chained(conn, [self._prepare(record)])[0]  # owed outcomes wait for the writer
        self._tree = self._uncommitted = None  # committed with the caller's write, or not: read it again
        self._appended = True
        return seq

    def _prepare(self, record: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if not self._FIELD_SET.issuperset(record):
            unknown = sorted(set(record) - self._FIELD_SET)
            raise ValueError(f"unknown audit record fields: {unknown}")
        if record.get("type") not in TYPES:
            raise ValueError(f"audit record type must be one of {sorted(TYPES)}, got {record.get('type')!r}")
        ordered = dict.fromkeys(self.FIELDS)
        ordered.update(record)
        if ordered["ts"] is None:
            ordered["ts"] = timestamps.now()
        for column in ("ts", "request_id", "claw_id"):  # copied into TEXT columns: must stay strings
            if not isinstance(ordered[column], str | None):
                raise ValueError(f"audit record field {column} must be a string or null")
        canonical = encode_record(ordered)
        if len(canonical) > MAX_RECORD_CHARS:
            # Some values come from the client (a model name): clip them rather than lose the record.
            for name, value in ordered.items():
                if isinstance(value, str) and len(value) > CLIP_CHARS:
                    ordered[name] = f"[clipped: {len(value)} chars, sha256:{sha256_hex(value.encode())[:16]}]"
            canonical = canonical_json(ordered)
            if len(canonical) > MAX_RECORD_CHARS:
                raise ValueError(
                    f"audit record is {len(canonical)} characters; metadata only, at most {MAX_RECORD_CHARS}"
                )
        return ordered, canonical

    # -- the vault's BatchWriter: every record queued for one commit is written by one call ----------------

    def write_batch(self, conn: sqlite3.Connection, items: list[Any]) -> list[int | None]:
        """Chain and insert the owed outcomes, then ``items``; the seqs of ``items`` (None for ``_RETRY``).

        Owed outcomes go first, in the same INSERT: they and the batch are durable together or not at all.
        """
        owed = self._owed.begin()
        real = [item for item in items if item is not _RETRY]
        if not owed and not real:  # a retry whose outcomes an earlier batch carried
            return [None] * len(items)
        try:
            seqs = self._write_chained(conn, [item for item, _ in owed] + real)
        except BaseException:
            self._owed.abort()
            raise
        self._owed_seqs = seqs[: len(owed)]  # the writer thread's, settled in after_commit
        mine = iter(seqs[len(owed) :])
        return [None if item is _RETRY else next(mine) for item in items]

    def _write_chained(self, conn: sqlite3.Connection, items: list[_Item]) -> list[int]:
        """Chain and insert ``items`` with one multi-row INSERT per chunk; their seqs.

        The tree this process last committed is extended on a copy, which becomes current only in
        ``after_commit``: a failed commit leaves the state naming what the file holds.
        """
        try:
            try:
                return self._write_rows(conn, items, (self._tree or self._tree_in(conn)).copy())
            except _SeqTaken:
                # Another process (an operator's CLI command) appended since this one last did: its
                # record holds the seq this batch wanted, and nothing of the batch was inserted. Read
                # the file's tree and chain on from its newest record.
                self._tree = None
                return self._write_rows(conn, items, self._tree_in(conn).copy())
        except sqlite3.Error as exc:
            self._tree = None
            self._ok = False
            raise LedgerUnavailable(f"the audit ledger cannot be written: {exc}") from exc

    def _write_rows(
        self, conn: sqlite3.Connection, items: list[tuple[dict[str, Any], str]], tree: TreeState
    ) -> list[int]:
        """Chain, insert and add to ``tree``; no SELECT first: statements per commit set the rate (each
        one retakes the GIL on the writer thread), and a stale ``tree`` shows as a taken seq."""
        seq, prev = tree.size, tree.chain
        rows: list[Any] = []
        seqs: list[int] = []
        leaves: list[bytes] = []
        link, leaf_hash = chain_hash, merkle.leaf_hash
        for ordered, canonical in items:
            seq += 1
            data = canonical.encode()  # once for both the link and the leaf (tiles.entry_leaf(canonical))
            digest = link(prev, data)
            leaves.append(leaf_hash(data))
            rows += (
                seq,
                ordered["ts"],
                ordered["type"],
                ordered["request_id"],
                ordered["claw_id"],
                canonical,
                prev,
                digest,
            )
            seqs.append(seq)
            prev = digest
        for start in range(0, len(seqs), _ROWS_PER_INSERT):
            count = min(_ROWS_PER_INSERT, len(seqs) - start)
            try:
                conn.execute(_insert_sql(count), rows[start * 8 : (start + count) * 8])
            except sqlite3.IntegrityError as exc:
                # Only the first chunk can meet another writer's record (later ones follow ours).
                if start or getattr(exc, "sqlite_errorname", "") != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise
                raise _SeqTaken(str(exc)) from exc
        try:
            insert_tiles(conn, tree.extend(leaves, prev))
        except sqlite3.IntegrityError as exc:  # a tile for records the file no longer holds: it was cut
            raise TreeInconsistent(
                f"a tile for records after {tree.size - len(leaves)} already exists: the ledger was cut; "
                "run audit verify"
            ) from exc
        self._uncommitted = tree
        if self._signer is not None:
            self._signer.after_append(conn, tree)
        return seqs

    def _tree_in(self, conn: sqlite3.Connection) -> TreeState:
        """The tree as the file has it now (another process may have appended since this one last did)."""
        tree = self._tree
        if tree is None or not tree.matches(conn.execute(_LAST).fetchone()):
            tree = TreeState.load(conn)
            if self._signer is not None and self._signer.keep_cut_head(conn, tree.size):
                log.error(
                    "the audit ledger holds fewer records than its signed head: records were deleted; "
                    "the head is kept as evidence, and audit verify reports it"
                )
            self._tree = tree
        return tree

    def after_commit(self, items: list[Any], seqs: list[int | None]) -> None:
        """Settle the owed outcomes written, and hand one audit line per durable record to the stdout
        printer (which never blocks the writer)."""
        if self._uncommitted is not None:  # None: the batch was an empty retry, the tree is unchanged
            self._tree, self._uncommitted = self._uncommitted, None
        self._appended = True
        self._ok = True
        owed = self._owed.done()
        durable = [(item, seq) for (item, _), seq in zip(owed, self._owed_seqs, strict=True)]
        for (_, future), seq in zip(owed, self._owed_seqs, strict=True):
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: nobody waits for it
                future.get_loop().call_soon_threadsafe(_resolve, future, seq)
        self._owed_seqs = []
        if owed:
            log.info("%d owed outcome record(s) written to the audit ledger", len(owed))
        durable += [(item, seq) for item, seq in zip(items, seqs, strict=True) if seq is not None]
        if self._watchers and durable:
            records = [(record, seq) for (record, _), seq in durable]
            for watcher in self._watchers:
                try:
                    watcher(records)
                except Exception:  # a watcher's bug must not fail a commit that is already durable
                    log.exception("a ledger watcher failed")
        if self._printer is not None:
            self._printer.put("".join(f'{canonical[:-1]},"seq":{seq}}}\n' for (_, canonical), seq in durable))

    @property
    def dropped_lines(self) -> int:
        """Audit lines stdout's reader did not take in time (their records are in the ledger)."""
        return 0 if self._printer is None else self._printer.dropped_lines

    def flush_output(self) -> None:
        """Wait until every line of a durable record has been written to stdout."""
        if self._printer is not None:
            self._printer.wait()

    def seal_head(self) -> None:
        """Sign the head over what this process appended (the vault is about to close); a process that
        appended nothing signs nothing, so a command run on a cut ledger (verify) cannot cover the cut."""
        signer = self._signer
        if signer is not None and self._appended:
            self._db.write(lambda conn: signer.seal(conn, self._tree_in(conn)))

    def sign_upgraded(self) -> None:
        """Sign the first head of a ledger written before checkpoints existed, in the process that has
        just upgraded it (only then: anywhere else a missing head is evidence, not something to fill)."""
        signer = self._signer
        if signer is not None and checkpoints.MIGRATION.name in self._db.applied and self.count():
            self._db.write(lambda conn: signer.seal(conn, self._tree_in(conn)))

    def head_stale(self) -> bool:
        """Whether records were appended since this process last signed the head (the gateway's tick)."""
        tree = self._tree
        return self._signer is not None and tree is not None and self._signer.stale(tree.size)

    async def tick(self) -> None:
        """Sign the head if it is behind (called once a second by the gateway, so that records of a
        quiet moment are signed within a second rather than at the next busy one)."""
        if self._owed.due():
            with contextlib.suppress(StorageUnavailable):  # still failing: the next tick tries again
                await self._db.awrite_batched(self, _RETRY)
        signer = self._signer
        if signer is not None and self.head_stale():
            await self._db.awrite(lambda conn: signer.after_tick(conn, self._tree_in(conn)))

    def checkpoint(self, reason: str) -> str:
        """Sign and store a checkpoint of the ledger as it is now (blocking); returns the note text."""
        signer = self._require_signer()
        note: str = self._db.write(lambda conn: signer.store(conn, self._tree_in(conn), reason))
        return note

    def sign_size(self, size: int, root: bytes, reason: str) -> str:
        """Sign (not store) a checkpoint of the first ``size`` records with the root the caller computed
        from the file (an archive's); returns the note."""
        signer = self._require_signer()
        note: str = self._db.write(lambda conn: signer.sign_at(conn, size, root, reason))
        return note

    def checkpoint_in(self, conn: sqlite3.Connection, reason: str) -> str:
        """Store a checkpoint inside a write the caller is already in (a policy import and its record)."""
        try:
            return self._require_signer().store(conn, self._tree_in(conn), reason)
        finally:
            self._tree = None  # it may hold the caller's uncommitted records: read the file again

    def verifier(self) -> signed_note.Verifier:
        """The verifier key of this ledger's checkpoints (what an auditor is given)."""
        signer = self._require_signer()
        origin = checkpoints.stored_origin(self._db.reader())
        if origin is None:  # a ledger that has signed nothing yet: fix its origin now
            origin = self._db.write(signer.origin)
        return signer.verifier(origin)

    def _require_signer(self) -> CheckpointSigner:
        if self._signer is None:
            raise RuntimeError("this ledger was opened without the appliance key")
        return self._signer

    def close(self) -> None:
        """Stop the stdout printer after writing what is pending (the vault's writer is closed first)."""
        if owed := len(self._owed):
            log.error("%d outcome record(s) could not be written; their requests stay in audit pending", owed)
        if self._printer is not None:
            self._printer.close()

    def commit_failed(self, exc: StorageUnavailable) -> Exception:
        self._tree = self._uncommitted = None  # read the file again before the next append
        self._ok = False
        self._owed.abort()
        error = LedgerUnavailable(f"the audit ledger cannot be written: {exc}")
        error.__cause__ = exc
        return error

    # -- reading ------------------------------------------------------------------------------------------

    def count(self) -> int:
        """Number of records (the last seq: seqs are contiguous from 1, which ``verify`` checks)."""
        row = self._db.reader().execute(_LAST).fetchone()
        return 0 if row is None else int(row[0])

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` records, oldest first, each with its ``seq``."""
        rows = (
            self._db.reader()
            .execute("SELECT seq, record FROM ledger ORDER BY seq DESC LIMIT ?", (max(0, n),))
            .fetchall()
        )
        result = []
        for seq, text in reversed(rows):
            record = json.loads(text)
            entry = {name: record.get(name) for name in self.FIELDS}
            entry["seq"] = seq
            result.append(entry)
        return result

    def pending_outcomes(self, limit: int = 100) -> list[str]:
        """Request ids with a "request" record and no later "response"/"error" record, oldest first.

        After a crash these are the requests that were let through with no recorded outcome.
        """
        rows = (
            self._db.reader()
            .execute(
                "SELECT r.request_id FROM ledger AS r"
                " WHERE r.type = 'request' AND r.request_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM ledger AS o WHERE o.request_id = r.request_id"
                "   AND o.seq > r.seq AND o.type IN ('response', 'error'))"
                " ORDER BY r.seq LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [row[0] for row in rows]

    def verify(
        self,
        progress: Callable[[int], None] | None = None,
        *,
        kept: list[tuple[str, str]] | None = None,
        extra_verifiers: list[signed_note.Verifier] | None = None,
        bundles: tiles.ArchivedTiles | None = None,
    ) -> VerifyReport:
        """Recompute chain and tree from record 1 and check every checkpoint (``verify.verify_database``).

        ``kept``: (label, note) of checkpoints an auditor kept; ``bundles``: the records of archived tiles,
        for kept checkpoints inside one. Blocking: run it off the event loop.
        """
        verifiers = [*(extra_verifiers or [])]
        if self._signer is not None:
            origin = checkpoints.stored_origin(self._db.reader())
            verifiers.append(self._signer.verifier(origin or self._signer.default_origin))
        return verify_database(self._db.reader(), verifiers, kept or [], progress, bundles)


def first_seq_at(conn: sqlite3.Connection, ts: str) -> int:
    """The first seq whose ts is at or after ``ts`` (seqs run 1..N and ts grows with seq, up to the clock
    slack a caller allows for): a binary search, so a month's or a day's records are found without an index
    on ts."""
    row = conn.execute("SELECT max(seq) FROM ledger").fetchone()
    lo, hi = 1, (row[0] or 0) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        found = conn.execute("SELECT ts FROM ledger WHERE seq = ?", (mid,)).fetchone()
        if found is not None and found[0] < ts:
            lo = mid + 1
        else:
            hi = mid
    return lo
