"""The appliance where Python is Windows' (simulated here): ``appliance.files`` where ``os`` has no
``O_NONBLOCK`` and no ``set_blocking`` (CPython 3.11 on Windows) — the verbs that open a home still work and a
file that is not regular is still refused — and the admin client where ``socket`` has no ``AF_UNIX``."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance import files
from appliance.admin.client import NO_ADMIN_SOCKET, AdminClient
from appliance.cli import main
from appliance.errors import OperatorError
from appliance.home import Home


def _windows_os(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Take away what Windows' ``os`` lacks; returns the flags of every ``os.open`` from then on."""
    monkeypatch.delattr(os, "O_NONBLOCK")
    monkeypatch.delattr(os, "set_blocking")
    opened: list[int] = []
    real_open: Callable[..., int] = os.open

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    return opened


def _ok(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_init_tls_and_the_home_files_work_without_o_nonblock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _windows_os(monkeypatch)
    home = tmp_path / "home"
    assert "master.key" in _ok("init", "--home", str(home), "--site", "win-1")
    assert "fingerprint" in _ok("tls", "self-signed", "--home", str(home), "--host", "x").lower()
    author = tmp_path / "author"
    _ok("policy", "keygen", "--out", str(author))
    _ok("trust", "add", f"{author}.pub", "--home", str(home))
    opened_home = Home(home)
    assert opened_home.settings().site == "win-1"
    assert len(opened_home.trust().keys) == 1
    assert files.read_text(opened_home.settings_path, files.SETTINGS_FILE).strip()
    assert opened  # the files above went through os.open, none with a flag Windows lacks


def test_a_directory_is_still_refused_without_o_nonblock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _windows_os(monkeypatch)
    with pytest.raises(OperatorError, match="not a regular file"):
        files.read_bytes(tmp_path, files.KEY_FILE)
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * (files.KEY_FILE.cap + 1))
    with pytest.raises(OperatorError, match="too large"):
        files.read_bytes(big, files.KEY_FILE)


def test_on_posix_the_open_stays_non_blocking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_NONBLOCK"):
        pytest.skip("POSIX only")
    flags: list[int] = []
    real_open: Callable[..., int] = os.open
    monkeypatch.setattr(os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    plain = tmp_path / "a.key"
    plain.write_bytes(b"key")
    assert files.read_bytes(plain, files.KEY_FILE) == b"key"
    assert flags and flags[0] & os.O_NONBLOCK


def test_the_admin_client_without_af_unix_says_what_windows_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    _ok("init", "--home", str(home), "--site", "win-1")
    monkeypatch.delattr(socket, "AF_UNIX")
    client = AdminClient(Home(home).admin_socket)
    for call in (
        lambda: client.call("GET", "/admin/status"),
        lambda: client.text("/metrics"),
        lambda: client.send_bytes("POST", "/admin/policy/verify", b"{}"),
        lambda: next(client.stream("/admin/audit/stream")),
    ):
        with pytest.raises(OperatorError) as refused:
            call()
        assert str(refused.value) == NO_ADMIN_SOCKET
    result = CliRunner().invoke(main, ["status", "--home", str(home)])
    assert result.exit_code == 1 and "not available on Windows" in result.output
    assert "policy reload" in NO_ADMIN_SOCKET and "within a second" in NO_ADMIN_SOCKET
