"""The ledger as evidence: its Merkle tree, signed checkpoints, proofs, and what `audit verify` catches.

Real homes (real Ed25519 appliance keys), real SQLite files; the attacker is a plain sqlite3 connection
with the append-only triggers dropped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from appliance import signing_keys, timestamps
from appliance.cli import main
from appliance.home import Home
from appliance.ledger import merkle, proofs, signed_note
from appliance.ledger.store import Ledger
from appliance.ledger.tiles import TILE_LEAVES, SubtreeReader, TreeState


def _run(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _record(i: int, tag: str = "") -> dict[str, Any]:
    return {
        "type": "response",
        "claw_id": "bot",
        "model": "local/demo",
        "status_code": 200,
        "request_id": f"{tag}r{i}",
    }


def _home(tmp_path: Path, n: int, name: str = "home") -> Home:
    """A home whose ledger holds ``n`` records (init writes record 1)."""
    home = Home(tmp_path / name)
    home.init(site="stmarys-main")
    if n > 1:
        with home.open_vault() as vault:
            asyncio.run(_append(vault.ledger, n - 1))
    return home


async def _append(ledger: Ledger, count: int) -> None:
    tag = secrets.token_hex(4)  # request ids are unique: a request is in one node's ledger only
    await asyncio.gather(*(ledger.append(_record(i, tag)) for i in range(count)))


def _verify(home: Home, **kwargs: Any) -> Any:
    with home.open_vault() as vault:
        return vault.ledger.verify(**kwargs)


def _attack(home: Home, *sql: str) -> None:
    conn = sqlite3.connect(home.vault_path, isolation_level=None)
    for trigger in (
        "ledger_append_only_update",
        "ledger_append_only_delete",
        "ledger_tile_append_only_update",
        "ledger_tile_append_only_delete",
        "ledger_checkpoint_append_only_update",
        "ledger_checkpoint_append_only_delete",
    ):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for statement in sql:
        conn.execute(statement)
    conn.close()


def _records(home: Home) -> list[str]:
    conn = sqlite3.connect(home.vault_path)
    try:
        return [row[0] for row in conn.execute("SELECT record FROM ledger ORDER BY seq")]
    finally:
        conn.close()


def _rechain(home: Home, texts: list[str]) -> None:
    """What a careful attacker does: rewrite records, recompute the hash chain and the tiles."""
    from appliance.ledger.chain import GENESIS, chain_hash

    conn = sqlite3.connect(home.vault_path, isolation_level=None)
    for trigger in (
        "ledger_append_only_update",
        "ledger_append_only_delete",
        "ledger_tile_append_only_delete",
    ):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    prev = GENESIS
    conn.execute("BEGIN")
    for seq, text in enumerate(texts, start=1):
        digest = chain_hash(prev, text)
        conn.execute(
            "UPDATE ledger SET record = ?, prev_hash = ?, hash = ? WHERE seq = ?", (text, prev, digest, seq)
        )
        prev = digest
    conn.execute("DELETE FROM ledger_tile")
    leaves = [merkle.leaf_hash(t.encode()) for t in texts]
    for idx in range(len(texts) // TILE_LEAVES):
        conn.execute(
            "INSERT INTO ledger_tile VALUES (?, ?)", (idx, merkle.mth(leaves[idx * 256 : idx * 256 + 256]))
        )
    conn.execute("COMMIT")
    conn.close()


# -- the tree as stored ----------------------------------------------------------------------------------


def test_the_signed_root_is_the_rfc_root_of_the_stored_records(tmp_path: Path) -> None:
    home = _home(tmp_path, 600)
    texts = _records(home)
    with home.open_vault() as vault:
        note = vault.ledger.checkpoint("manual")
        verifier = vault.ledger.verifier()
    cp = signed_note.open_note(note, [verifier])
    assert cp.size == 600 and cp.root == merkle.mth([merkle.leaf_hash(t.encode()) for t in texts])
    assert cp.origin.startswith("phi-gateway.stmarys-main/")
    conn = sqlite3.connect(home.vault_path)
    assert conn.execute("SELECT COUNT(*) FROM ledger_tile").fetchone()[0] == 2
    state = TreeState.load(conn)
    assert state.size == 600 and state.root() == cp.root and len(state.partial) == 600 - 512


def test_inclusion_and_consistency_proofs_for_every_size_up_to_64(tmp_path: Path) -> None:
    home = _home(tmp_path, 64)
    leaves = [merkle.leaf_hash(t.encode()) for t in _records(home)]
    conn = sqlite3.connect(home.vault_path)
    for size in range(1, 65):
        root = merkle.mth(leaves[:size])  # the straightforward recomputation
        reader = SubtreeReader(conn, size)
        for index in range(size):
            path = merkle.inclusion_path(index, size, reader.subtree)
            assert path == merkle.inclusion_path(index, size, merkle.subtree_of(leaves[:size]))
            merkle.verify_inclusion(index, size, leaves[index], path, root)
        for old in range(1, size + 1):
            proof = merkle.consistency_path(old, size, reader.subtree)
            merkle.verify_consistency(old, size, merkle.mth(leaves[:old]), root, proof)


def test_proofs_across_tiles_use_stored_tiles(tmp_path: Path) -> None:
    home = _home(tmp_path, 1100)
    leaves = [merkle.leaf_hash(t.encode()) for t in _records(home)]
    conn = sqlite3.connect(home.vault_path)
    for size in (256, 257, 511, 512, 1024, 1100):
        reader = SubtreeReader(conn, size)
        for index in sorted({0, 255, min(256, size - 1), size // 2, size - 1}):
            path = merkle.inclusion_path(index, size, reader.subtree)
            merkle.verify_inclusion(index, size, leaves[index], path, merkle.mth(leaves[:size]))


def test_a_ledger_from_before_the_tree_is_upgraded_and_verifies(tmp_path: Path) -> None:
    """A vault written by the previous release: no tiles, a v1 head, no checkpoints."""
    home = _home(tmp_path, 300)
    _attack(
        home,
        "DROP TABLE ledger_tile",
        "DROP TABLE ledger_checkpoint",
        "DROP TABLE ledger_meta",
        "DROP TABLE ledger_head",
        "CREATE TABLE ledger_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL,"
        " hash TEXT NOT NULL, signed_at TEXT NOT NULL, keyid TEXT NOT NULL, sig TEXT NOT NULL)",
        "DELETE FROM _migrations WHERE name IN ('ledger-0004-merkle-tiles', 'ledger-0005-checkpoints')",
    )
    report = _verify(home)
    assert report.ok and report.records == 300 and report.checkpoints == 1, report.message
    conn = sqlite3.connect(home.vault_path)
    assert conn.execute("SELECT COUNT(*) FROM ledger_tile").fetchone()[0] == 1


# -- tampering, each with its message --------------------------------------------------------------------


def test_an_intact_ledger_verifies_with_every_checkpoint(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    with home.open_vault() as vault:
        vault.ledger.checkpoint("manual")
        asyncio.run(_append(vault.ledger, 5))
    report = _verify(home)
    assert report.ok and report.records == 305 and report.checkpoints >= 2, report.message
    assert _run("audit", "verify", "--home", str(home.root)).output.startswith("ok: 305 records")


def test_a_bit_flip_in_a_record_names_it(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    _attack(
        home,
        "UPDATE ledger SET record = replace(record, '\"status_code\":200', '\"status_code\":201')"
        " WHERE seq = 17",
    )
    report = _verify(home)
    assert not report.ok and report.first_bad_seq == 17
    assert report.message == "record 17: content does not match its hash (edited)"


def test_a_deleted_record_is_named(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    _attack(home, "DELETE FROM ledger WHERE seq = 23")
    report = _verify(home)
    assert not report.ok and report.first_bad_seq == 23 and report.message == "record 23 is missing (deleted)"


def test_reordered_records_are_named(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    _attack(
        home,
        "UPDATE ledger SET seq = -1 WHERE seq = 10",
        "UPDATE ledger SET seq = 10 WHERE seq = 11",
        "UPDATE ledger SET seq = 11 WHERE seq = -1",
    )
    report = _verify(home)
    assert not report.ok and report.first_bad_seq == 10
    assert report.message == "record 10 does not chain to record 9"


def test_a_truncated_tail_is_reported_from_the_signed_head(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    _attack(home, "DELETE FROM ledger WHERE seq > 31")
    report = _verify(home)
    assert not report.ok and report.first_bad_seq == 32
    assert report.message.startswith("records 32 to 40 are missing (deleted from the end; the signed head")


def test_a_truncation_stays_visible_after_new_records(tmp_path: Path) -> None:
    home = _home(tmp_path, 40)
    _attack(home, "DELETE FROM ledger WHERE seq > 31")
    with home.open_vault() as vault:  # the writer finds the cut, keeps the old head in the history
        asyncio.run(_append(vault.ledger, 20))
    report = _verify(home)
    assert not report.ok and "no longer has the root that checkpoint" in report.message
    assert "(size 40," in report.message  # the head that named 40 records, kept when the cut was found


def test_a_deleted_head_is_reported(tmp_path: Path) -> None:
    from appliance.ledger.verify import verify_database

    home = _home(tmp_path, 10)
    with home.open_vault() as vault:
        verifier = vault.ledger.verifier()
    _attack(
        home, "DELETE FROM ledger WHERE seq > 8", "DELETE FROM ledger_head", "DELETE FROM ledger_checkpoint"
    )
    # Checked as it lies on disk (opening the vault would sign a new head; checkpoints kept elsewhere are
    # what catch a key holder who does that).
    report = verify_database(sqlite3.connect(home.vault_path), [verifier])
    assert not report.ok and "no signed head" in report.message


def test_a_rewritten_chain_is_caught_by_the_checkpoints(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    with home.open_vault() as vault:
        vault.ledger.checkpoint("manual")
    texts = _records(home)
    texts[99] = texts[99].replace('"status_code":200', '"status_code":500')
    _rechain(home, texts)
    report = _verify(home)
    assert not report.ok and report.first_bad_seq == 1
    assert report.message.startswith("records 1 to 300: the tree no longer has the root that")


def test_an_edited_tile_is_named(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    _attack(home, "UPDATE ledger_tile SET hash = zeroblob(32) WHERE idx = 0")
    report = _verify(home)
    assert not report.ok and report.message == "tile 0 (records 1 to 256) does not match its records"


def test_a_forged_checkpoint_signature_is_reported(tmp_path: Path) -> None:
    home = _home(tmp_path, 10)
    with home.open_vault() as vault:
        note = vault.ledger.checkpoint("manual")
    body, sig = note.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(sig))
    raw[10] ^= 1
    forged = body + " " + base64.b64encode(bytes(raw)).decode() + "\n"
    _attack(
        home,
        f"UPDATE ledger_checkpoint SET note = '{forged}' WHERE id = (SELECT MAX(id) FROM ledger_checkpoint)",
    )
    report = _verify(home)
    assert not report.ok and report.message.startswith("checkpoint #")
    assert "signature does not verify" in report.message


def test_a_checkpoint_from_a_different_key_is_reported(tmp_path: Path) -> None:
    home = _home(tmp_path, 10)
    other = _home(tmp_path, 10, name="other")
    with other.open_vault() as vault:
        foreign = vault.ledger.checkpoint("manual")
    _attack(home, f"UPDATE ledger_head SET note = '{foreign}'")
    report = _verify(home)
    assert not report.ok and report.message.startswith("the signed head")
    assert "unknown key" in report.message or "another ledger" in report.message


def test_a_checkpoint_kept_off_the_appliance_catches_a_resigned_rewrite(tmp_path: Path) -> None:
    """The key holder rewrites history and re-signs everything; only the auditor's copy shows it."""
    home = _home(tmp_path, 50)
    with home.open_vault() as vault:
        kept = vault.ledger.checkpoint("manual")
    (tmp_path / "kept.txt").write_text(kept)
    texts = _records(home)
    texts[20] = texts[20].replace('"status_code":200', '"status_code":403')
    _rechain(home, texts)
    _attack(home, "DELETE FROM ledger_checkpoint", "DELETE FROM ledger_head")
    with home.open_vault() as vault:  # re-signs a head over the rewritten ledger
        vault.ledger.checkpoint("manual")
    assert _verify(home).ok  # on its own, a consistently re-signed ledger looks fine...
    result = _run(
        "audit", "verify", "--home", str(home.root), "--checkpoint", str(tmp_path / "kept.txt"), ok=False
    )
    assert result.exit_code == 1 and "kept checkpoint kept.txt" in result.output  # ...the kept copy does not


# -- proofs through the CLI, checked without the ledger --------------------------------------------------


def test_prove_and_verify_proof_without_the_ledger(tmp_path: Path) -> None:
    home = _home(tmp_path, 700)
    key = _run("audit", "key", "--home", str(home.root)).output.strip()
    kept = tmp_path / "kept.txt"
    _run("audit", "checkpoint", "--home", str(home.root), "--out", str(kept))
    proof = tmp_path / "proof.json"
    _run("audit", "prove", "--home", str(home.root), "--record", "333", "--out", str(proof))
    out = _run("audit", "verify-proof", str(proof), "--key", key).output
    assert out.startswith("ok: record 333 is in phi-gateway.stmarys-main/")
    doc = json.loads(proof.read_text())
    assert len(doc["path"]) == 10 and doc["tree_size"] == 700

    # Against the checkpoint the auditor kept, after more records came: prove at its size.
    with home.open_vault() as vault:
        asyncio.run(_append(vault.ledger, 50))
    size = signed_note.parse_unverified(kept.read_text()).size
    _run(
        "audit", "prove", "--home", str(home.root), "--record", "5", "--size", str(size), "--out", str(proof)
    )
    assert _run(
        "audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(kept)
    ).output.startswith("ok:")

    # Consistency: the ledger now extends the one the auditor kept.
    consistency = tmp_path / "consistency.json"
    _run("audit", "prove", "--home", str(home.root), "--from-size", str(size), "--out", str(consistency))
    out = _run("audit", "verify-proof", str(consistency), "--key", key, "--checkpoint", str(kept)).output
    assert "extends the one of 700 records" in out

    # A proof edited to claim another record fails.
    doc = json.loads(proof.read_text())
    doc["entry"] = doc["entry"].replace('"status_code":200', '"status_code":404')
    proof.write_text(json.dumps(doc))
    bad = _run("audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(kept), ok=False)
    assert bad.exit_code == 1 and "inclusion root mismatch" in bad.output


def test_verify_proof_refuses_another_appliances_key(tmp_path: Path) -> None:
    home = _home(tmp_path, 20)
    signing_keys.generate(tmp_path / "stranger")
    stranger = signing_keys.load_signing_key(tmp_path / "stranger.key")
    with home.open_vault() as vault:
        origin = vault.ledger.verifier().name
    wrong_key = signed_note.Verifier.from_key(origin, stranger.public).encode()
    proof = tmp_path / "proof.json"
    _run("audit", "prove", "--home", str(home.root), "--record", "3", "--out", str(proof))
    bad = _run("audit", "verify-proof", str(proof), "--key", wrong_key, ok=False)
    assert bad.exit_code == 1 and "signed by an unknown key" in bad.output


def test_entry_of_an_exported_line() -> None:
    assert proofs.entry_of_line('{"ts":"x","a":1,"seq":42}\n') == (42, '{"ts":"x","a":1}')
    with pytest.raises(proofs.ProofRejected):
        proofs.entry_of_line('{"ts":"x"}')


# -- when checkpoints are signed -------------------------------------------------------------------------


def test_policy_import_and_shutdown_store_checkpoints(tmp_path: Path) -> None:
    from tests.cli.test_cli import _bundle, _setup

    home_dir, author = _setup(tmp_path)
    _run("policy", "import", str(_bundle(tmp_path, author)), "--home", str(home_dir))
    conn = sqlite3.connect(home_dir / "vault.db")
    reasons = [row[0] for row in conn.execute("SELECT reason FROM ledger_checkpoint ORDER BY id")]
    size = conn.execute("SELECT size FROM ledger_checkpoint WHERE reason = 'policy-import'").fetchone()[0]
    last = conn.execute("SELECT MAX(seq) FROM ledger").fetchone()[0]
    assert "policy-import" in reasons and size == last  # the import's own record is covered
    listing = _run("audit", "checkpoints", "--home", str(home_dir)).output
    assert "policy-import" in listing


# -- what a review found: each case that once passed verify or broke the writer ---------------------------


def test_a_cut_the_writer_ran_over_is_named_as_a_cut(tmp_path: Path) -> None:
    home = _home(tmp_path, 20)
    _attack(home, "DELETE FROM ledger WHERE seq > 15")
    with home.open_vault() as vault:
        vault.ledger.checkpoint("manual")  # written on top of the cut: the old head goes to the history
    report = _verify(home)
    assert not report.ok and report.first_bad_seq == 16
    assert report.message.startswith(
        "records (at least 16 to 20) were cut from the end and the ledger written on"
    )


def test_verify_signs_nothing_so_it_cannot_cover_a_cut(tmp_path: Path) -> None:
    home = _home(tmp_path, 20)
    _attack(
        home, "DELETE FROM ledger WHERE seq > 12", "DELETE FROM ledger_head", "DELETE FROM ledger_checkpoint"
    )
    for _ in range(2):  # and not on a second run either
        result = _run("audit", "verify", "--home", str(home.root), ok=False)
        assert result.exit_code == 1 and "no signed head" in result.output


def test_a_clock_stepping_back_is_not_a_reordered_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home(tmp_path, 5)
    with home.open_vault() as vault:
        vault.ledger.checkpoint("manual")
        monkeypatch.setattr(timestamps, "now", lambda: "2020-01-01T00:00:00.000Z")
        asyncio.run(_append(vault.ledger, 1))
        vault.ledger.checkpoint("manual")
    monkeypatch.undo()
    report = _verify(home)
    assert report.ok, report.message


def test_records_cut_below_a_stored_tile_make_the_writer_refuse(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    _attack(home, "DELETE FROM ledger WHERE seq > 250", "DELETE FROM ledger_head")
    from appliance.errors import LedgerUnavailable

    with home.open_vault() as vault:
        with pytest.raises(LedgerUnavailable, match="the ledger was cut"):
            asyncio.run(_append(vault.ledger, 10))  # tile 0 exists for records the file lost: fail closed
    report = _verify(home)
    assert not report.ok


def test_a_forged_archive_row_is_reported(tmp_path: Path) -> None:
    home = _home(tmp_path, 300)
    with home.open_vault() as vault:
        vault.ledger.checkpoint("manual")
    conn = sqlite3.connect(home.vault_path, isolation_level=None)
    (note,) = conn.execute("SELECT note FROM ledger_checkpoint ORDER BY id DESC LIMIT 1").fetchone()
    from appliance.ledger.archive import encode_frontier
    from appliance.ledger.tiles import tile_frontier

    chain = conn.execute("SELECT hash FROM ledger WHERE seq = 256").fetchone()[0]
    conn.execute(
        "INSERT INTO ledger_archive (first_seq, last_seq, chain, frontier, note, file, sha256, archived_at)"
        " VALUES (1, 256, ?, ?, ?, 'none', '', '')",
        (chain, encode_frontier(tile_frontier(conn, 256)), note),
    )
    conn.execute("DELETE FROM ledger WHERE seq <= 256")
    conn.close()
    report = _verify(home)
    assert not report.ok and "forged archive row" in report.message


def test_a_kept_checkpoint_the_proof_does_not_use_is_refused(tmp_path: Path) -> None:
    home = _home(tmp_path, 50)
    key = _run("audit", "key", "--home", str(home.root)).output.strip()
    kept = tmp_path / "kept.txt"
    _run("audit", "checkpoint", "--home", str(home.root), "--out", str(kept))
    with home.open_vault() as vault:
        asyncio.run(_append(vault.ledger, 7))
    proof = tmp_path / "p.json"
    _run("audit", "prove", "--home", str(home.root), "--record", "20", "--out", str(proof))  # at 57, not 50
    bad = _run("audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(kept), ok=False)
    assert bad.exit_code == 1 and "--size 50" in bad.output
