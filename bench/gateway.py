"""Gateway overhead benchmark: direct to a fake upstream versus through the full pipeline.

Starts, on loopback only, a fast fake OpenAI-compatible upstream and a real gateway (identity, policy,
durable audit ledger with group commit, audit lines to a file as a log shipper would read them), then
drives both with ``bench/loadgen.py`` in its own process at 1, 16 and 64 connections, and measures
streaming time to first byte. Then the same home is given a self-signed certificate and served again,
now over TLS: keep-alive req/s at the same levels (``bench/tls_loadgen.py``), and a new connection per
request, over TLS and over plain TCP, whose difference is the cost of one handshake. On a machine with 2
or more CPUs the gateway is pinned to CPU 0 and the upstream and load generator to the others, so the
gateway's own cost is what is measured.

    ./dev bench                     # or: .venv/bin/python -m bench.gateway --seconds 5

Targets (issue 2, 2-core machine): added p50 at 1 connection <= 0.30 ms; >= 12,000 req/s at 16 connections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance import signing_keys
from appliance.home import Home
from appliance.policy import dsse, importer
from appliance.tls import TlsMaterial, certificates
from bench.drill_gateway import free_port, wait_port
from tests.support.gateway import SITE, policy_doc

ROOT = Path(__file__).resolve().parent.parent

CHAT = '{"model":"%s","messages":[{"role":"user","content":"Summarise the discharge note in two lines."}]%s}'


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


@contextlib.contextmanager
def _process(args: list[str], cpus: set[int] | None, stdout: object = subprocess.DEVNULL) -> Iterator[None]:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(args, cwd=ROOT, stdout=stdout, stderr=subprocess.DEVNULL, preexec_fn=pin)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prepare_home(root: Path, upstream_port: int) -> tuple[Home, str]:
    home = Home(root / "home")
    home.init(SITE)
    author = root / "author"
    signing_keys.generate(author)
    trust = home.trust()
    trust.add(Path(f"{author}.pub"))
    trust.save()
    envelope = dsse.sign(
        json.dumps(policy_doc(f"http://127.0.0.1:{upstream_port}")).encode(),
        [signing_keys.load_signing_key(Path(f"{author}.key"))],
    )
    with home.open_vault() as vault:
        vault.policies.activate(importer.verify_bundle(envelope, trust, site=SITE, current_version=None))
        vault.keys.set("openai", "sk-bench-0000000000000000")
        token = vault.tokens.issue("bench-app", "stmarys", "radiology")
    return home, token


def _load(
    port: int,
    path: str,
    body: str,
    connections: int,
    seconds: float,
    cpus: set[int] | None,
    headers: list[str],
) -> dict[str, float]:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    args = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        "--port",
        str(port),
        "--path",
        path,
        "--body",
        body,
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
    ]
    for header in headers:
        args += ["--header", header]
    out = subprocess.run(args, check=True, capture_output=True, text=True, preexec_fn=pin)
    return dict(json.loads(out.stdout))


def _tls_load(
    port: int,
    body: str,
    connections: int,
    seconds: float,
    cpus: set[int] | None,
    headers: list[str],
    *,
    cafile: Path | None,
    new_connection: bool,
) -> dict[str, float]:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    args = [sys.executable, "-m", "bench.tls_loadgen", "--port", str(port), "--body", body]
    args += ["--connections", str(connections), "--seconds", str(seconds)]
    if cafile is not None:
        args += ["--cafile", str(cafile)]
    if new_connection:
        args.append("--new-connection")
    for header in headers:
        args += ["--header", header]
    out = subprocess.run(args, check=True, capture_output=True, text=True, preexec_fn=pin, cwd=ROOT)
    return dict(json.loads(out.stdout))


def _gateway_cmd(home: Home, port: int) -> list[str]:
    serve = [sys.executable, "-m", "appliance", "serve", "--home", str(home.root)]
    return [*serve, "--host", "127.0.0.1", "--port", str(port)]


@dataclass(frozen=True)
class _Run:
    """What every measurement of one benchmark run shares."""

    seconds: float
    cpus: set[int] | None  # the load generator's
    auth: list[str]

    def plain(self, port: int, body: str, connections: int, headers: list[str]) -> dict[str, float]:
        return _load(port, "/v1/chat/completions", body, connections, self.seconds, self.cpus, headers)

    def tls(
        self, port: int, connections: int, cafile: Path | None, *, new_connection: bool
    ) -> dict[str, float]:
        return _tls_load(
            port,
            CHAT % ("openai/gpt-4o", ""),
            connections,
            self.seconds,
            self.cpus,
            self.auth,
            cafile=cafile,
            new_connection=new_connection,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    ap.add_argument("--connections", default="1,16,64")
    ap.add_argument(
        "--no-pin", action="store_true", help="let the gateway use every CPU (its writer thread too)"
    )
    args = ap.parse_args()
    gw_cpus, other_cpus = _cpus()
    levels = [int(c) for c in args.connections.split(",")]
    up_port, gw_port, tls_port = free_port(), free_port(), free_port()
    rows: list[tuple[str, dict[str, float]]] = []
    pinned = None if args.no_pin else gw_cpus
    with tempfile.TemporaryDirectory(prefix="phi-bench-") as tmp:
        home, token = _prepare_home(Path(tmp), up_port)
        run = _Run(args.seconds, other_cpus, [f"Authorization: Bearer {token}"])
        audit_file = open(Path(tmp) / "audit.jsonl", "w")
        upstream_cmd = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(up_port), "--fast"]
        plain, routed = CHAT % ("gpt-4o", ""), CHAT % ("openai/gpt-4o", "")
        with _process(upstream_cmd, other_cpus):
            wait_port(up_port, timeout=30.0)
            with _process(_gateway_cmd(home, gw_port), pinned, stdout=audit_file):
                wait_port(gw_port, timeout=30.0)
                _load(
                    gw_port, "/v1/chat/completions", routed, 4, 1.0, other_cpus, run.auth
                )  # warm both paths
                for conns in levels:
                    rows.append((f"direct {conns:>3} conn", run.plain(up_port, plain, conns, [])))
                    rows.append((f"gateway {conns:>3} conn", run.plain(gw_port, routed, conns, run.auth)))
                for conns in (1, 16):
                    rows.append(
                        (f"gw new conn {conns:>3}", run.tls(gw_port, conns, None, new_connection=True))
                    )
                stream_direct, stream_gw = _streams(up_port, gw_port, run)
            # The same home given a certificate: the next gateway speaks TLS only.
            cafile = Path(tmp) / "gateway-ca.pem"
            pair = TlsMaterial(home.root).install(*certificates.self_signed(["127.0.0.1"], 30))
            cafile.write_bytes(pair.certificate_pem)
            with _process(_gateway_cmd(home, tls_port), pinned, stdout=audit_file):
                wait_port(tls_port, timeout=30.0)
                _tls_load(tls_port, routed, 4, 1.0, other_cpus, run.auth, cafile=cafile, new_connection=False)
                for conns in levels:
                    rows.append(
                        (f"gw TLS {conns:>3} conn", run.tls(tls_port, conns, cafile, new_connection=False))
                    )
                for conns in (1, 16):
                    rows.append(
                        (f"TLS new conn {conns:>3}", run.tls(tls_port, conns, cafile, new_connection=True))
                    )
        audit_file.close()
        audit_lines = sum(1 for _ in open(Path(tmp) / "audit.jsonl"))
    _print(rows, stream_direct, stream_gw, audit_lines, gw_cpus)


def _streams(up_port: int, gw_port: int, run: _Run) -> tuple[dict[str, float], dict[str, float]]:
    """Streaming time to first byte at 1 connection, direct and through the gateway."""
    direct = run.plain(up_port, CHAT % ("gpt-4o", ',"stream":true'), 1, [])
    gateway = run.plain(gw_port, CHAT % ("openai/gpt-4o", ',"stream":true'), 1, run.auth)
    return direct, gateway


def _print(
    rows: list[tuple[str, dict[str, float]]],
    sd: dict[str, float],
    sg: dict[str, float],
    audit_lines: int,
    gw_cpus: set[int] | None,
) -> None:
    print(
        f"\nPhi Gateway overhead benchmark ({os.cpu_count()} CPUs; gateway pinned to {gw_cpus or 'no CPU'})"
    )
    print(f"{'case':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'connect ms':>12}")
    for name, r in rows:
        connect = r.get("connect_p50_ms", float("nan"))
        shown = f"{connect:>12.3f}" if connect == connect else f"{'':>12}"  # NaN: a keep-alive row
        print(
            f"{name:<22}{r['req_per_s']:>10.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{int(r['errors']):>8}{shown}"
        )
    by = {" ".join(name.split()): r for name, r in rows}
    print(
        f"\nstreaming time to first byte (1 conn): direct {sd['ttfb_p50_ms']:.3f} ms, "
        f"gateway {sg['ttfb_p50_ms']:.3f} ms (+{sg['ttfb_p50_ms'] - sd['ttfb_p50_ms']:.3f} ms)"
    )
    if "direct 1 conn" in by and "gateway 1 conn" in by:
        added = by["gateway 1 conn"]["p50_ms"] - by["direct 1 conn"]["p50_ms"]
        print(
            f"added p50 at 1 connection: {added:.3f} ms "
            f"(target <= 0.30 ms: {'met' if added <= 0.30 else 'MISSED'})"
        )
    if "gateway 16 conn" in by:
        rps = by["gateway 16 conn"]["req_per_s"]
        print(
            f"gateway req/s at 16 connections: {rps:.0f} "
            f"(target >= 12,000: {'met' if rps >= 12000 else 'MISSED'})"
        )
    if "TLS new conn 1" in by and "gw new conn 1" in by:
        handshake = by["TLS new conn 1"]["connect_p50_ms"] - by["gw new conn 1"]["connect_p50_ms"]
        print(
            f"TLS handshake (ECDSA P-256, TLS 1.3, full): {handshake:.3f} ms a new connection beyond TCP's "
            f"(p50, 1 conn); {by['TLS new conn 16']['req_per_s']:.0f} handshakes+requests/s at 16 connections"
        )
    if "gw TLS 16 conn" in by and "gateway 16 conn" in by:
        ratio = by["gw TLS 16 conn"]["req_per_s"] / by["gateway 16 conn"]["req_per_s"]
        print(f"keep-alive over TLS at 16 connections: {ratio:.0%} of plain HTTP's req/s")
    print(f"audit lines written during the run: {audit_lines}")


if __name__ == "__main__":
    main()
