"""The embedded demo home: prepared once, stable across restarts, never applied to a real home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance import demo
from appliance.errors import OperatorError
from appliance.home import Home
from appliance.policy import dsse


def test_prepare_makes_a_ready_home_and_is_stable(tmp_path: Path) -> None:
    home = Home(tmp_path / "demo-home")
    token, done = demo.prepare(home)
    assert token.startswith("demo-app:") and any("demo policy v1" in line for line in done)
    with home.open_vault() as vault:
        active = vault.policies.current()
        assert active is not None and vault.tokens.authenticate(f"Bearer {token}", None).role == "clinician"
    policy = json.loads(dsse.parse_envelope(active.envelope).payload)
    pinned = policy["models"]["local/demo"]["sha256"]
    assert (home.models_dir / "demo.gguf").exists() and len(pinned) == 64
    again, done_again = demo.prepare(home)
    assert again == token and done_again == []  # nothing re-signed, the same token


def test_a_real_home_is_never_turned_into_a_demo(tmp_path: Path) -> None:
    home = Home(tmp_path / "real")
    home.init("stmarys-main")
    with pytest.raises(OperatorError, match="not a demo home"):
        demo.prepare(home)
