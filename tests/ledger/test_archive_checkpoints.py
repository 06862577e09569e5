"""A checkpoint an auditor kept goes on being checkable, and provable, after any number of archives.

The vault keeps every tile hash (one per 256 records) for good, bound to the latest archive's signed
checkpoint; a kept checkpoint of a size on a tile boundary is checked from the tiles alone, and one inside a
tile needs that tile's records, read back from the archive bundle that holds them (``--archive FILE``) and
believed only when they hash to the tile the vault kept. Real homes, real keys, the real CLI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner, Result

from appliance.cli import main
from appliance.home import Home
from tests.ledger.test_evidence import _append, _attack, _home


def _run(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _more(home: Home, count: int) -> None:
    with home.open_vault() as vault:
        asyncio.run(_append(vault.ledger, count))


def _archived_twice(tmp_path: Path) -> tuple[Home, Path, Path, list[Path]]:
    """A ledger whose auditor kept checkpoints of 256 and 300 records, then archived through 512 in two."""
    home = _home(tmp_path, 256)
    kept_256 = tmp_path / "kept-256.txt"
    _run("audit", "checkpoint", "--home", str(home.root), "--out", str(kept_256))
    _more(home, 44)
    kept_300 = tmp_path / "kept-300.txt"
    _run("audit", "checkpoint", "--home", str(home.root), "--out", str(kept_300))
    _more(home, 400)
    out = tmp_path / "archive"
    _run("audit", "archive", "--home", str(home.root), "--through", "256", "--out", str(out))
    _more(home, 10)
    _run("audit", "archive", "--home", str(home.root), "--through", "512", "--out", str(out))
    bundles = sorted(out.glob("*.jsonl"))
    assert len(bundles) == 2
    return home, kept_256, kept_300, bundles


def test_a_kept_checkpoint_is_checked_and_proved_across_archives(tmp_path: Path) -> None:
    home, kept_256, kept_300, (first, second) = _archived_twice(tmp_path)
    root = str(home.root)
    key = _run("audit", "key", "--home", root).output.strip()

    # On a tile boundary: the tiles the vault keeps are enough.
    assert "ok:" in _run("audit", "verify", "--home", root, "--checkpoint", str(kept_256)).output

    # Inside a tile: the records of that tile come from the bundle that holds them, which the message names.
    needs = _run("audit", "verify", "--home", root, "--checkpoint", str(kept_300), ok=False)
    assert needs.exit_code == 1
    assert "--archive" in needs.output and second.name in needs.output
    assert "--archive" in _run("audit", "verify", "--help").output  # the option the message names exists
    ok = _run("audit", "verify", "--home", root, "--checkpoint", str(kept_300), "--archive", str(second))
    assert "ok:" in ok.output and f"archive {second.name}: ok" in ok.output

    # The ledger today extends the one the auditor kept, proved across both archives.
    proof = tmp_path / "c.json"
    needs = _run("audit", "prove", "--home", root, "--from-size", "300", "--out", str(proof), ok=False)
    assert needs.exit_code == 1 and "--archive" in needs.output and second.name in needs.output
    assert "--archive" in _run("audit", "prove", "--help").output
    _run(
        "audit", "prove", "--home", root, "--from-size", "300", "--archive", str(second), "--out", str(proof)
    )
    out = _run("audit", "verify-proof", str(proof), "--key", key, "--checkpoint", str(kept_300)).output
    assert "extends the one of 300 records" in out

    # An archived record is in the tree the auditor kept.
    inclusion = tmp_path / "i.json"
    _run(
        "audit", "prove", "--home", root, "--record", "5", "--size", "300", "--archive", str(first),
        "--archive", str(second), "--out", str(inclusion),
    )  # fmt: skip
    out = _run("audit", "verify-proof", str(inclusion), "--key", key, "--checkpoint", str(kept_300)).output
    assert out.startswith("ok: record 5 is in")


def test_an_archive_bundle_that_is_not_this_vaults_is_refused(tmp_path: Path) -> None:
    home, _, kept_300, (_, second) = _archived_twice(tmp_path)
    root = str(home.root)
    lines = second.read_text().splitlines(keepends=True)
    lines[10] = lines[10].replace('"status_code":200', '"status_code":500')  # record 267, in tile 1
    altered = tmp_path / "altered.jsonl"
    altered.write_text("".join(lines))
    for suffix in (".checkpoint", ".prefix.json"):
        altered.with_name(altered.name + suffix).write_bytes(
            second.with_name(second.name + suffix).read_bytes()
        )
    bad = _run(
        "audit", "verify", "--home", root, "--checkpoint", str(kept_300), "--archive", str(altered), ok=False
    )
    assert bad.exit_code == 1 and "altered.jsonl" in bad.output and "FAILED" in bad.output
    proof = _run("audit", "prove", "--home", root, "--from-size", "300", "--archive", str(altered), ok=False)
    assert proof.exit_code == 1 and "do not give the tile the vault kept" in proof.output


def test_a_kept_checkpoint_of_another_history_fails_against_the_archive(tmp_path: Path) -> None:
    home, _, _, (_, second) = _archived_twice(tmp_path)
    from tests.cli.test_evidence_gaps import _forged

    forged = tmp_path / "forged.txt"
    forged.write_text(_forged(home, 300, b"\x03" * 32))
    bad = _run(
        "audit", "verify", "--home", str(home.root), "--checkpoint", str(forged), "--archive", str(second),
        ok=False,
    )  # fmt: skip
    assert bad.exit_code == 1 and "forged.txt" in bad.output and "archived records" in bad.output


def test_the_tiles_of_archived_records_are_checked_against_the_archive(tmp_path: Path) -> None:
    home = _home(tmp_path, 600)
    _run("audit", "archive", "--home", str(home.root), "--through", "512", "--out", str(tmp_path / "a"))
    assert "ok:" in _run("audit", "verify", "--home", str(home.root)).output
    _attack(home, "UPDATE ledger_tile SET hash = zeroblob(32) WHERE idx = 0")
    bad = _run("audit", "verify", "--home", str(home.root), ok=False)
    assert bad.exit_code == 1 and "tiles of the archived records" in bad.output


def test_verify_with_archives_checks_each_bundle_against_the_vault(tmp_path: Path) -> None:
    home, _, _, bundles = _archived_twice(tmp_path)
    other = _home(tmp_path, 600, name="other")
    _run("audit", "archive", "--home", str(other.root), "--through", "256", "--out", str(tmp_path / "b"))
    (foreign,) = (tmp_path / "b").glob("*.jsonl")
    ok = _run(
        "audit", "verify", "--home", str(home.root), *(a for b in bundles for a in ("--archive", str(b)))
    )
    assert ok.output.count(": ok") >= 2
    bad = _run("audit", "verify", "--home", str(home.root), "--archive", str(foreign), ok=False)
    assert bad.exit_code == 1 and foreign.name in bad.output
