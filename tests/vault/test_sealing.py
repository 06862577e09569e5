"""Sealing under the master key, the key file's guard rails, and sealed provider keys in the vault file."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import OperatorError
from appliance.vault.db import Database
from appliance.vault.provider_keys import MIGRATIONS, ProviderKeys, fingerprint
from appliance.vault.sealing import MasterKey

SECRET = "sk-test-4f1c9a77d2e84b0c9e1f2a3b4c5d6e7f"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@pytest.fixture
def master(tmp_path: Path) -> MasterKey:
    return MasterKey.create(tmp_path / "master.key")


@pytest.fixture
def keys(tmp_path: Path, master: MasterKey) -> Iterator[ProviderKeys]:
    db = Database(tmp_path / "vault.db", MIGRATIONS).start()
    yield ProviderKeys(db, master)
    db.close()


def test_seal_open_round_trip(master: MasterKey) -> None:
    blob = master.seal(b"hello", b"ctx")
    assert blob[:2] == b"v1" and len(blob) == 2 + 12 + 5 + 16
    assert master.open(blob, b"ctx") == b"hello"
    assert master.seal(b"hello", b"ctx") != blob  # fresh nonce every time


def test_open_with_wrong_aad_fails(master: MasterKey) -> None:
    blob = master.seal(b"hello", b"provider_key:openai")
    with pytest.raises(OperatorError, match="wrong master key or altered data"):
        master.open(blob, b"provider_key:anthropic")


@pytest.mark.parametrize("position", [0, 5, 20, -1])
def test_tampered_blob_fails(master: MasterKey, position: int) -> None:
    blob = bytearray(master.seal(b"hello world", b"ctx"))
    blob[position] ^= 0x01
    with pytest.raises(OperatorError, match="wrong master key or altered data"):
        master.open(bytes(blob), b"ctx")


def test_truncated_blob_fails(master: MasterKey) -> None:
    with pytest.raises(OperatorError, match="cannot be opened"):
        master.open(b"v1" + b"\0" * 20, b"ctx")


def test_wrong_key_fails(tmp_path: Path, master: MasterKey) -> None:
    other = MasterKey.create(tmp_path / "other.key")
    with pytest.raises(OperatorError, match="wrong master key or altered data"):
        other.open(master.seal(b"hello", b"ctx"), b"ctx")


@posix_only
def test_master_key_file_is_0600_and_never_overwritten(tmp_path: Path, master: MasterKey) -> None:
    path = tmp_path / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert len(before) == 32
    with pytest.raises(OperatorError, match="refusing to overwrite"):
        MasterKey.create(path)
    assert path.read_bytes() == before
    loaded = MasterKey.load(path)
    assert loaded.open(master.seal(b"x", b"a"), b"a") == b"x"


@posix_only
def test_load_refuses_a_key_other_users_can_read(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    MasterKey.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(OperatorError) as info:
        MasterKey.load(path)
    assert str(path) in str(info.value) and f"chmod 600 {path}" in str(info.value)


def test_load_refuses_wrong_length_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"\1" * 16)
    path.chmod(0o600)
    with pytest.raises(OperatorError, match="16 bytes, expected 32"):
        MasterKey.load(path)
    with pytest.raises(OperatorError, match="no master key"):
        MasterKey.load(tmp_path / "absent.key")


def test_repr_never_shows_key_bytes(tmp_path: Path, master: MasterKey) -> None:
    raw = (tmp_path / "master.key").read_bytes()
    text = repr(master)
    assert raw.hex() not in text and repr(raw) not in text and "master.key" in text


def test_provider_keys_set_get_list_remove(keys: ProviderKeys) -> None:
    fp = keys.set("openai", f"  {SECRET}\n")
    assert fp == fingerprint(SECRET) and fp.startswith("sha256:") and len(fp) == 7 + 12
    assert keys.get("openai") == SECRET
    assert keys.get("anthropic") is None
    first = keys.list()
    assert [k["name"] for k in first] == ["openai"]
    assert set(first[0]) == {"name", "fingerprint", "created_at", "updated_at"}

    assert keys.set("openai", "sk-rotated-000111") == fingerprint("sk-rotated-000111")
    assert keys.get("openai") == "sk-rotated-000111"
    second = keys.list()[0]
    assert second["created_at"] == first[0]["created_at"]
    assert second["fingerprint"] != first[0]["fingerprint"]

    assert keys.remove("openai") is True
    assert keys.remove("openai") is False
    assert keys.get("openai") is None and keys.list() == []


@pytest.mark.parametrize("bad", ["", "   \n", "sk-abc\r\nX-Injected: 1", "two words"])
def test_provider_keys_reject_empty_or_unsafe_secrets(keys: ProviderKeys, bad: str) -> None:
    with pytest.raises(OperatorError):
        keys.set("openai", bad)
    assert keys.list() == []


def test_provider_keys_reject_bad_route_names(keys: ProviderKeys) -> None:
    with pytest.raises(OperatorError, match="invalid route name"):
        keys.set("../etc", SECRET)


def test_listing_and_repr_never_contain_the_secret(keys: ProviderKeys) -> None:
    keys.set("anthropic", SECRET)
    assert SECRET not in repr(keys.list())
    assert SECRET not in repr(keys)


def test_sealed_value_is_bound_to_its_name(keys: ProviderKeys, tmp_path: Path) -> None:
    keys.set("openai", SECRET)
    keys.set("anthropic", "sk-other-key-123")
    # Someone with write access moves openai's sealed value onto the anthropic row.
    keys._db.write(
        lambda c: c.execute(
            "UPDATE provider_keys SET sealed = (SELECT sealed FROM provider_keys WHERE name = 'openai')"
            " WHERE name = 'anthropic'"
        )
    )
    with pytest.raises(OperatorError, match="altered data"):
        keys.get("anthropic")


def test_vault_file_never_contains_the_secret(keys: ProviderKeys, tmp_path: Path) -> None:
    keys.set("openai", SECRET)
    keys._db.close()  # checkpoint the WAL into the main file
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("vault.db*"))
    assert b"provider_keys" in raw
    assert SECRET.encode() not in raw
    assert SECRET.encode().hex().encode() not in raw


def test_a_cached_key_follows_a_change_made_by_another_process(tmp_path: Path, master: MasterKey) -> None:
    path = tmp_path / "shared.db"
    with Database(path, MIGRATIONS) as server_db, Database(path, MIGRATIONS) as cli_db:
        server, cli = ProviderKeys(server_db, master), ProviderKeys(cli_db, master)
        cli.set("openai", "sk-first-0000000000")
        assert server.get("openai") == "sk-first-0000000000"
        assert server.get("openai") == "sk-first-0000000000"  # from memory
        cli.set("openai", "sk-second-000000000")
        assert server.get("openai") == "sk-second-000000000"
        assert cli.remove("openai")
        assert server.get("openai") is None
