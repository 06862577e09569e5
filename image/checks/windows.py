"""The Windows installer: a PE executable NSIS wrote, and what it will install, listed by 7-Zip.

Rules and their sources:
  win.pe       PE/COFF (Microsoft "PE Format"): ``MZ``, e_lfanew at 0x3c, ``PE\\0\\0``, then the COFF machine.
               Debian's makensis (nsis 3.08) builds x86 stubs by default (NSIS_CPU=x86; ``Target
               amd64-unicode`` selects the x86-64 stub it also ships): 0x14c is accepted with a note,
               0x8664 plainly, anything else fails.
  win.nsis     ``7z`` recognises the file as an NSIS archive (Type = Nsis).
  win.members  every pattern in REQUIRED_MEMBERS matches some listed path (fnmatch, ``/`` separators, any
               leading ``$INSTDIR/`` kept as 7z prints it; ``*`` also matches ``/``).
Owns ``check_installer`` and REQUIRED_MEMBERS. Needs 7z (Debian p7zip-full); missing 7z is a failure.
"""

from __future__ import annotations

import fnmatch
import shutil
import struct
import subprocess
from pathlib import Path

from checks.report import Report

# What the installer must carry. The Windows build owns the layout: adjust these patterns with it.
REQUIRED_MEMBERS = (  # what image/windows/build puts in $INSTDIR (wheels are installed at build time)
    "python/python.exe",
    "python/python311.dll",
    "python/Lib/site-packages/appliance/__init__.py",
    "python/Lib/site-packages/llama_cpp/lib/llama.dll",
    "python/Lib/site-packages/llama_cpp/lib/ggml-base.dll",
    "python/Lib/site-packages/llama_cpp/lib/ggml-cpu-haswell.dll",
    "python/Lib/site-packages/win32/win32service.pyd",
    "python/Lib/site-packages/winloop/__init__.py",
    "phi_service.py",
    "phi-gateway.cmd",
    "*uninstall*.exe",
)
_MACHINES = {0x14C: "x86 (i386)", 0x8664: "x86-64 (AMD64)"}


def _machine(path: Path) -> tuple[int | None, str]:
    with path.open("rb") as f:
        head = f.read(4096)
    if head[:2] != b"MZ" or len(head) < 0x40:
        return None, f"no MZ header (starts {head[:2]!r})"
    (offset,) = struct.unpack_from("<I", head, 0x3C)
    if offset + 26 > len(head) or head[offset : offset + 4] != b"PE\0\0":
        return None, f"no PE signature at e_lfanew {offset:#x}"
    (machine,) = struct.unpack_from("<H", head, offset + 4)
    (magic,) = struct.unpack_from("<H", head, offset + 24)
    kind = {0x10B: "PE32", 0x20B: "PE32+"}.get(magic, f"optional header {magic:#x}")
    return machine, f"{kind}, machine {machine:#x} {_MACHINES.get(machine, '(unknown)')}"


def _listing(path: Path) -> tuple[str, list[tuple[str, str]]] | str:
    """(archive type, [(path, size)]) from ``7z l -slt``, or the error text."""
    run = subprocess.run(
        ["7z", "l", "-slt", str(path)], capture_output=True, text=True, timeout=300, check=False
    )
    if run.returncode != 0:
        return f"7z l failed (rc {run.returncode}): {(run.stdout + run.stderr).strip()[-300:]}"
    head, _, body = run.stdout.partition("\n----------\n")
    kind = next((ln.split(" = ", 1)[1] for ln in head.splitlines() if ln.startswith("Type = ")), "?")
    entries = []
    for block in body.split("\n\n"):
        fields = dict(ln.split(" = ", 1) for ln in block.splitlines() if " = " in ln)
        if "Path" in fields:
            entries.append((fields["Path"].replace("\\", "/"), fields.get("Size", "")))
    return kind, entries


def check_installer(path: Path, report: Report) -> None:
    report.section(f"Windows installer {path} ({path.stat().st_size} bytes)")
    machine, text = _machine(path)
    if machine == 0x14C:
        report.ok("win.pe", text)
        report.note("win.pe", "32-bit NSIS stub (makensis' default); it installs 64-bit files all the same")
    else:
        report.check(machine == 0x8664, "win.pe", text)
    if shutil.which("7z") is None:
        report.fail("win.nsis", "7z not found (Debian package p7zip-full)")
        return
    listed = _listing(path)
    if isinstance(listed, str):
        report.fail("win.nsis", listed)
        return
    kind, entries = listed
    report.check(kind == "Nsis", "win.nsis", f"7z reads it as {kind}, {len(entries)} member(s):")
    for name, size in entries:
        report.detail(f"{size or '-':>12}  {name}")
    for pattern in REQUIRED_MEMBERS:
        hits = [name for name, _ in entries if fnmatch.fnmatchcase(name, pattern)]
        report.check(bool(hits), "win.members", f"{pattern}: {hits if hits else 'no member matches'}")
