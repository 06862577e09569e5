"""Export bundles checked without the ledger: every kind of tampering named, several nodes and exports.

Real homes (real Ed25519 appliance keys), real SQLite files, real files for the exports.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from appliance import signing_keys
from appliance.home import Home
from appliance.ledger import signed_note
from appliance.ledger.export_verify import verify_exports
from tests.ledger._exports import N, _append, _export, _home, _lines, _verifier, _verify_one

# -- tampered bundles -------------------------------------------------------------------------------------


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
