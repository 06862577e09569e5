"""``phi-gateway tls …`` and the transport rule of ``serve``, as an operator runs them."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.cli.test_cli import _run
from tests.support.subprocess_gateway import cli
from tests.support.tls_certs import CertificateAuthority, fingerprint, name, pem

_REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = re.compile(r"^fingerprint: (sha256:[0-9a-f]{64})$", re.M)


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    _run("init", "--home", str(home), "--site", "stmarys-main")
    return home


def _admin_details(home: Path) -> list[str]:
    with sqlite3.connect(f"file:{home / 'vault.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT record FROM ledger WHERE type = 'admin' ORDER BY seq").fetchall()
    return [json.loads(record)["detail"] for (record,) in rows]


def test_self_signed_show_and_the_admin_records(tmp_path: Path) -> None:
    home = _home(tmp_path)
    none = _run("tls", "show", "--home", str(home)).stdout
    assert "no certificate" in none and "tls self-signed --host NAME" in none

    made = _run(
        "tls",
        "self-signed",
        "--home",
        str(home),
        "--host",
        "gw.ward.local",
        "--host",
        "10.20.30.40",
        "--days",
        "30",
    ).stdout
    printed = FINGERPRINT.search(made)
    assert printed is not None
    assert "DNS:gw.ward.local, IP:10.20.30.40" in made and "(29 days left)" in made and "pin" in made
    assert stat.S_IMODE(os.stat(home / "tls" / "key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "tls").st_mode) == 0o700

    shown = _run("tls", "show", "--home", str(home)).stdout
    assert f"fingerprint: {printed.group(1)}" in shown
    for expected in ("subject:     CN=gw.ward.local", "issuer:", "(self-signed)", "not after:", "days left"):
        assert expected in shown, expected
    assert "client certificates: not asked for" in shown and "min version: TLS 1.2" in shown

    second = FINGERPRINT.search(
        _run("tls", "self-signed", "--home", str(home), "--host", "gw.ward.local").stdout
    )
    assert second is not None and second.group(1) != printed.group(1)
    details = [d for d in _admin_details(home) if d.startswith("tls_")]
    assert details[0].startswith(f"tls_self_signed {printed.group(1)} not_after=")
    assert (
        details[1].startswith(f"tls_self_signed {second.group(1)} ")
        and f"replaced={printed.group(1)}" in details[1]
    )
    key = (home / "tls" / "key.pem").read_text()
    body = key.split("-----")[2].strip().splitlines()[0]
    assert not any(body in d for d in _admin_details(home)), "no key material in the ledger"


def test_import_checks_the_pair_and_records_it(tmp_path: Path) -> None:
    home = _home(tmp_path)
    ca = CertificateAuthority("St Marys Issuing CA")
    leaf = ca.issue(
        name("gw.stmarys.example"), usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=["gw.stmarys.example"]
    )
    cert, key = leaf.write(tmp_path, "leaf")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pem(ca.cert))
    other, other_key = ca.issue(name("other"), usage=ExtendedKeyUsageOID.SERVER_AUTH).write(tmp_path, "other")

    refused = _run("tls", "import", str(cert), str(other_key), "--home", str(home), ok=False)
    assert refused.exit_code == 1 and "does not match" in refused.output
    assert not (home / "tls").exists() and not [d for d in _admin_details(home) if d.startswith("tls_")]
    fifo = _run("tls", "import", "/dev/zero", str(key), "--home", str(home), ok=False)
    assert fifo.exit_code == 1 and "not a regular file" in fifo.output

    out = _run("tls", "import", str(cert), str(key), "--chain", str(chain), "--home", str(home)).stdout
    assert f"fingerprint: {fingerprint(leaf.cert)}" in out
    assert "issuer:      CN=St Marys Issuing CA" in out and "chain:       1 certificate(s)" in out
    assert "DNS:gw.stmarys.example" in out
    (detail,) = [d for d in _admin_details(home) if d.startswith("tls_")]
    assert detail.startswith(f"tls_import {fingerprint(leaf.cert)} not_after=")

    ca_file = home / "clients-ca.pem"
    ca_file.write_bytes(chain.read_bytes())
    with open(home / "gateway.toml", "a") as settings:
        settings.write('\n[server.tls]\nclient_ca_file = "clients-ca.pem"\n')
    shown = _run("tls", "show", "--home", str(home)).stdout
    assert f"client certificates: asked for, verified against {ca_file} (1 CA certificate(s))" in shown
    assert other.exists()


def test_serve_refuses_plain_http_beyond_loopback(tmp_path: Path) -> None:
    home = _home(tmp_path)
    refused = cli(home, "serve", "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 1, refused.stderr
    assert "error: refusing to serve plain HTTP on 0.0.0.0" in refused.stderr
    assert "phi-gateway tls self-signed --host NAME" in refused.stderr and "tls import" in refused.stderr
    assert "--insecure-http" in refused.stderr


def _serve(home: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    log = home.parent / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--home", str(home), "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=_REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("PHI_")},
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"phi-gateway listening on [0-9.]+:(\d+)", log.read_text())
        if match:
            return proc, log, int(match.group(1))
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(log.read_text())


def _health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    doc: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return doc


def test_serve_insecure_http_is_the_operators_explicit_choice(tmp_path: Path) -> None:
    home = _home(tmp_path)
    # Listens on every address for a moment, with no token issued: every API request is refused.
    proc, log, port = _serve(home, "--host", "0.0.0.0", "--insecure-http")
    try:
        assert _health(port)["transport"] == {"tls": False, "insecure_http": True}
        assert "PLAIN HTTP on 0.0.0.0 by the operator's choice" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    loopback, log, port = _serve(home, "--host", "127.0.0.1")
    try:
        assert _health(port)["transport"] == {"tls": False, "insecure_http": False}
        assert "PLAIN HTTP" not in log.read_text()
    finally:
        loopback.send_signal(signal.SIGTERM)
        assert loopback.wait(30) == 0


def test_the_printed_sdk_line_is_a_url_for_an_ipv6_host_too(tmp_path: Path) -> None:
    home = _home(tmp_path)
    printed = _run("tls", "self-signed", "--home", str(home), "--host", "fd00::10", "--host", "gw").output
    assert "base_url='https://[fd00::10]:8080/v1'" in printed
    init = _run("init", "--home", str(tmp_path / "other"), "--site", "s1").output
    assert "serve --host 127.0.0.1 works" in init
