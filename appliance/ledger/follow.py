"""Continuous export: every durable audit record, as its audit line, appended to a file log shippers tail.

Started by the gateway when ``[audit] export_file`` is set, or by ``audit export --follow --out FILE``.
See ``ExportFollower`` for the guarantees (no record skipped or repeated across restarts, rotation by
rename or truncation noticed, errors logged and retried).

Owns: the followed output file and its ``<out>.state``. Never: writes to the ledger; skips or repeats a
record in the followed file (a torn last line is cut back to the newline before it, and the resume point
is the later of the file's last line and the state file); lets an error out of its thread (it is logged
and retried).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Final, Literal

from appliance.errors import OperatorError
from appliance.ledger.checkpoints import stored_origin
from appliance.ledger.export import MAX_LINE_BYTES, audit_line, fsync_dir, line_seq

log = logging.getLogger("phi.audit_follow")

FOLLOW_BATCH: Final = 10_000
_ERROR_REPEAT_S: Final = 60.0

# -- continuous export ------------------------------------------------------------------------------------


class ExportFollower:
    """Appends the audit line of every durable record of a ledger to a file that log shippers tail.

    One follower per output file. It reads the ledger on its own read-only connection and, per poll,
    writes at most ``batch_lines`` whole lines, fsyncs them, and then records the last seq written in
    ``<out>.state`` (replaced by rename). It resumes after the later of the file's last complete line and
    the state file (the state file is what remains when the file was rotated away or emptied); with
    neither, from ``start``: "beginning" (record 1) or "end" (only records appended from now on).

    Rotation: before each batch the path is stat'ed. A path that is missing or names another file than the
    one open (logrotate's ``create`` mode renamed it) gets a new file (mode 0640); the old one keeps its
    lines. A file truncated under us (``copytruncate``) is appended to from its new end (O_APPEND); lines
    written between logrotate's copy and its truncate are lost to both files, which is that mode's own
    caveat: prefer ``create``.

    Errors (disk full, a directory that cannot be written, an unreadable ledger) are logged and retried
    at the next poll; a batch that failed half-written is cut back to its last whole line and resumed
    from there, so no record is skipped or repeated.
    """

    def __init__(
        self,
        ledger_path: Path,
        out_path: Path,
        *,
        start: Literal["beginning", "end"] = "beginning",
        batch_lines: int = FOLLOW_BATCH,
    ) -> None:
        if start not in ("beginning", "end"):
            raise ValueError(f"start must be 'beginning' or 'end', got {start!r}")
        self.ledger_path = ledger_path
        self.out_path = out_path
        self.state_path = out_path.with_name(out_path.name + ".state")
        self._start = start
        self._batch = max(1, batch_lines)
        self.last_error: str | None = None
        """The error of the last poll, or None when it went well (for /health and tests)."""
        self._last_logged = 0.0
        self._lock = threading.Lock()  # poll_once from stop() and from the thread never overlap
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # ledger side
        self._conn: sqlite3.Connection | None = None
        self._origin: str | None = None
        # output side
        self._fd: int | None = None
        self._fd_id: tuple[int, int] | None = None
        self._size = 0  # the file's size after our last write: a smaller one means it was truncated
        self._cursor: int | None = None  # last seq in the output; None: find it (file and state) first
        self._saved: int | None = None  # last seq in the state file

    # -- running ------------------------------------------------------------------------------------------

    def start_thread(self, interval_s: float = 0.5) -> ExportFollower:
        """Follow in a daemon thread, polling every ``interval_s`` while caught up, until ``stop()``."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self.run, args=(self._stop, interval_s), name="audit-export", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, write what is durable by now (the records of a shutdown), close the files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while self.poll_once() == self._batch:
            pass
        with self._lock:
            self._close_output()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Poll until ``stop`` is set; a full batch is followed at once by the next."""
        while not stop.is_set():
            try:
                written = self.poll_once()
            except Exception:  # a bug must not end the export silently: keep trying, loudly
                log.exception("audit export to %s failed unexpectedly; retrying", self.out_path)
                written = 0
            if written < self._batch:
                stop.wait(interval_s)

    def poll_once(self) -> int:
        """Append the lines of records not yet written (one batch at most); the number written.

        Never raises for I/O or database trouble: it is logged, kept in ``last_error``, and retried.
        """
        with self._lock:
            written = 0
            try:
                written = self._copy_batch()
                self._save_state()
            except (OSError, sqlite3.Error, OperatorError) as exc:
                if isinstance(exc, sqlite3.Error) and self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._report(f"{type(exc).__name__}: {exc}")
                return written
            self._report(None)
            return written

    # -- one poll -----------------------------------------------------------------------------------------

    def _copy_batch(self) -> int:
        conn = self._connection()
        if self._origin is None:
            with contextlib.suppress(sqlite3.OperationalError):  # a vault that never signed has no meta yet
                self._origin = stored_origin(conn)
        if self._cursor is None:
            self._cursor = self._resume(conn)
        cursor = self._cursor
        rows = conn.execute(
            "SELECT seq, record FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, self._batch)
        ).fetchall()
        if not rows:
            return 0
        if rows[-1][0] - cursor != len(rows):
            log.error(
                "records are missing from the audit ledger after seq %d (run audit verify); "
                "the export carries on with the records that are there",
                cursor,
            )
        data = "".join(audit_line(seq, text) for seq, text in rows).encode("utf-8")
        fd = self._output()
        try:
            self._write_all(fd, data)
            os.fsync(fd)
        except OSError:
            self._after_failed_write(fd, cursor)
            raise
        self._size = os.fstat(fd).st_size
        self._cursor = rows[-1][0]
        return len(rows)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _after_failed_write(self, fd: int, cursor: int) -> None:
        """Part of the batch may be in the file: cut a torn line, resume after the last whole one."""
        try:
            last = self._repair_tail(fd)
            self._size = os.fstat(fd).st_size
        except (OSError, OperatorError):
            self._close_output()
            self._cursor = None  # find out from the file and the state file at the next poll
            return
        self._cursor = max(cursor, last or 0)

    def _resume(self, conn: sqlite3.Connection) -> int:
        state = self._read_state()
        file_seq = self._repair_tail(self._output())
        if state is not None:
            seq, origin = state
            if origin is not None and self._origin is not None and origin != self._origin:
                raise OperatorError(
                    f"{self.state_path} belongs to the ledger of {origin}, not this one ({self._origin}):"
                    " move the export file and its state file aside"
                )
            self._saved = seq
        newest = int(conn.execute("SELECT MAX(seq) FROM ledger").fetchone()[0] or 0)
        known = [s for s in (file_seq, self._saved) if s is not None]
        if known:
            cursor = max(known)
            if cursor > newest:
                log.warning(
                    "audit export %s is ahead of the ledger (record %d, the ledger ends at %d): was the vault"
                    " restored? nothing is written until the ledger passes it",
                    self.out_path,
                    cursor,
                    newest,
                )
        else:
            cursor = newest if self._start == "end" else 0
        log.info("audit export to %s: resuming after record %d", self.out_path, cursor)
        return cursor

    # -- the output file ----------------------------------------------------------------------------------

    def _output(self) -> int:
        """The open output file, reopened when the path now names another file or none (rotation)."""
        try:
            st: os.stat_result | None = os.stat(self.out_path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if self._fd is not None:
            if st is None or (st.st_dev, st.st_ino) != self._fd_id:
                log.info("audit export file %s was moved away: starting a new one", self.out_path)
                self._close_output()
            else:
                if st.st_size < self._size:
                    log.info("audit export file %s was truncated: appending from its new end", self.out_path)
                self._size = st.st_size
                return self._fd
        flags = (
            os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        )
        fd = os.open(self.out_path, flags, 0o640)
        opened = os.fstat(fd)
        self._fd, self._fd_id, self._size = fd, (opened.st_dev, opened.st_ino), opened.st_size
        if st is None:
            with contextlib.suppress(OSError):
                fsync_dir(self.out_path.parent)
        return fd

    def _close_output(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._fd_id = None

    def _repair_tail(self, fd: int) -> int | None:
        """Cut a torn last line back to the newline before it; the seq of the last whole line, if any."""
        size = os.fstat(fd).st_size
        end = size
        while end > 0:  # find the last newline, reading backwards
            start = max(0, end - MAX_LINE_BYTES)
            os.lseek(fd, start, os.SEEK_SET)
            block = os.read(fd, end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            log.warning(
                "audit export file %s ended in a torn line (%d bytes): cut", self.out_path, size - end
            )
            os.ftruncate(fd, end)
            os.fsync(fd)
        if end == 0:
            return None
        start = max(0, end - MAX_LINE_BYTES)
        os.lseek(fd, start, os.SEEK_SET)
        block = os.read(fd, end - start)
        line = block[block.rfind(b"\n", 0, len(block) - 1) + 1 :]
        seq = line_seq(line)
        if seq is None:
            raise OperatorError(
                f"the last line of {self.out_path} is not an audit line: is another program writing to it?"
            )
        return seq

    # -- the state file -----------------------------------------------------------------------------------

    def _read_state(self) -> tuple[int, str | None] | None:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise OperatorError(f"{self.state_path} is damaged ({exc}): fix or remove it") from None
        seq, origin = (data.get("seq"), data.get("origin")) if isinstance(data, dict) else (None, None)
        if type(seq) is not int or seq < 0 or not isinstance(origin, str | None):
            raise OperatorError(f"{self.state_path} is not an export state file: fix or remove it")
        return seq, origin

    def _save_state(self) -> None:
        cursor = self._cursor
        if cursor is None or cursor == self._saved:
            return
        temp = self.state_path.with_name(self.state_path.name + ".tmp")
        data = json.dumps({"seq": cursor, "origin": self._origin}).encode("utf-8") + b"\n"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o640)
        try:
            self._write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.state_path)
        fsync_dir(self.state_path.parent)
        self._saved = cursor

    # -- the ledger and the log -----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            uri = self.ledger_path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    def _report(self, error: str | None) -> None:
        if error is None:
            if self.last_error is not None:
                log.info("audit export to %s works again", self.out_path)
            self.last_error = None
            return
        now = time.monotonic()
        if error != self.last_error or now - self._last_logged >= _ERROR_REPEAT_S:
            log.error("audit export to %s: %s; retrying", self.out_path, error)
            self._last_logged = now
        self.last_error = error


def exported_through(out_path: Path) -> int | None:
    """The newest seq a continuous export has written to ``out_path`` (its state file, or its last whole
    line), read without changing anything; None when nothing was exported there yet.

    ``audit verify`` compares it with the ledger: records a log shipper already took cannot have been
    cut from the ledger's end without it showing, even by someone who re-signed the ledger.
    """
    seqs: list[int] = []
    try:
        data = json.loads(out_path.with_name(out_path.name + ".state").read_text(encoding="utf-8"))
        if isinstance(data, dict) and type(data.get("seq")) is int:
            seqs.append(data["seq"])
    except (OSError, ValueError):
        pass
    try:
        with out_path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, end - MAX_LINE_BYTES))
            lines = handle.read().split(b"\n")
        whole = [line for line in lines[:-1] if line]  # the last piece has no newline yet: not whole
        seq = line_seq(whole[-1] + b"\n") if whole else None
        if seq is not None:
            seqs.append(seq)
    except OSError:
        pass
    return max(seqs) if seqs else None
