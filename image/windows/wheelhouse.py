"""The win_amd64 wheelhouse: the gateway wheel and every runtime dependency as CPython 3.11 Windows wheels.

usage: PYTHON image/windows/wheelhouse.py SELF_WHEEL LLAMA_CACHE OUT [EXTRA ...]

Why not ``pip download --platform win_amd64`` alone: pip evaluates environment markers for the machine it
runs on, so it would want ``uvloop; sys_platform != 'win32'`` and miss Windows-only dependencies such as
``colorama; platform_system == 'Windows'`` (click, tqdm). This script evaluates every Requires-Dist marker
for Windows x64 CPython 3.11 and asks pip for exactly those requirements (``--no-deps``), until the
wheelhouse is closed. llama-cpp-python comes from LLAMA_CACHE (image/windows/build-llama), never PyPI.
Runs with the interpreter that has pip (its vendored ``packaging`` reads the metadata).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

WINDOWS = default_environment() | {
    "implementation_name": "cpython",
    "os_name": "nt",
    "platform_machine": "AMD64",
    "platform_python_implementation": "CPython",
    "platform_release": "10",
    "platform_system": "Windows",
    "python_full_version": "3.11.9",
    "python_version": "3.11",
    "sys_platform": "win32",
}


def requirements(wheel: Path, extras: frozenset[str] = frozenset({""})) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on Windows x64 CPython 3.11 with one of ``extras``."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(name).decode().splitlines()
    wanted = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate(WINDOWS | {"extra": extra}) for extra in extras):
            wanted.append(req)
    return wanted


def _name(wheel: Path) -> str:
    return canonicalize_name(parse_wheel_filename(wheel.name)[0])


def main() -> None:
    self_wheel, llama, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(self_wheel, out)
    wheels = {_name(self_wheel): self_wheel}
    pending = requirements(self_wheel) + [Requirement(extra) for extra in sys.argv[4:]]
    expanded: set[tuple[str, str]] = set()  # (name, extra) whose requirements are pending already
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name not in wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--platform", "win_amd64", "--python-version", "3.11", "--implementation", "cp",
                 "--find-links", str(llama), "-d", str(out), req.name + str(req.specifier)],
                check=True,
            )  # fmt: skip
            found = [
                w for w in out.glob("*.whl") if canonicalize_name(parse_wheel_filename(w.name)[0]) == name
            ]
            if not found:
                raise SystemExit(f"wheelhouse: no win_amd64 or pure wheel for {req}")
            wheels[name] = found[0]
        for extra in {""} | set(req.extras):
            if (name, extra) not in expanded:
                expanded.add((name, extra))
                pending += requirements(wheels[name], frozenset({extra}))
    for wheel in sorted(w.name for w in wheels.values()):
        print(f"  {wheel}", file=sys.stderr)


if __name__ == "__main__":
    main()
