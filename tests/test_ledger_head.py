"""The signed head: records cut from the end of the ledger, or the head itself, are reported."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from appliance import ledger
from appliance.ledger import Ledger
from appliance.ledger_head import HeadSigner
from appliance.policy import keys as policy_keys
from appliance.vault.db import Database


@pytest.fixture
def signer(tmp_path: Path) -> HeadSigner:
    policy_keys.generate(tmp_path / "appliance")
    return HeadSigner(policy_keys.load_signing_key(tmp_path / "appliance.key"), interval_s=3600)


def _filled(path: Path, signer: HeadSigner, n: int) -> None:
    async def append_all(led: Ledger) -> None:
        for i in range(n):
            await led.append({"type": "request", "request_id": f"r{i}"})

    db = Database(path, ledger.MIGRATIONS).start()
    led = Ledger(db, None, signer=signer)
    asyncio.run(append_all(led))
    led.seal_head()
    db.close()


def _verify(path: Path, signer: HeadSigner) -> ledger.VerifyReport:
    with Database(path, ledger.MIGRATIONS) as db:
        return Ledger(db, None, signer=signer).verify()


def _attack(path: Path, *sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS ledger_append_only_delete")
    for statement in sql:
        conn.execute(statement)
    conn.close()


def test_sealed_ledger_verifies_and_the_first_signature_comes_at_once(
    tmp_path: Path, signer: HeadSigner
) -> None:
    _filled(tmp_path / "v.db", signer, 20)
    report = _verify(tmp_path / "v.db", signer)
    assert report.ok and report.records == 20


def test_records_cut_from_the_end_are_reported(tmp_path: Path, signer: HeadSigner) -> None:
    _filled(tmp_path / "v.db", signer, 20)
    _attack(tmp_path / "v.db", "DELETE FROM ledger WHERE seq > 15")
    report = _verify(tmp_path / "v.db", signer)
    assert not report.ok and report.first_bad_seq == 16
    assert report.message.startswith("records 16 to 20 are missing (deleted from the end")


def test_an_emptied_ledger_is_reported(tmp_path: Path, signer: HeadSigner) -> None:
    _filled(tmp_path / "v.db", signer, 5)
    _attack(tmp_path / "v.db", "DELETE FROM ledger")
    assert "records 1 to 5 are missing" in _verify(tmp_path / "v.db", signer).message


def test_a_deleted_head_is_reported(tmp_path: Path, signer: HeadSigner) -> None:
    _filled(tmp_path / "v.db", signer, 5)
    _attack(tmp_path / "v.db", "DELETE FROM ledger WHERE seq > 3", "DELETE FROM ledger_head")
    report = _verify(tmp_path / "v.db", signer)
    assert not report.ok and "no signed head" in report.message


def test_a_head_moved_back_without_the_key_is_reported(tmp_path: Path, signer: HeadSigner) -> None:
    _filled(tmp_path / "v.db", signer, 5)
    _attack(
        tmp_path / "v.db",
        "DELETE FROM ledger WHERE seq > 3",
        "UPDATE ledger_head SET seq = 3, hash = (SELECT hash FROM ledger WHERE seq = 3)",
    )
    report = _verify(tmp_path / "v.db", signer)
    assert not report.ok and "signature does not verify" in report.message


def test_a_head_signed_by_another_key_is_reported(tmp_path: Path, signer: HeadSigner) -> None:
    _filled(tmp_path / "v.db", signer, 5)
    policy_keys.generate(tmp_path / "other")
    other = HeadSigner(policy_keys.load_signing_key(tmp_path / "other.key"), interval_s=0)
    with Database(tmp_path / "v.db", ledger.MIGRATIONS) as db:
        Ledger(db, None, signer=other).append_sync({"type": "admin", "detail": "forged"})
    report = _verify(tmp_path / "v.db", signer)
    assert not report.ok and "signature does not verify" in report.message
