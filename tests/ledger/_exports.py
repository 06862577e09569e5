"""Helpers for the export and follower tests: homes with records, bundles written and checked."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from appliance.home import Home
from appliance.ledger import signed_note
from appliance.ledger.export import ExportSummary
from appliance.ledger.export_verify import ExportReport, verify_exports
from appliance.ledger.operations import write_export
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


def _export(home: Home, out: Path, first_seq: int) -> ExportSummary:
    with home.open_vault() as vault:
        return write_export(vault.ledger, vault.db.reader(), out, first_seq)


def _verifier(home: Home) -> signed_note.Verifier:
    with home.open_vault() as vault:
        return vault.ledger.verifier()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _seqs(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in _lines(path)] if path.exists() else []


def _verify_one(path: Path, verifiers: list[signed_note.Verifier]) -> ExportReport:
    (report,) = verify_exports([path], verifiers)
    return report
