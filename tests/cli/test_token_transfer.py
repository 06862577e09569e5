"""`token export` / `token import` between the nodes of a site, against hostile or stale files: a bad
time is refused before anything changes, an expired token is never revived, an org/role the policy lacks
is refused, and every change is an admin record written in the change's own transaction."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.cli.test_cli import _run, _setup
from tests.support.gateway import policy_doc


def _home_with_policy(tmp_path: Path) -> Path:
    home, author = _setup(tmp_path)
    doc = policy_doc("http://127.0.0.1:9", scope={"sites": ["stmarys-main"]})
    (tmp_path / "p.json").write_text(json.dumps(doc))
    _run("policy", "sign", str(tmp_path / "p.json"), "--key", f"{author}.key", "--out", str(tmp_path / "b"))
    _run("policy", "import", str(tmp_path / "b"), "--home", str(home))
    return home


def _row(**fields: object) -> dict[str, object]:
    row: dict[str, object] = {
        "caller": "ward-app", "org": "stmarys", "role": "radiology", "token_sha256": "a" * 64,
        "created_at": "2026-01-01T00:00:00.000Z", "expires_at": None, "revoked_at": None, "note": None,
    }  # fmt: skip
    row.update(fields)
    return row


def _import(tmp_path: Path, home: Path, *rows: dict[str, object], ok: bool = True) -> str:
    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _run("token", "import", str(path), "--home", str(home), ok=ok).output


def test_hostile_and_stale_rows(tmp_path: Path) -> None:
    home = _home_with_policy(tmp_path)
    bad_time = _import(tmp_path, home, _row(expires_at="2030-13-45T99:00:00Z"), ok=False)
    assert "expires_at is not an RFC 3339 UTC time" in bad_time
    unknown = _import(tmp_path, home, _row(org="elsewhere"), ok=False)
    assert "has no role elsewhere/radiology" in unknown
    assert "note must be text" in _import(tmp_path, home, _row(note={"x": 1}), ok=False)
    assert "created_at is missing" in _import(tmp_path, home, _row(created_at=None), ok=False)
    assert _run("token", "list", "--home", str(home)).output == ""  # nothing changed

    assert "ward-app: imported" in _import(tmp_path, home, _row(expires_at="2020-01-01T00:00:00Z"))
    revived = _import(tmp_path, home, _row(expires_at=None))
    assert "never revives" in revived
    assert "unchanged" in _import(tmp_path, home, _row(expires_at="2020-01-01T00:00:00Z"))
    assert "revoked" in _import(tmp_path, home, _row(expires_at=None, revoked_at="2026-02-01T00:00:00Z"))
    assert "unchanged" in _import(tmp_path, home, _row(expires_at=None))  # never un-revoked

    conn = sqlite3.connect(home / "vault.db")
    details = [row[0] for row in conn.execute("SELECT json_extract(record, '$.detail') FROM ledger")]
    conn.close()
    imports = [d for d in details if d and d.startswith("token_import")]
    assert len(imports) == 2  # the add and the revoke; nothing for refused or unchanged rows
    assert imports[0].startswith("token_import action=add expires_at=2020-01-01T00:00:00.000Z org=stmarys")
    assert "sha256=aaaaaaaaaaaaaaaa from=" in imports[0] and imports[1].startswith(
        "token_import action=revoke"
    )
