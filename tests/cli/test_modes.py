"""What a fresh home and a serving gateway keep from other users and from crash dumps: the home 0700, key
files and the vault 0600 whatever the umask, the admin socket 0600, and no core file of the serving
process (its memory holds the master key and, in flight, provider keys and prompts)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import _run
from tests.support.subprocess_gateway import GatewayProcess

_REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask an operator's shell might have: every mode below must not depend on it."""
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_fresh_home_keeps_its_secrets_private(tmp_path: Path, open_umask: None) -> None:
    home = tmp_path / "home"
    _run("init", "--home", str(home), "--site", "s1")
    assert _mode(home) == 0o700
    assert _mode(home / "master.key") == 0o600
    assert _mode(home / "appliance.key") == 0o600
    assert _mode(home / "vault.db") == 0o600  # hashed tokens, sealed keys; its -wal and -shm follow it
    for sidecar in ("vault.db-wal", "vault.db-shm"):
        if (home / sidecar).exists():
            assert _mode(home / sidecar) == 0o600, sidecar


def test_an_existing_home_directory_is_narrowed_to_0700(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    _run("init", "--home", str(home), "--site", "s1")
    assert _mode(home) == 0o700


def test_forbid_core_dumps_sets_no_core_and_not_dumpable() -> None:
    """In a child: the limits are the process's, and this test process must keep its own."""
    probe = (
        "import ctypes, resource, sys\n"
        "from appliance.process_hardening import forbid_core_dumps\n"
        "assert forbid_core_dumps() == []\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
        "if sys.platform.startswith('linux'):\n"
        "    print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=_REPO, timeout=60, check=True
    )
    lines = done.stdout.split("\n")
    assert lines[0] == "(0, 0)"
    if sys.platform.startswith("linux"):
        assert lines[1] == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/limits")
def test_a_serving_gateway_has_no_core_dumps_and_a_0600_admin_socket(
    tmp_path: Path, open_umask: None
) -> None:
    home = tmp_path / "home"
    _run("init", "--home", str(home), "--site", "s1")
    gateway = GatewayProcess(home, tmp_path)
    try:
        gateway.start()
        assert _mode(home / "admin.sock") == 0o600
        limits = Path(f"/proc/{gateway.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        assert gateway.stop() == 0, gateway.log()[-3000:]
    finally:
        gateway.ensure_dead()
