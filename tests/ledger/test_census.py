"""The request census of `audit verify FILE…`: a request counts once per ledger however many records it
has, and a request in two nodes' ledgers (a home restored onto a second node that then served on) fails."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.ledger.census import census


def _lines(path: Path, *ids: str | None) -> Path:
    path.write_text("".join(json.dumps({"type": "response", "request_id": i}) + "\n" for i in ids))
    return path


def test_each_request_once_per_site(tmp_path: Path) -> None:
    a = _lines(tmp_path / "a", "q1", "q1", "q2", None)
    b = _lines(tmp_path / "b", "q3")
    found = census([("site/a", a), ("site/b", b)])
    assert found.ok and found.requests == 3 and found.per_origin == {"site/a": 2, "site/b": 1}
    assert "3 distinct across 2 ledger(s)" in found.describe()


def test_a_request_in_two_ledgers_is_named(tmp_path: Path) -> None:
    a = _lines(tmp_path / "a", "q1", "q2")
    b = _lines(tmp_path / "b", "q2")
    found = census([("site/a", a), ("site/b", b)])
    assert not found.ok and found.in_several == {"q2": ["site/a", "site/b"]}
    assert "q2 in site/a and site/b" in found.describe()
