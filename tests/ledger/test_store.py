"""The audit ledger: durable appends, stdout lines after commit, the hash chain and what verify catches."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import LedgerUnavailable
from appliance.ledger.chain import GENESIS, chain_hash, sha256_hex
from appliance.ledger.store import MIGRATIONS, Ledger
from appliance.timestamps import now as utc_now_iso
from appliance.vault.db import Database


def _record(i: int, type_: str = "response", **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "claw_id": "radiology-bot",
        "type": type_,
        "model": "local/demo",
        "status_code": 200,
        "latency_ms": i,
        "request_id": f"req-{i}",
        "request_sha256": sha256_hex(b"body %d" % i),
    }
    record.update(extra)
    return record


async def _append_all(ledger: Ledger, records: list[dict[str, Any]]) -> list[int]:
    return list(await asyncio.gather(*(ledger.append(r) for r in records)))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault.db"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    with Database(path, MIGRATIONS) as database:
        yield database


def _filled(db: Database, n: int, out: io.StringIO | None = None) -> Ledger:
    ledger = Ledger(db, out)
    assert asyncio.run(_append_all(ledger, [_record(i) for i in range(1, n + 1)])) == list(range(1, n + 1))
    ledger.flush_output()
    return ledger


def _raw(path: Path) -> sqlite3.Connection:
    """An attacker with the file: a plain connection outside the gateway, append-only guards dropped."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS ledger_append_only_update")
    conn.execute("DROP TRIGGER IF EXISTS ledger_append_only_delete")
    return conn


def test_plain_updates_and_deletes_are_refused(db: Database, path: Path) -> None:
    _filled(db, 3)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for sql in ("UPDATE ledger SET record = '{}' WHERE seq = 2", "DELETE FROM ledger WHERE seq = 3"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
    finally:
        conn.close()


def test_helpers() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_now_iso())
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert len(GENESIS) == 64 and set(GENESIS) == {"0"}


def test_appends_are_contiguous_and_printed_as_json_lines(db: Database, path: Path) -> None:
    out = io.StringIO()
    ledger = _filled(db, 300, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 300
    parsed = [json.loads(line) for line in lines]
    assert all(list(p) == [*Ledger.FIELDS, "seq"] for p in parsed)
    assert sorted(p["seq"] for p in parsed) == list(range(1, 301))
    first = next(p for p in parsed if p["seq"] == 1)
    assert first["claw_id"] == "radiology-bot" and first["intervention"] is None and first["org"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert ledger.count() == 300
    assert db.commits < 300  # group commit shared the fsyncs


def test_stored_record_is_canonical_json_and_chains(db: Database, path: Path) -> None:
    _filled(db, 3)
    rows = (
        sqlite3.connect(path)
        .execute("SELECT seq, record, prev_hash, hash FROM ledger ORDER BY seq")
        .fetchall()
    )
    prev = GENESIS
    for _seq, record, prev_hash, digest in rows:
        loaded = json.loads(record)
        assert list(loaded) == list(Ledger.FIELDS)  # the audit line's field order, compact
        assert record == json.dumps(loaded, separators=(",", ":"), ensure_ascii=False)
        assert set(loaded) == set(Ledger.FIELDS)
        assert prev_hash == prev and digest == chain_hash(prev, record)
        prev = digest


class _CheckingOut(io.StringIO):
    """Checks, at print time, that the printed record is already committed (seen by another connection)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.unseen: list[int] = []

    def write(self, s: str) -> int:
        conn = sqlite3.connect(self.path)
        try:
            for line in s.splitlines():
                seq = json.loads(line)["seq"]
                if conn.execute("SELECT 1 FROM ledger WHERE seq = ?", (seq,)).fetchone() is None:
                    self.unseen.append(seq)
        finally:
            conn.close()
        return super().write(s)


def test_lines_are_printed_only_after_commit(db: Database, path: Path) -> None:
    out = _CheckingOut(path)
    _filled(db, 50, out)
    assert out.unseen == []
    assert len(out.getvalue().splitlines()) == 50


def test_append_sync_for_the_cli(db: Database) -> None:
    out = io.StringIO()
    ledger = Ledger(db, out)
    assert ledger.append_sync({"type": "admin", "detail": "policy_import v3"}) == 1
    assert ledger.append_sync({"type": "admin", "detail": "token_revoke"}) == 2
    assert [json.loads(line)["detail"] for line in out.getvalue().splitlines()] == [
        "policy_import v3",
        "token_revoke",
    ]
    assert [r["seq"] for r in ledger.tail(5)] == [1, 2]
    assert ledger.tail(1)[0]["detail"] == "token_revoke"


def test_default_out_is_stdout(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    Ledger(db).append_sync({"type": "admin", "detail": "x"})
    assert json.loads(capsys.readouterr().out)["seq"] == 1


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"type": "response", "prompt": "Patient John Doe"}, "unknown audit record fields"),
        ({"type": "chat"}, "type must be one of"),
        ({}, "type must be one of"),
        ({"type": "response", "intervention": {"rules": ["x" * 100] * 50}}, "metadata only"),
        ({"type": "response", "cost_usd": float("nan")}, "not JSON compliant"),
        ({"type": "response", "request_id": 17}, "request_id must be a string"),
    ],
)
def test_bad_records_are_refused_before_the_write(db: Database, record: dict[str, Any], problem: str) -> None:
    ledger = Ledger(db, None)
    with pytest.raises(ValueError, match=problem):
        ledger.append_sync(record)
    assert ledger.count() == 0


def test_long_client_strings_in_an_oversized_record_are_clipped(db: Database) -> None:
    out = io.StringIO()
    ledger = Ledger(db, out)
    model = "Patient John Doe, MRN 12345, " * 200  # a hostile model name must not land in the ledger
    assert ledger.append_sync({"type": "error", "model": model, "status_code": 404, "detail": "x" * 100}) == 1
    stored = ledger.tail(1)[0]
    assert stored["model"] == f"[clipped: {len(model)} chars, sha256:{sha256_hex(model.encode())[:16]}]"
    assert stored["detail"] == "x" * 100  # short values are kept
    assert "John Doe" not in out.getvalue()
    assert ledger.verify().ok


def test_verify_ok_and_progress(db: Database) -> None:
    ledger = _filled(db, 100)
    seen: list[int] = []
    report = ledger.verify(progress=seen.append)
    assert report.ok and report.records == 100 and report.first_bad_seq is None
    assert seen[-1] == 100
    assert Ledger(db, None).verify().ok  # a fresh object reads the same chain
    empty_db_report = ledger.verify()
    assert empty_db_report.message == "100 records: hash chain and Merkle tree intact"


def test_verify_empty(db: Database) -> None:
    report = Ledger(db, None).verify()
    assert report.ok and report.records == 0 and report.message == "the ledger is empty"


def test_verify_detects_an_edited_record(db: Database, path: Path) -> None:
    ledger = _filled(db, 30)
    raw = _raw(path)
    record = raw.execute("SELECT record FROM ledger WHERE seq = 17").fetchone()[0]
    raw.execute(
        "UPDATE ledger SET record = ? WHERE seq = 17",
        (record.replace('"status_code":200', '"status_code":403'),),
    )
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq, report.records) == (False, 17, 16)
    assert report.message == "record 17: content does not match its hash (edited)"


def test_verify_detects_an_edited_hash(db: Database, path: Path) -> None:
    ledger = _filled(db, 30)
    _raw(path).execute("UPDATE ledger SET hash = ? WHERE seq = 12", ("f" * 64,))
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq) == (False, 12)
    assert report.message == "record 12: its stored hash was altered"


def test_verify_detects_an_edited_index_column(db: Database, path: Path) -> None:
    """Hiding a crashed request from pending_outcomes by retyping its column is caught too."""
    ledger = Ledger(db, None)
    asyncio.run(_append_all(ledger, [_record(i, "request") for i in range(1, 11)]))
    assert len(ledger.pending_outcomes()) == 10
    _raw(path).execute("UPDATE ledger SET type = 'admin' WHERE seq = 6")
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert report.message == "record 6: its indexed columns do not match its content (edited)"


def test_verify_survives_a_record_that_is_not_json(db: Database, path: Path) -> None:
    ledger = _filled(db, 5)
    _raw(path).execute("UPDATE ledger SET record = '{not json' WHERE seq = 3")
    report = ledger.verify()
    assert (report.first_bad_seq, report.message) == (3, "record 3: content does not match its hash (edited)")


def test_verify_detects_a_deleted_record(db: Database, path: Path) -> None:
    ledger = _filled(db, 30)
    _raw(path).execute("DELETE FROM ledger WHERE seq = 17")
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq, report.records) == (False, 17, 16)
    assert report.message == "record 17 is missing (deleted)"


def test_verify_detects_a_deleted_first_record(db: Database, path: Path) -> None:
    ledger = _filled(db, 5)
    _raw(path).execute("DELETE FROM ledger WHERE seq = 1")
    report = ledger.verify()
    assert (report.first_bad_seq, report.message) == (1, "record 1 is missing (deleted)")


def test_verify_detects_swapped_contents(db: Database, path: Path) -> None:
    ledger = _filled(db, 30)
    raw = _raw(path)
    a = raw.execute("SELECT record FROM ledger WHERE seq = 9").fetchone()[0]
    b = raw.execute("SELECT record FROM ledger WHERE seq = 10").fetchone()[0]
    raw.execute("UPDATE ledger SET record = ? WHERE seq = 9", (b,))
    raw.execute("UPDATE ledger SET record = ? WHERE seq = 10", (a,))
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq) == (False, 9)
    assert "content does not match its hash" in report.message


def test_verify_detects_reordered_rows(db: Database, path: Path) -> None:
    ledger = _filled(db, 30)
    raw = _raw(path)
    raw.execute("UPDATE ledger SET seq = -1 WHERE seq = 9")
    raw.execute("UPDATE ledger SET seq = 9 WHERE seq = 10")
    raw.execute("UPDATE ledger SET seq = 10 WHERE seq = -1")
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq) == (False, 9)
    assert report.message == "record 9 does not chain to record 8"


def test_verify_detects_a_relinked_record(db: Database, path: Path) -> None:
    """Record 18 rewritten with a consistent hash but linked to a forged predecessor."""
    ledger = _filled(db, 30)
    raw = _raw(path)
    record = raw.execute("SELECT record FROM ledger WHERE seq = 18").fetchone()[0]
    forged_prev = "a" * 64
    raw.execute(
        "UPDATE ledger SET prev_hash = ?, hash = ? WHERE seq = 18",
        (forged_prev, chain_hash(forged_prev, record)),
    )
    report = ledger.verify()
    assert (report.ok, report.first_bad_seq) == (False, 18)
    assert report.message == "record 18 does not chain to record 17"


def test_verify_detects_a_rewritten_record_at_its_successor(db: Database, path: Path) -> None:
    """Edit 17 and recompute its hash: the break shows where 18 no longer chains to it."""
    ledger = _filled(db, 30)
    raw = _raw(path)
    prev = raw.execute("SELECT prev_hash FROM ledger WHERE seq = 17").fetchone()[0]
    record = raw.execute("SELECT record FROM ledger WHERE seq = 17").fetchone()[0].replace("200", "500")
    raw.execute("UPDATE ledger SET record = ?, hash = ? WHERE seq = 17", (record, chain_hash(prev, record)))
    report = ledger.verify()
    assert (report.first_bad_seq, report.message) == (18, "record 18 does not chain to record 17")


def test_verify_detects_a_forged_genesis(db: Database, path: Path) -> None:
    ledger = _filled(db, 3)
    raw = _raw(path)
    record = raw.execute("SELECT record FROM ledger WHERE seq = 1").fetchone()[0]
    raw.execute(
        "UPDATE ledger SET prev_hash = ?, hash = ? WHERE seq = 1", ("1" * 64, chain_hash("1" * 64, record))
    )
    report = ledger.verify()
    assert report.first_bad_seq == 1 and "does not start the chain" in report.message


def test_two_processes_appending_alternately_keep_one_chain(path: Path) -> None:
    server_out, cli_out = io.StringIO(), io.StringIO()
    with Database(path, MIGRATIONS) as server_db, Database(path, MIGRATIONS) as cli_db:
        server, cli = Ledger(server_db, server_out), Ledger(cli_db, cli_out)

        async def server_burst(start: int) -> list[int]:
            return await _append_all(server, [_record(start + i) for i in range(20)])

        seqs: list[int] = []
        for round_ in range(5):
            seqs += asyncio.run(server_burst(round_ * 100))
            seqs.append(cli.append_sync({"type": "admin", "detail": f"cli {round_}"}))

        # And both at once, from two threads.
        def cli_loop() -> None:
            for i in range(30):
                seqs.append(cli.append_sync({"type": "admin", "detail": f"concurrent {i}"}))

        thread = threading.Thread(target=cli_loop)
        thread.start()
        seqs += asyncio.run(_append_all(server, [_record(1000 + i) for i in range(200)]))
        thread.join()

        assert sorted(seqs) == list(range(1, 5 * 21 + 30 + 200 + 1))
        report = server.verify()
        assert report.ok and report.records == len(seqs)
        assert cli.verify().ok
    server.flush_output()
    cli.flush_output()
    printed = [json.loads(line)["seq"] for line in (server_out.getvalue() + cli_out.getvalue()).splitlines()]
    assert sorted(printed) == sorted(seqs)


def test_a_stalled_stdout_never_stalls_the_ledger(db: Database) -> None:
    release = threading.Event()

    class Stalled(io.StringIO):
        def write(self, s: str) -> int:
            release.wait(10)  # nobody reads the pipe
            return super().write(s)

    ledger = Ledger(db, Stalled())

    async def many() -> list[int]:  # one commit each: more batches than the printer queue holds
        return [await ledger.append(_record(i)) for i in range(1100)]

    assert len(asyncio.run(many())) == 1100
    assert ledger.dropped_lines > 0 and ledger.healthy
    release.set()
    ledger.close()


def test_pending_outcomes(db: Database) -> None:
    ledger = Ledger(db, None)
    records = [
        _record(1, "request"),
        _record(1, "response"),
        _record(2, "request"),  # crashed between forward and outcome
        _record(3, "request"),
        _record(3, "error", status_code=502),
        _record(4, "request"),
        _record(5, "intervention", intervention="deid"),
        {"type": "admin", "detail": "policy_import v3"},
    ]
    asyncio.run(_append_all(ledger, records))
    assert ledger.pending_outcomes() == ["req-2", "req-4"]
    assert ledger.pending_outcomes(limit=1) == ["req-2"]
    ledger.append_sync(_record(4, "response"))
    assert ledger.pending_outcomes() == ["req-2"]


def test_write_failure_is_ledger_unavailable_then_recovers(db: Database, path: Path) -> None:
    out = io.StringIO()
    ledger = Ledger(db, out)
    assert ledger.append_sync({"type": "admin", "detail": "before"}) == 1
    sabotage = sqlite3.connect(path, isolation_level=None)
    sabotage.execute(
        "CREATE TRIGGER ledger_sabotage BEFORE INSERT ON ledger"
        " BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )

    async def failing() -> None:
        with pytest.raises(LedgerUnavailable) as info:
            await ledger.append(_record(1))
        assert info.value.status == 503 and isinstance(info.value.__cause__, sqlite3.Error)

    asyncio.run(failing())
    assert ledger.healthy is False
    with pytest.raises(LedgerUnavailable):
        ledger.append_sync({"type": "admin", "detail": "during"})
    assert ledger.healthy is False
    assert len(out.getvalue().splitlines()) == 1  # nothing printed for records that are not on disk

    sabotage.execute("DROP TRIGGER ledger_sabotage")

    async def recovered() -> int:
        return await ledger.append(_record(2))

    assert asyncio.run(recovered()) == 2
    assert ledger.healthy is True
    assert ledger.verify().ok and ledger.count() == 2


def test_commit_failure_is_ledger_unavailable(db: Database) -> None:
    """A failure of the whole batch (StorageUnavailable from the writer) is translated too."""
    ledger = Ledger(db, None)
    original = db._commit_batch

    def failing_commit(conn: sqlite3.Connection, batch: list[Any]) -> None:
        conn.execute("PRAGMA query_only=1")  # the next write in the transaction fails at commit level
        try:
            original(conn, batch)
        finally:
            conn.execute("PRAGMA query_only=0")

    db._commit_batch = failing_commit  # type: ignore[method-assign]

    async def attempt() -> None:
        with pytest.raises(LedgerUnavailable):
            await ledger.append(_record(1))

    asyncio.run(attempt())
    assert db.healthy is False and ledger.healthy is False
    db._commit_batch = original  # type: ignore[method-assign]
    assert ledger.append_sync(_record(2)) == 1
    assert ledger.healthy is True


@pytest.mark.parametrize(
    "record",
    [
        _record(1),
        _record(2, "intervention", intervention={"kind": "redact", "count": 2, "ok": True}, cost_usd=0.00125),
        _record(3, detail='ünïcode \u2028 "quoted" \\ back\nslash', tokens_in=0, tokens_out=-1),
        _record(4, status_code=True, latency_ms=1e-7, policy_version=2**70, rule=["a", None, 1.5]),
    ],
)
def test_the_fast_encoder_writes_what_the_canonical_encoder_writes(record: dict[str, Any]) -> None:
    from appliance.ledger.chain import canonical_json, encode_record

    ordered = dict.fromkeys(Ledger.FIELDS)
    ordered.update(record, ts=utc_now_iso())
    assert encode_record(ordered) == canonical_json(ordered)
