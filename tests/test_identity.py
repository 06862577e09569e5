"""Tokens: issue, the IDENTIFY check (401 vs one 403), revocation seen across processes, cllama import."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import Forbidden, OperatorError, Unauthorized
from appliance.identity import INVALID, MALFORMED, MIGRATIONS, Caller, TokenStore
from appliance.vault.db import Database

HEX48 = "0123456789abcdef" * 3


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "vault.db", MIGRATIONS) as database:
        yield database


@pytest.fixture
def store(db: Database) -> TokenStore:
    return TokenStore(db)


def test_issue_returns_a_well_formed_token(store: TokenStore) -> None:
    token = store.issue("radiology-bot", "stmarys", "radiology")
    assert re.fullmatch(r"radiology-bot:[0-9a-f]{48}", token)
    assert store.issue("radiology-bot", "stmarys", "radiology") != token


def test_authenticate_via_bearer_and_x_api_key(store: TokenStore) -> None:
    token = store.issue("radiology-bot", "stmarys", "radiology", note="PACS summariser")
    by_bearer = store.authenticate(f"Bearer {token}", None)
    assert isinstance(by_bearer, Caller)
    assert (by_bearer.id, by_bearer.org, by_bearer.role) == ("radiology-bot", "stmarys", "radiology")
    assert store.authenticate(f"bearer  {token} ", None) == by_bearer  # scheme is case-insensitive
    assert store.authenticate(None, token) == by_bearer  # the Anthropic SDK's header
    assert store.authenticate("", token) == by_bearer


def test_several_tokens_of_one_caller_each_work(store: TokenStore) -> None:
    first = store.issue("bot", "stmarys", "billing")
    second = store.issue("bot", "stmarys", "radiology")
    assert store.authenticate(f"Bearer {first}", None).role == "billing"
    assert store.authenticate(f"Bearer {second}", None).role == "radiology"


@pytest.mark.parametrize(
    ("authorization", "x_api_key"),
    [
        (None, None),
        ("", ""),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        (f"Bearer bot{HEX48}", None),  # no colon
        ("Bearer bot:0123abcd", None),  # short hex
        (f"Bearer bot:{HEX48.upper()}", None),  # uppercase hex
        (f"Bearer bot:{HEX48[:-1]}g", None),  # not hex
        (f"Bearer bot:{HEX48}0", None),  # too long
        (f"Bearer -bot:{HEX48}", None),  # caller id must start with a letter or digit
        (f"Bearer b/ot:{HEX48}", None),
        (f"Bearer {'a' * 65}:{HEX48}", None),
        (None, f"bot {HEX48}"),
    ],
)
def test_missing_or_malformed_token_is_401(
    store: TokenStore, authorization: str | None, x_api_key: str | None
) -> None:
    with pytest.raises(Unauthorized) as info:
        store.authenticate(authorization, x_api_key)
    assert info.value.status == 401
    assert info.value.message == MALFORMED


def _forbidden_message(store: TokenStore, token: str) -> str:
    with pytest.raises(Forbidden) as info:
        store.authenticate(f"Bearer {token}", None)
    assert info.value.status == 403
    assert token not in info.value.message and token.split(":")[1] not in str(info.value.to_dict())
    return info.value.message


def test_every_invalid_token_gets_the_same_403(store: TokenStore) -> None:
    good = store.issue("bot", "stmarys", "billing")
    revoked = store.issue("gone", "stmarys", "billing")
    assert store.revoke("gone") == 1
    expired = store.issue("old", "stmarys", "billing", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    cases = {
        "unknown caller": f"nobody:{HEX48}",
        "wrong secret": f"bot:{HEX48}",
        "secret of another caller": "gone:" + good.split(":")[1],
        "revoked": revoked,
        "expired": expired,
    }
    messages = {name: _forbidden_message(store, token) for name, token in cases.items()}
    assert set(messages.values()) == {INVALID}


def test_expiry_in_the_future_is_honoured(store: TokenStore) -> None:
    token = store.issue("temp", "stmarys", "billing", expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert store.authenticate(f"Bearer {token}", None).id == "temp"
    with pytest.raises(OperatorError, match="time zone"):
        store.issue("temp", "stmarys", "billing", expires_at=datetime(2030, 1, 1))


def test_revocation_by_another_process_takes_effect_on_the_next_request(
    store: TokenStore, tmp_path: Path
) -> None:
    token = store.issue("radiology-bot", "stmarys", "radiology")
    assert store.authenticate(f"Bearer {token}", None).id == "radiology-bot"
    # The operator's CLI: its own Database (writer thread, connections) on the same file.
    with Database(tmp_path / "vault.db", MIGRATIONS) as cli_db:
        assert TokenStore(cli_db).revoke("radiology-bot") == 1
    with pytest.raises(Forbidden):
        store.authenticate(f"Bearer {token}", None)


def test_revoke_id_revokes_one_token(store: TokenStore) -> None:
    first = store.issue("bot", "stmarys", "billing")
    second = store.issue("bot", "stmarys", "billing")
    first_id = store.authenticate(f"Bearer {first}", None).token_id
    assert store.revoke_id(first_id) is True
    assert store.revoke_id(first_id) is False
    with pytest.raises(Forbidden):
        store.authenticate(f"Bearer {first}", None)
    assert store.authenticate(f"Bearer {second}", None).id == "bot"
    assert store.revoke("bot") == 1


def test_list_shows_no_secret_and_hides_revoked_by_default(store: TokenStore) -> None:
    token = store.issue("bot", "stmarys", "billing", note="n1")
    store.issue("gone", "stmarys", "billing")
    store.revoke("gone")
    listing = store.list()
    assert [row["caller"] for row in listing] == ["bot"]
    assert set(listing[0]) == {
        "id",
        "caller",
        "org",
        "role",
        "created_at",
        "expires_at",
        "revoked_at",
        "note",
    }
    full = store.list(include_revoked=True)
    assert [row["caller"] for row in full] == ["bot", "gone"] and full[1]["revoked_at"] is not None
    text = repr(full)
    assert token.split(":")[1] not in text and "sha256" not in text


def test_issue_rejects_bad_names(store: TokenStore) -> None:
    for caller, org, role in [("bad id", "o", "r"), ("ok", "", "r"), ("ok", "o", "a:b")]:
        with pytest.raises(OperatorError):
            store.issue(caller, org, role)


def test_vault_file_never_contains_the_clear_token(store: TokenStore, db: Database, tmp_path: Path) -> None:
    tokens = [store.issue(f"bot{i}", "stmarys", "billing") for i in range(5)]
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("vault.db*"))
    assert b"bot0" in raw
    for token in tokens:
        assert token.split(":")[1].encode() not in raw


def _agent(root: Path, name: str, metadata: object) -> None:
    (root / name).mkdir()
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    (root / name / "metadata.json").write_text(text)


def test_import_cllama_context_directory(store: TokenStore, tmp_path: Path) -> None:
    root = tmp_path / "context"
    root.mkdir()
    good = f"tiverton:{HEX48}"
    _agent(
        root, "tiverton", {"token": good, "pod": "trading-desk", "service": "tiverton", "type": "openclaw"}
    )
    _agent(root, "westin", {"token": f"allen:{'ab' * 24}"})  # caller does not match the directory
    _agent(root, "allen", {"token": "allen:not-hex"})
    _agent(root, "broken", "{not json")
    _agent(root, "nometa", {"pod": "x"})
    _agent(root, "withrole", {"token": f"withrole:{'cd' * 24}", "org": "stjude", "role": "radiology"})
    (root / "README.md").write_text("not an agent")

    results = dict(store.import_cllama(root, org="stmarys", role="billing"))
    assert results["tiverton"] == "imported"
    assert results["withrole"] == "imported"
    assert results["westin"].startswith("skipped: token caller does not match")
    assert results["allen"].startswith("skipped: token is not")
    assert results["broken"].startswith("skipped: metadata.json is not readable")
    assert results["nometa"] == "skipped: metadata.json has no token"
    assert set(results) == {"tiverton", "westin", "allen", "broken", "nometa", "withrole"}
    assert all(good not in outcome for outcome in results.values())

    caller = store.authenticate(f"Bearer {good}", None)
    assert (caller.id, caller.org, caller.role) == ("tiverton", "stmarys", "billing")
    other = store.authenticate(None, f"withrole:{'cd' * 24}")
    assert (other.org, other.role) == ("stjude", "radiology")
    with pytest.raises(Forbidden):
        store.authenticate(None, f"allen:{'ab' * 24}")

    again = dict(store.import_cllama(root, org="stmarys", role="billing"))
    assert again["tiverton"].startswith("skipped: token already present")
    assert len(store.list()) == 2


def test_import_cllama_does_not_revive_a_revoked_token(store: TokenStore, tmp_path: Path) -> None:
    root = tmp_path / "context"
    root.mkdir()
    _agent(root, "tiverton", {"token": f"tiverton:{HEX48}"})
    store.import_cllama(root, org="stmarys", role="billing")
    store.revoke("tiverton")
    assert dict(store.import_cllama(root, org="stmarys", role="billing"))["tiverton"].startswith("skipped")
    with pytest.raises(Forbidden):
        store.authenticate(None, f"tiverton:{HEX48}")


def test_import_cllama_requires_a_directory(store: TokenStore, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="not a directory"):
        store.import_cllama(tmp_path / "absent", org="stmarys", role="billing")


def test_a_cached_check_sees_a_revocation_by_another_process_at_once(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    with Database(path, MIGRATIONS) as server_db, Database(path, MIGRATIONS) as cli_db:
        server, cli = TokenStore(server_db), TokenStore(cli_db)
        token = cli.issue("radiology-bot", "stmarys", "radiology")
        for _ in range(3):  # the second and third checks are answered from memory
            assert server.authenticate(f"Bearer {token}", None).id == "radiology-bot"
        assert cli.revoke("radiology-bot") == 1
        with pytest.raises(Forbidden):
            server.authenticate(f"Bearer {token}", None)


def test_a_change_made_behind_the_cli_is_seen_within_the_cache_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from appliance import identity

    monkeypatch.setattr(identity, "MAX_AGE_S", 0.05)
    path = tmp_path / "vault.db"
    with Database(path, MIGRATIONS) as db:
        store = TokenStore(db)
        token = store.issue("radiology-bot", "stmarys", "radiology")
        store.authenticate(f"Bearer {token}", None)
        with sqlite3.connect(path) as raw:  # no change mark: a crashed command, or a hand edit
            raw.execute("UPDATE tokens SET revoked_at = '2026-01-01T00:00:00.000Z'")
        import time

        time.sleep(0.06)
        with pytest.raises(Forbidden):
            store.authenticate(f"Bearer {token}", None)


def test_a_cached_token_still_expires_on_time(store: TokenStore) -> None:
    import time

    token = store.issue(
        "radiology-bot", "stmarys", "radiology", expires_at=datetime.now(UTC) + timedelta(seconds=0.3)
    )
    assert store.authenticate(f"Bearer {token}", None).id == "radiology-bot"
    time.sleep(0.35)
    with pytest.raises(Forbidden):
        store.authenticate(f"Bearer {token}", None)
