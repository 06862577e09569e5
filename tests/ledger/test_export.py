"""Audit exports: plain JSON lines, signed bundles checked without the ledger, the rotation-safe follower.

Real homes (real Ed25519 appliance keys), real SQLite files, real files for the exports.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import signing_keys
from appliance.errors import OperatorError
from appliance.home import Home
from appliance.ledger import export as audit_export
from appliance.ledger import signed_note
from appliance.ledger.export import (
    ExportReport,
    export_range,
    first_seq_since,
    since_timestamp,
    verify_exports,
    write_export,
)
from appliance.ledger.follow import ExportFollower
from appliance.ledger.store import Ledger

N = 520  # two whole tiles of 256 and a partial one; chunks of 16 and a partial one at the end


def _record(i: int, tag: str = "r") -> dict[str, Any]:
    return {
        "type": "response",
        "claw_id": "bot",
        "model": "local/demo",
        "status_code": 200,
        "request_id": f"{tag}{i}",
    }


async def _gather(ledger: Ledger, count: int, tag: str) -> None:
    await asyncio.gather(*(ledger.append(_record(i, tag)) for i in range(count)))


def _append(home: Home, count: int, tag: str = "r") -> None:
    with home.open_vault() as vault:
        asyncio.run(_gather(vault.ledger, count, tag))


def _home(root: Path, n: int, name: str = "home") -> Home:
    """A home whose ledger holds ``n`` records (init writes record 1)."""
    home = Home(root / name)
    home.init(site="stmarys-main")
    if n > 1:
        _append(home, n - 1)
    return home


def _stored_lines(home: Home) -> list[str]:
    conn = sqlite3.connect(home.vault_path)
    try:
        return [
            f'{text[:-1]},"seq":{seq}}}'
            for seq, text in conn.execute("SELECT seq, record FROM ledger ORDER BY seq")
        ]
    finally:
        conn.close()


def _export(home: Home, out: Path, first_seq: int) -> audit_export.ExportSummary:
    with home.open_vault() as vault:
        return write_export(vault.ledger, vault.db.reader(), out, first_seq)


def _verifier(home: Home) -> signed_note.Verifier:
    with home.open_vault() as vault:
        return vault.ledger.verifier()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _seqs(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in _lines(path)] if path.exists() else []


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return _home(tmp_path_factory.mktemp("big"), N)


@pytest.fixture(scope="module")
def big_key(big: Home) -> signed_note.Verifier:
    return _verifier(big)


def _verify_one(path: Path, verifiers: list[signed_note.Verifier]) -> ExportReport:
    (report,) = verify_exports([path], verifiers)
    return report


# -- plain exports ----------------------------------------------------------------------------------------


def test_export_range_writes_the_stdout_lines(tmp_path: Path) -> None:
    home = _home(tmp_path, 1)
    stdout = io.StringIO()
    with home.open_vault(audit_out=stdout) as vault:
        asyncio.run(_gather(vault.ledger, 40, "s"))
        vault.ledger.flush_output()
        out = io.StringIO()
        assert export_range(vault.db.reader(), 2, 41, out) == 40
        assert out.getvalue() == stdout.getvalue()
        assert out.getvalue().splitlines() == _stored_lines(home)[1:]
        part = io.StringIO()
        assert export_range(vault.db.reader(), 5, 7, part) == 3
        assert [json.loads(line)["seq"] for line in part.getvalue().splitlines()] == [5, 6, 7]
        with pytest.raises(OperatorError, match=r"records 42\.\.50 are not in the ledger"):
            export_range(vault.db.reader(), 40, 50, io.StringIO())


def test_since_is_normalised_to_the_stored_timestamps() -> None:
    assert since_timestamp("2026-11-25") == "2026-11-25T00:00:00.000Z"
    assert since_timestamp("2026-11-25T10:00:00Z") == "2026-11-25T10:00:00.000Z"
    assert since_timestamp("2026-11-25T10:00:00.123Z") == "2026-11-25T10:00:00.123Z"
    assert since_timestamp("2026-11-25T10:00:00.5Z") == "2026-11-25T10:00:00.500Z"
    assert since_timestamp("2026-11-25T10:00:00.1231Z") == "2026-11-25T10:00:00.124Z"  # at or after
    assert since_timestamp("2026-11-25T11:00:00+01:00") == "2026-11-25T10:00:00.000Z"
    for bad in ("yesterday", "2026-11-25T10:00:00", "2026-13-01", "2026-11-25T25:00:00Z", ""):
        with pytest.raises(OperatorError, match="--since"):
            since_timestamp(bad)


def test_first_seq_since(tmp_path: Path) -> None:
    home = _home(tmp_path, 1)
    times = ["2999-11-24T23:59:59.999Z", "2999-11-25T00:00:00.000Z", "2999-11-25T10:00:00.123Z"]
    with home.open_vault() as vault:
        for ts in times:
            vault.ledger.append_sync({**_record(0), "ts": ts})
        conn = vault.db.reader()
        assert first_seq_since(conn, "2999-11-25") == 3
        assert first_seq_since(conn, "2999-11-25T10:00:00Z") == 4
        assert first_seq_since(conn, "2999-11-25T10:00:00.123Z") == 4
        assert first_seq_since(conn, "2999-11-25T10:00:00.124Z") is None
        assert first_seq_since(conn, "2000-01-01") == 1
        with pytest.raises(OperatorError, match="not an RFC 3339 UTC time"):
            first_seq_since(conn, "last tuesday")


# -- export bundles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_seq", [1, 2, 256, 257, 300, 513, N])
def test_an_export_verifies_from_any_first_record(
    big: Home, big_key: signed_note.Verifier, tmp_path: Path, first_seq: int
) -> None:
    out = tmp_path / "audit.jsonl"
    summary = _export(big, out, first_seq)
    assert (summary.first_seq, summary.last_seq, summary.lines) == (first_seq, N, N - first_seq + 1)
    assert _lines(out) == _stored_lines(big)[first_seq - 1 :]
    sidecar = json.loads(summary.prefix_path.read_text())
    assert sidecar["format"] == "phi-gateway-export/v1" and sidecar["origin"] == big_key.name
    assert len(sidecar["prefix"]) == (first_seq - 1).bit_count()
    assert sidecar["verifier_key"] == big_key.encode()
    assert signed_note.open_note(summary.checkpoint_path.read_text(), [big_key]).reason == "export"
    report = _verify_one(out, [big_key])
    assert report.ok, report.problems
    assert (report.origin, report.first_seq, report.last_seq, report.lines) == (
        big_key.name,
        first_seq,
        N,
        N - first_seq + 1,
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_export_of_nothing_is_refused(big: Home, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="nothing to export"):
        _export(big, tmp_path / "x.jsonl", N + 1)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def exported(big: Home, tmp_path: Path) -> Path:
    out = tmp_path / "audit.jsonl"
    _export(big, out, 1)
    return out


@pytest.fixture
def exported_300(big: Home, tmp_path: Path) -> Path:
    out = tmp_path / "audit-300.jsonl"
    _export(big, out, 300)
    return out


def _edit_line(path: Path, seq: int, old: str, new: str, first_seq: int = 1) -> None:
    lines = _lines(path)
    assert old in lines[seq - first_seq]
    lines[seq - first_seq] = lines[seq - first_seq].replace(old, new, 1)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _problem(path: Path, key: signed_note.Verifier) -> str:
    report = _verify_one(path, [key])
    assert not report.ok
    return "; ".join(report.problems)


MISMATCH = f"the root of records 1..{N} does not match the signed checkpoint"


def test_a_changed_character_is_located(exported: Path, big_key: signed_note.Verifier) -> None:
    _edit_line(exported, 23, '"model":"local/demo"', '"model":"local/dema"')
    assert _problem(exported, big_key) == f"records in 17..32 were altered, deleted or reordered: {MISMATCH}"


def test_a_changed_character_is_located_in_a_partial_export(
    exported_300: Path, big_key: signed_note.Verifier
) -> None:
    _edit_line(exported_300, 400, '"status_code":200', '"status_code":201', first_seq=300)
    assert (
        _problem(exported_300, big_key)
        == f"records in 385..400 were altered, deleted or reordered: {MISMATCH}"
    )


def test_a_change_at_the_edge_of_a_partial_export(exported_300: Path, big_key: signed_note.Verifier) -> None:
    _edit_line(exported_300, 301, '"model":"local/demo"', '"model":"local/dema"', first_seq=300)
    assert _problem(exported_300, big_key) == (
        f"{MISMATCH}: the prefix hashes of records 1..299 or records 300..{N} of this file were altered,"
        " deleted or reordered"
    )


def test_a_line_that_is_not_json(exported: Path, big_key: signed_note.Verifier) -> None:
    _edit_line(exported, 23, '"type":"response"', '"type":response"')
    assert _problem(exported, big_key).startswith("line 23 (seq 23): not valid JSON")
    _edit_line(exported, 23, ',"seq":23}', ',"seq":"23"}')
    assert _problem(exported, big_key).startswith(
        'line 23: not an exported audit line (it must end with ,"seq":N})'
    )


def test_a_deleted_line(exported: Path, big_key: signed_note.Verifier) -> None:
    lines = _lines(exported)
    del lines[23]
    exported.write_text("".join(line + "\n" for line in lines))
    assert _problem(exported, big_key) == "seq 24 missing after 23"
    del lines[0]
    exported.write_text("".join(line + "\n" for line in lines))
    assert _problem(exported, big_key) == "seq 1 missing at the start of the file (its first line is seq 2)"


def test_swapped_lines(exported: Path, big_key: signed_note.Verifier) -> None:
    lines = _lines(exported)
    lines[29], lines[30] = lines[30], lines[29]
    exported.write_text("".join(line + "\n" for line in lines))
    assert _problem(exported, big_key) == "line 30 (seq 31): out of order: seq 30 comes later, at line 31"


def test_swapped_records_with_their_seqs_rewritten(exported: Path, big_key: signed_note.Verifier) -> None:
    lines = _lines(exported)
    a, b = lines[29].replace(',"seq":30}', ',"seq":31}'), lines[30].replace(',"seq":31}', ',"seq":30}')
    lines[29], lines[30] = b, a
    exported.write_text("".join(line + "\n" for line in lines))
    assert _problem(exported, big_key) == f"records in 17..32 were altered, deleted or reordered: {MISMATCH}"


def test_a_record_deleted_and_the_rest_renumbered(exported: Path, big_key: signed_note.Verifier) -> None:
    lines = _lines(exported)[:N]
    renumbered = lines[:99] + [
        line.replace(f',"seq":{i + 2}}}', f',"seq":{i + 1}}}') for i, line in enumerate(lines[100:], 99)
    ]
    exported.write_text("".join(line + "\n" for line in renumbered))
    assert (
        _problem(exported, big_key)
        == f"truncated: the checkpoint covers {N} records, the file ends at {N - 1}"
    )


def test_a_truncated_tail(exported: Path, big_key: signed_note.Verifier) -> None:
    exported.write_text("".join(line + "\n" for line in _lines(exported)[:-5]))
    assert (
        _problem(exported, big_key)
        == f"truncated: the checkpoint covers {N} records, the file ends at {N - 5}"
    )
    data = exported.read_bytes()
    exported.write_bytes(data[:-40])  # cut inside the last line
    assert _problem(exported, big_key).startswith(f"line {N - 5}: not an exported audit line")
    exported.write_bytes(b"")
    assert (
        _problem(exported, big_key)
        == f"truncated: the checkpoint covers {N} records, the file holds none of 1..{N}"
    )


def test_an_added_line(exported: Path, big_key: signed_note.Verifier) -> None:
    extra = _lines(exported)[-1].replace(f',"seq":{N}}}', f',"seq":{N + 1}}}')
    with exported.open("a") as handle:
        handle.write(extra + "\n")
    assert (
        _problem(exported, big_key)
        == f"line {N + 1} (seq {N + 1}): beyond the checkpoint, which covers records 1..{N}"
    )


def test_a_forged_checkpoint_signature(exported: Path, big_key: signed_note.Verifier) -> None:
    cp_path = exported.with_name(exported.name + ".checkpoint")
    note = cp_path.read_text()
    cp = signed_note.parse_unverified(note)
    forged_root = base64.b64encode(bytes(32)).decode()
    cp_path.write_text(note.replace(base64.b64encode(cp.root).decode(), forged_root))
    assert _problem(exported, big_key).startswith("audit.jsonl.checkpoint: signature does not verify")


def test_a_checkpoint_signed_by_another_key(
    exported: Path, big_key: signed_note.Verifier, tmp_path: Path
) -> None:
    other = _home(tmp_path, 1, "other")
    cp_path = exported.with_name(exported.name + ".checkpoint")
    cp = signed_note.parse_unverified(cp_path.read_text())
    cp_path.write_text(signed_note.sign(cp, signing_keys.load_signing_key(other.appliance_key)))
    problem = _problem(exported, big_key)
    assert problem.startswith("audit.jsonl.checkpoint: signed by an unknown key")
    assert f"(the export names {big_key.encode()}: pass it with --key if you trust it)" in problem


def test_an_altered_prefix_hash(exported_300: Path, big_key: signed_note.Verifier) -> None:
    side = exported_300.with_name(exported_300.name + ".prefix.json")
    doc = json.loads(side.read_text())
    first = bytearray(base64.b64decode(doc["prefix"][0]))
    first[0] ^= 1
    doc["prefix"][0] = base64.b64encode(bytes(first)).decode()
    side.write_text(json.dumps(doc))
    assert _problem(exported_300, big_key).startswith(f"{MISMATCH}: the prefix hashes of records 1..299")
    doc["prefix"] = doc["prefix"][1:]
    side.write_text(json.dumps(doc))
    assert (
        _problem(exported_300, big_key)
        == "audit-300.jsonl.prefix.json: Frontier of size 299 needs 5 subtree hashes, got 4"
    )


def test_altered_chunk_hashes_only_cost_the_location(exported: Path, big_key: signed_note.Verifier) -> None:
    side = exported.with_name(exported.name + ".prefix.json")
    doc = json.loads(side.read_text())
    doc["chunks"][1] = base64.b64encode(bytes(32)).decode()
    side.write_text(json.dumps(doc))
    assert _verify_one(exported, [big_key]).ok  # the chunks are never what makes an export pass
    _edit_line(exported, 23, '"model":"local/demo"', '"model":"local/dema"')
    assert (
        _problem(exported, big_key)
        == f"records 1..{N} of this file were altered, deleted or reordered: {MISMATCH}"
    )


def test_a_missing_sidecar(exported: Path, big_key: signed_note.Verifier) -> None:
    exported.with_name(exported.name + ".prefix.json").unlink()
    assert _problem(exported, big_key).startswith(
        "cannot read the bundle (audit.jsonl with .checkpoint and .prefix.json)"
    )


# -- several nodes, several exports -----------------------------------------------------------------------


def test_exports_of_two_nodes(big: Home, big_key: signed_note.Verifier, tmp_path: Path) -> None:
    node_b = _home(tmp_path, 30, "node-b")
    key_b = _verifier(node_b)
    assert key_b.name != big_key.name
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _export(big, a, 200)
    _export(node_b, b, 1)
    reports = verify_exports([a, b], [big_key, key_b])
    assert [r.ok for r in reports] == [True, True], [r.problems for r in reports]
    assert [(r.origin, r.first_seq, r.last_seq) for r in reports] == [
        (big_key.name, 200, N),
        (key_b.name, 1, 30),
    ]
    assert reports[0].describe() == f"{a}: {big_key.name} records 200..{N}: ok"
    only_a = verify_exports([a, b], [big_key])
    assert only_a[0].ok and not only_a[1].ok
    assert only_a[1].problems[0].startswith("b.jsonl.checkpoint: signed by an unknown key")
    assert (
        only_a[1]
        .describe()
        .startswith(f"{b}: {key_b.name} records 1..30: FAILED: b.jsonl.checkpoint: signed")
    )


def test_overlapping_exports_of_one_ledger_agree(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    key = _verifier(home)
    first, second, third = tmp_path / "1.jsonl", tmp_path / "2.jsonl", tmp_path / "3.jsonl"
    _export(home, first, 1)
    _append(home, 25)
    _export(home, second, 30)
    _export(home, third, 41)  # starts right after the first one ends
    reports = verify_exports([first, second, third, first], [key])
    assert all(r.ok for r in reports), [r.problems for r in reports]


def test_two_histories_signed_by_one_key_are_caught(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    key = _verifier(home)
    fork = Home(tmp_path / "fork")
    shutil.copytree(home.root, fork.root)
    _append(home, 10, "a")
    _append(fork, 20, "b")
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    _export(home, a, 1)  # 1..50
    _export(fork, b, 30)  # 30..60 of the other history
    _export(fork, c, 51)  # 51..60: its prefix is the other history's first 50 records
    assert all(
        r.ok for r in verify_exports([a], [key]) + verify_exports([b], [key]) + verify_exports([c], [key])
    )
    ra, rb, rc = verify_exports([a, b, c], [key])
    assert ra.problems == [
        f"inconsistent with b.jsonl (also {key.name}): record 41 differs; the same key signed two different"
        " histories (keep both as evidence)",
        f"inconsistent with c.jsonl (also {key.name}): their trees of records 1..50 differ; the same key"
        " signed two different histories (keep both as evidence)",
    ]
    assert len(rb.problems) == 1 and rb.problems[0].startswith("inconsistent with a.jsonl")
    assert len(rc.problems) == 1 and rc.problems[0].startswith("inconsistent with a.jsonl")


# -- the follower -----------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Home:
    return _home(tmp_path, 5)


def _state(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(out.with_name(out.name + ".state").read_text())
    return result


def _assert_whole(home: Home, *files: Path) -> None:
    """Together the files hold every record once, in order, each line as stdout printed it."""
    lines = [line for path in files if path.exists() for line in _lines(path)]
    assert lines == _stored_lines(home)


def test_follower_catches_up_and_follows(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "out" / "audit.jsonl"
    out.parent.mkdir()
    follower = ExportFollower(small.vault_path, out)
    assert follower.poll_once() == 5
    assert follower.poll_once() == 0
    _append(small, 3)
    assert follower.poll_once() == 3
    _assert_whole(small, out)
    assert _state(out) == {"seq": 8, "origin": _verifier(small).name}
    assert out.stat().st_mode & 0o777 == 0o640
    follower.stop()


def test_follower_batches_are_bounded(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out, batch_lines=2)
    assert [follower.poll_once() for _ in range(4)] == [2, 2, 1, 0]
    _assert_whole(small, out)


def test_follower_resumes_without_duplicates(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    ExportFollower(small.vault_path, out).poll_once()
    _append(small, 4)
    restarted = ExportFollower(small.vault_path, out)
    assert restarted.poll_once() == 4
    assert _seqs(out) == list(range(1, 10))
    # a state file that fell behind (written after the batch's fsync, so a crash can leave it so)
    out.with_name(out.name + ".state").write_text('{"seq": 3, "origin": null}')
    _append(small, 1)
    assert ExportFollower(small.vault_path, out).poll_once() == 1
    _assert_whole(small, out)


def test_a_torn_last_line_is_cut_and_rewritten(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    ExportFollower(small.vault_path, out).poll_once()
    _append(small, 2)
    with out.open("a") as handle:
        handle.write(_stored_lines(small)[5][:37])  # a crash in the middle of writing line 6
    assert ExportFollower(small.vault_path, out).poll_once() == 2
    _assert_whole(small, out)


def test_rotation_by_rename(small: Home, tmp_path: Path) -> None:
    out, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    out.rename(rotated)
    _append(small, 3)
    assert follower.poll_once() == 3
    assert _seqs(rotated) == [1, 2, 3, 4, 5] and _seqs(out) == [6, 7, 8]
    _assert_whole(small, rotated, out)


def test_rotation_while_stopped_uses_the_state_file(small: Home, tmp_path: Path) -> None:
    out, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    follower.stop()
    out.rename(rotated)
    _append(small, 3)
    assert ExportFollower(small.vault_path, out).poll_once() == 3
    assert _seqs(out) == [6, 7, 8]
    _assert_whole(small, rotated, out)


def test_copytruncate(small: Home, tmp_path: Path) -> None:
    out, copied = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    shutil.copyfile(out, copied)
    os.truncate(out, 0)
    _append(small, 3)
    assert follower.poll_once() == 3
    assert b"\x00" not in out.read_bytes()  # appended at the new end, not at the old offset
    assert _seqs(out) == [6, 7, 8]
    _assert_whole(small, copied, out)


def test_an_unwritable_output_is_retried(
    small: Home, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    out = exports / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    exports.rename(tmp_path / "exports.old")  # rotated away with its directory...
    exports.write_text("")  # ...and the path cannot hold a file now
    _append(small, 3)
    with caplog.at_level(logging.ERROR, "phi.audit_export"):
        assert follower.poll_once() == 0
        assert follower.poll_once() == 0
    assert follower.last_error is not None and "NotADirectoryError" in follower.last_error
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1  # said once, not every poll
    exports.unlink()
    exports.mkdir()
    assert follower.poll_once() == 3
    assert follower.last_error is None
    _assert_whole(small, tmp_path / "exports.old" / "audit.jsonl", out)


def test_a_batch_that_fails_half_written_resumes_after_its_last_whole_line(
    small: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out)
    follower.poll_once()
    _append(small, 4)
    real_write = ExportFollower._write_all

    def disk_full(self: ExportFollower, fd: int, data: bytes) -> None:
        cut = data.index(b"\n") + 1 + 20  # one whole line, then part of the next
        os.write(fd, data[:cut])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ExportFollower, "_write_all", disk_full)
    assert follower.poll_once() == 0
    assert follower.last_error is not None and "No space left" in follower.last_error
    assert _seqs(out) == [1, 2, 3, 4, 5, 6]  # the torn line was cut at once
    monkeypatch.setattr(ExportFollower, "_write_all", real_write)
    assert follower.poll_once() == 3
    _assert_whole(small, out)


def test_start_at_the_end(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    assert ExportFollower(small.vault_path, out, start="end").poll_once() == 0
    assert _state(out)["seq"] == 5
    _append(small, 2)
    assert ExportFollower(small.vault_path, out, start="end").poll_once() == 2  # a restart keeps its place
    assert _seqs(out) == [6, 7]


def test_an_export_file_ahead_of_the_ledger_waits(
    small: Home, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "audit.jsonl"
    out.with_name(out.name + ".state").write_text('{"seq": 7, "origin": null}')
    follower = ExportFollower(small.vault_path, out)
    with caplog.at_level(logging.WARNING, "phi.audit_export"):
        assert follower.poll_once() == 0
    assert "is ahead of the ledger (record 7, the ledger ends at 5)" in caplog.text
    _append(small, 3)
    assert follower.poll_once() == 1
    assert _seqs(out) == [8]


def test_a_state_file_of_another_ledger_is_refused(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.with_name(out.name + ".state").write_text('{"seq": 2, "origin": "phi-gateway.elsewhere/node-z"}')
    follower = ExportFollower(small.vault_path, out)
    assert follower.poll_once() == 0
    assert (
        follower.last_error is not None
        and "belongs to the ledger of phi-gateway.elsewhere/node-z" in follower.last_error
    )
    assert out.read_text() == ""


def test_an_unreadable_ledger_is_retried(tmp_path: Path) -> None:
    home = Home(tmp_path / "later")
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(home.vault_path, out)
    assert follower.poll_once() == 0
    assert follower.last_error is not None and "OperationalError" in follower.last_error
    home.init(site="stmarys-main")
    assert follower.poll_once() == 1
    _assert_whole(home, out)


def test_follower_thread(small: Home, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    follower = ExportFollower(small.vault_path, out).start_thread(interval_s=0.01)
    _append(small, 3)
    deadline = time.monotonic() + 10
    while len(_seqs(out)) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    _append(small, 2)
    follower.stop()  # what is durable at stop is written before it returns
    _assert_whole(small, out)
    assert not [t for t in threading.enumerate() if t.name == "audit-export"]
