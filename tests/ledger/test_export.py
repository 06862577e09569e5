"""Audit exports: plain JSON lines, and the signed bundles an auditor checks without the ledger.

Real homes (real Ed25519 appliance keys), real SQLite files, real files for the exports. Tampered bundles
are in test_export_verify.py, the continuous export in test_follow.py.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from appliance.errors import OperatorError
from appliance.home import Home
from appliance.ledger import signed_note
from appliance.ledger.export import export_range, first_seq_since, since_timestamp
from tests.ledger._exports import (
    N,
    _export,
    _gather,
    _home,
    _lines,
    _record,
    _stored_lines,
    _verify_one,
)

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
