"""The Windows installer's structure (image/windows): fast, without a cross-compile or a real wheelhouse.

makensis compiles image/windows/phi-gateway.nsi over a tiny stand-in payload (warnings are errors), 7-Zip
lists what the installer carries, and the service host compiles and passes ruff. The real build
(image/windows/build) and what runs on Windows are not tested here: see README "The Windows installer".
Needs Debian's nsis and p7zip-full (./dev installs them).
"""

from __future__ import annotations

import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WINDOWS = ROOT / "image" / "windows"
NSI = WINDOWS / "phi-gateway.nsi"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install nsis p7zip-full"
    return path


@pytest.fixture(scope="module")
def installer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("windows")
    payload = tmp / "payload"
    (payload / "python" / "Lib" / "site-packages" / "appliance").mkdir(parents=True)
    (payload / "python" / "python.exe").write_bytes(b"MZ stand-in")
    (payload / "python" / "python311._pth").write_text("python311.zip\n.\nLib\\site-packages\nimport site\n")
    (payload / "python" / "Lib" / "site-packages" / "appliance" / "__init__.py").write_text("")
    shutil.copy(WINDOWS / "phi_service.py", payload)
    shutil.copy(WINDOWS / "phi-gateway.cmd", payload)
    out = tmp / "phi-gateway-0.0.0-setup.exe"
    result = subprocess.run(
        [_tool("makensis"), "-V2", "-WX", "-DVERSION=0.0.0", f"-DPAYLOAD={payload}", f"-DOUTFILE={out}", NSI],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _listing(installer: Path) -> dict[str, str]:
    """``7z l -slt``: each entry's Path, and the archive's own properties under ""."""
    text = subprocess.run(
        [_tool("7z"), "l", "-slt", installer], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    entries: dict[str, str] = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(" = ", 1) for line in block.splitlines() if " = " in line)
        if "Path" in fields:
            entries[fields["Path"].replace("\\", "/")] = fields.get("Size", "")
        if fields.get("Type") == "Nsis":
            entries[""] = fields.get("SubType", "")
    return entries


def test_installer_is_a_64bit_nsis_setup_with_the_payload(installer: Path) -> None:
    assert installer.read_bytes()[:2] == b"MZ"
    entries = _listing(installer)
    assert "64-bit" in entries[""], entries[""]
    for path in (
        "python/python.exe",
        "python/python311._pth",
        "python/Lib/site-packages/appliance/__init__.py",
        "phi_service.py",
        "phi-gateway.cmd",
        "uninstall.exe",
        "$PLUGINSDIR/nsExec.dll",
        "$PLUGINSDIR/nsDialogs.dll",
    ):
        assert path in entries, f"{path} not in the installer: {sorted(entries)}"


def test_installer_script_owns_the_install_steps() -> None:
    script = NSI.read_text()
    for needle in (
        "Target amd64-unicode",
        'InstallDir "$PROGRAMFILES64\\${PRODUCT}"',
        "SetRegView 64",
        "RequestExecutionLevel admin",
        "*S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F",  # the home: SYSTEM and Administrators only
        "/inheritance:r",
        '"/SITE="',
        "init --home",
        "tls self-signed --home",
        "--startup auto install",
        "localport=8080",
        "Stop-Service",
        "is KEPT",
    ):
        assert needle in script, needle
    assert 'RMDir /r "$Home' not in script  # the uninstaller keeps the home


def test_service_host_compiles_and_passes_ruff(tmp_path: Path) -> None:
    source = WINDOWS / "phi_service.py"
    py_compile.compile(str(source), cfile=str(tmp_path / "phi_service.pyc"), doraise=True)
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([ruff, "check", source], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [ruff, "format", "--check", source], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
