"""Fixtures of the export tests: a home whose ledger holds ``N`` records (once a module), and its key."""

from __future__ import annotations

import pytest

from appliance.home import Home
from appliance.ledger import signed_note
from tests.ledger._exports import N, _home, _verifier


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return _home(tmp_path_factory.mktemp("big"), N)


@pytest.fixture(scope="module")
def big_key(big: Home) -> signed_note.Verifier:
    return _verifier(big)
