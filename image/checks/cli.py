"""``image/check``'s arguments and the discovery of artifacts under dist/.

With no artifact named, every kind is expected under DIST (oci/*.docker.tar, oci/*.oci/, ova/*.ova,
windows/*-setup.exe) and a kind with nothing there is a failure; naming some checks only those. Owns
``main``; the rules are in the per-artifact modules.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from checks.oci import check_docker_archive, check_oci_layout
from checks.ova import check_ova
from checks.report import Report
from checks.windows import check_installer

DEFAULT_DIST = Path(__file__).resolve().parents[2] / "dist"
KINDS: dict[str, tuple[str, Callable[[Path, Report], None]]] = {
    "oci/*.docker.tar": ("docker archive", check_docker_archive),
    "oci/*.oci": ("OCI layout", check_oci_layout),
    "ova/*.ova": ("OVA", check_ova),
    "windows/*-setup.exe": ("Windows installer", check_installer),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image/check",
        description="Validate the built artifacts (OCI image, OVA, Windows installer); exit 1 on a failure.",
    )
    parser.add_argument("--dist", type=Path, default=DEFAULT_DIST, help="where to look (default: ./dist)")
    parser.add_argument(
        "--oci", type=Path, action="append", default=[], help="a .docker.tar or an OCI layout"
    )
    parser.add_argument("--ova", type=Path, action="append", default=[], help="an .ova")
    parser.add_argument("--windows", type=Path, action="append", default=[], help="a *-setup.exe")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = Report()
    named: list[tuple[Path, Callable[[Path, Report], None]]] = []
    for path in args.oci:
        named.append((path, check_oci_layout if path.is_dir() else check_docker_archive))
    named += [(p, check_ova) for p in args.ova] + [(p, check_installer) for p in args.windows]
    if not named:
        for pattern, (label, check) in KINDS.items():
            found = sorted(args.dist.glob(pattern))
            if not found:
                report.fail("artifact", f"no {label} ({args.dist / pattern})")
            named += [(p, check) for p in found]
    for path, check in named:
        if not path.exists():
            report.fail("artifact", f"{path} does not exist")
            continue
        check(path, report)
    verdict = "FAIL" if report.failures else "ok"
    print(f"{verdict}: {report.checks} checks, {report.failures} failure(s)")
    return 1 if report.failures else 0
