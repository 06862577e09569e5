"""An upgrade: a home written by an older release (commit cab96d1, before the Merkle tiles, checkpoints
and archives existed; made by ``make_old_home``) served by this version. Its vault, keys, tokens, policy and
ledger are kept, the migrations run, the old token still works, and ``audit verify`` passes over the old
records and the new ones: what a newer image, OVA or installer does when started on an existing home."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import openai

from local_models.tiny import write_tiny_model
from tests.support.subprocess_gateway import GatewayProcess, cli

OLD_HOME = Path(__file__).parent / "data" / "home-cab96d1.tar.gz"


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _migrations(vault: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{vault}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    finally:
        conn.close()


def _rows(vault: Path, upto: int) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{vault}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT * FROM ledger WHERE seq <= ? ORDER BY seq", (upto,)).fetchall()
    finally:
        conn.close()


def _records(vault: Path) -> int:
    conn = sqlite3.connect(f"file:{vault}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])
    finally:
        conn.close()


def test_a_home_of_an_older_release_is_served_and_verifies(tmp_path: Path) -> None:
    with tarfile.open(OLD_HOME) as tar:
        tar.extractall(tmp_path, filter="data")
    home = tmp_path / "home"
    meta = json.loads((home / "meta.json").read_text())
    (home / "meta.json").unlink()
    assert write_tiny_model(home / "models" / "demo.gguf", size="tiny") == meta["model_sha256"]
    before = _migrations(home / "vault.db")
    old_records = _records(home / "vault.db")
    assert "ledger-0004-merkle-tiles" not in before and old_records > 5
    old_rows = _rows(home / "vault.db", old_records)

    gateway = GatewayProcess(home, tmp_path)
    gateway.start()
    try:
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=meta["token"], max_retries=0, timeout=60
        ) as client:
            reply = client.chat.completions.create(
                model="local/demo", messages=[{"role": "user", "content": "after the upgrade"}], max_tokens=4
            )
        assert reply.choices[0].message.content is not None
    finally:
        gateway.stop()

    after = _migrations(home / "vault.db")
    assert set(before) < set(after)
    assert {"ledger-0004-merkle-tiles", "ledger-0005-checkpoints", "ledger-0006-archive"} <= set(after)
    assert _records(home / "vault.db") > old_records
    assert _rows(home / "vault.db", old_records) == old_rows  # the old records, hashes included, untouched
    verified = _ok(cli(home, "audit", "verify"))
    assert verified.startswith("ok") and "hash chain and Merkle tree intact" in verified
    assert "ward-app" in _ok(cli(home, "token", "list"))
    assert "openai" in _ok(cli(home, "keys", "list"))
    assert '"version": 3' in _ok(cli(home, "policy", "show")) or "version 3" in _ok(
        cli(home, "policy", "show")
    )
    # The old records are the ledger's first ones, unchanged: an export from record 1 verifies off the box.
    out = tmp_path / "all.jsonl"
    _ok(cli(home, "audit", "export", "--out", str(out)))
    key = _ok(cli(home, "audit", "key")).strip()
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["seq"] == 1 and len(lines) == _records(home / "vault.db")
    verify_export = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "verify", str(out), "--key", key],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert verify_export.returncode == 0, verify_export.stdout + verify_export.stderr
