"""`audit export`, `audit archive` and `audit verify FILE…` as an operator and an auditor run them, and the
gateway's continuous export (``[audit] export_file``) under real traffic."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import openai
import pytest

from appliance.home import Home
from tests.cli.test_cli import _run
from tests.ledger.test_evidence import _append, _home
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc


def _key(home: Home) -> str:
    return _run("audit", "key", "--home", str(home.root)).output.strip()


def test_export_to_stdout_is_the_stdout_line_shape(tmp_path: Path) -> None:
    home = _home(tmp_path, 30)
    lines = _run("audit", "export", "--home", str(home.root), "--since-seq", "25").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [25, 26, 27, 28, 29, 30]
    first = json.loads(lines[0])
    assert list(first)[:10] == [
        "ts", "claw_id", "type", "model", "latency_ms", "status_code", "tokens_in", "tokens_out", "cost_usd",
        "intervention",
    ]  # fmt: skip
    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_time = _run("audit", "export", "--home", str(home.root), "--since", today).stdout.splitlines()
    assert len(by_time) == 30


def test_an_export_bundle_verifies_off_the_appliance_and_tampering_shows(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    key = _key(home)
    out = tmp_path / "siem" / "audit-2026-11.jsonl"
    out.parent.mkdir()
    _run("audit", "export", "--home", str(home.root), "--since-seq", "100", "--out", str(out))
    assert out.with_name(out.name + ".checkpoint").exists()
    ok = _run("audit", "verify", str(out), "--key", key).output
    assert "ok" in ok.lower() and "100" in ok

    lines = out.read_text().splitlines(keepends=True)
    lines[50] = lines[50].replace('"status_code":200', '"status_code":201')
    out.write_text("".join(lines))
    bad = _run("audit", "verify", str(out), "--key", key, ok=False)
    assert (
        bad.exit_code == 1 and "FAILED" in bad.output and "does not match the signed checkpoint" in bad.output
    )


def test_exports_of_two_nodes_are_verified_together(tmp_path: Path) -> None:
    nodes = [_home(tmp_path, 40, name="node-a"), _home(tmp_path, 60, name="node-b")]
    keys, files = [], []
    for home in nodes:
        keys.append(_key(home))
        out = tmp_path / f"{home.root.name}.jsonl"
        _run("audit", "export", "--home", str(home.root), "--out", str(out))
        files.append(str(out))
    assert keys[0].split("+")[0] != keys[1].split("+")[0]  # each node's ledger has its own origin
    both = _run("audit", "verify", *files, "--key", keys[0], "--key", keys[1]).output
    assert both.count("ok") >= 2
    one = _run("audit", "verify", *files, "--key", keys[0], ok=False)
    assert one.exit_code == 1 and "unknown key" in one.output


def test_archive_keeps_verification_whole(tmp_path: Path) -> None:
    home = _home(tmp_path, 700)
    key = _key(home)
    archive_dir = tmp_path / "archive"
    bad = _run(
        "audit", "archive", "--home", str(home.root), "--through", "300", "--out", str(archive_dir), ok=False
    )
    assert "multiple of 256" in bad.output
    out = _run(
        "audit", "archive", "--home", str(home.root), "--through", "256", "--out", str(archive_dir)
    ).output
    assert "records 1 to 256 archived" in out and "256 removed" in out
    with home.open_vault() as vault:
        asyncio.run(_append(vault.ledger, 100))
    _run("audit", "archive", "--home", str(home.root), "--through", "512", "--out", str(archive_dir))

    verified = _run("audit", "verify", "--home", str(home.root)).output
    assert "records 1 to 512 are in 2 archive(s)" in verified
    bundles = sorted(str(p) for p in archive_dir.glob("*.jsonl"))
    assert len(bundles) == 2
    assert _run("audit", "verify", *bundles, "--key", key).output.count("ok") >= 2

    conn = sqlite3.connect(home.vault_path)
    # 700 records, 100 more, and each archive's own admin record
    assert conn.execute("SELECT MIN(seq), MAX(seq) FROM ledger").fetchone() == (513, 802)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM ledger WHERE seq = 600")  # only archived records may go
    conn.close()

    # Proofs for records still in the vault work across the archived part.
    proof = tmp_path / "proof.json"
    _run("audit", "prove", "--home", str(home.root), "--record", "600", "--out", str(proof))
    assert _run("audit", "verify-proof", str(proof), "--key", key).output.startswith("ok: record 600")


def test_an_altered_archive_row_is_reported(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    _run("audit", "archive", "--home", str(home.root), "--through", "256", "--out", str(tmp_path / "a"))
    conn = sqlite3.connect(home.vault_path, isolation_level=None)
    conn.execute("DROP TRIGGER ledger_archive_append_only_update")
    conn.execute("UPDATE ledger_archive SET chain = ?", ("f" * 64,))
    conn.close()
    bad = _run("audit", "verify", "--home", str(home.root), ok=False)
    assert "record 257 does not chain to the archived record 256" in bad.output


def test_the_gateway_appends_every_record_to_the_export_file(tmp_path: Path, upstream: FakeUpstream) -> None:
    harness = GatewayHarness(tmp_path)
    settings_file = harness.home.root / "gateway.toml"
    settings_file.write_text(settings_file.read_text() + '\n[audit]\nexport_file = "export/audit.jsonl"\n')
    harness.import_policy(policy_doc(upstream.base_url))
    harness.set_provider_keys()
    token = harness.issue("radiology-bot")
    harness.start()
    try:
        with openai.OpenAI(base_url=harness.base_url, api_key=token, max_retries=0, timeout=10) as client:
            for i in range(5):
                client.chat.completions.create(
                    model="openai/gpt-4o-mini", messages=[{"role": "user", "content": f"hello {i}"}]
                )
    finally:
        harness.stop()
    exported = (harness.home.root / "export" / "audit.jsonl").read_text().splitlines()
    seqs = [json.loads(line)["seq"] for line in exported]
    stored = [row for row in harness.ledger_rows()]
    assert seqs == list(range(1, len(stored) + 1))  # every record, once, in order, shutdown ones included
    assert sum(1 for line in exported if json.loads(line)["type"] == "response") == 5


def test_records_a_log_shipper_took_cannot_be_cut_unseen(tmp_path: Path) -> None:
    home = _home(tmp_path, 30)
    settings_file = home.root / "gateway.toml"
    settings_file.write_text(settings_file.read_text() + '\n[audit]\nexport_file = "audit.jsonl"\n')
    from appliance.ledger.follow import ExportFollower

    ExportFollower(home.vault_path, home.root / "audit.jsonl").poll_once()
    # A key holder cuts the end and re-signs: the ledger alone looks whole...
    conn = sqlite3.connect(home.vault_path, isolation_level=None)
    for trigger in ("ledger_append_only_delete", "ledger_checkpoint_append_only_delete"):
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.executescript(
        "DELETE FROM ledger WHERE seq > 25; DELETE FROM ledger_head; DELETE FROM ledger_checkpoint;"
    )
    conn.close()
    with home.open_vault() as vault:
        vault.ledger.checkpoint("manual")
    # ...but the continuous export has seen more.
    bad = _run("audit", "verify", "--home", str(home.root), ok=False)
    assert "records 26 to 30 were exported" in bad.output
