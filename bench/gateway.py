"""Gateway overhead benchmark: direct to a fake upstream versus through the full pipeline.

Starts, on loopback only, a fast fake OpenAI-compatible upstream and a real gateway (identity, policy,
durable audit ledger with group commit, audit lines to a file as a log shipper would read them), then
drives both with ``bench/loadgen.py`` in its own process at 1, 16 and 64 connections, and measures
streaming time to first byte. On a machine with 2 or more CPUs the gateway is pinned to CPU 0 and the
upstream and load generator to the others, so the gateway's own cost is what is measured.

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
from pathlib import Path

from appliance import signing_keys
from appliance.home import Home
from appliance.policy import dsse, importer
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
    up_port, gw_port = free_port(), free_port()
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="phi-bench-") as tmp:
        home, token = _prepare_home(Path(tmp), up_port)
        auth = [f"Authorization: Bearer {token}"]
        audit_file = open(Path(tmp) / "audit.jsonl", "w")
        upstream_cmd = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(up_port), "--fast"]
        gateway_cmd = [
            sys.executable,
            "-m",
            "appliance",
            "serve",
            "--home",
            str(home.root),
            "--host",
            "127.0.0.1",
            "--port",
            str(gw_port),
        ]
        with (
            _process(upstream_cmd, other_cpus),
            _process(gateway_cmd, None if args.no_pin else gw_cpus, stdout=audit_file),
        ):
            wait_port(up_port, timeout=30.0)
            wait_port(gw_port, timeout=30.0)
            plain = CHAT % ("gpt-4o", "")
            routed = CHAT % ("openai/gpt-4o", "")
            _load(gw_port, "/v1/chat/completions", routed, 4, 1.0, other_cpus, auth)  # warm both paths
            for conns in levels:
                rows.append(
                    (
                        f"direct    {conns:>3} conn",
                        _load(up_port, "/v1/chat/completions", plain, conns, args.seconds, other_cpus, []),
                    )
                )
                rows.append(
                    (
                        f"gateway   {conns:>3} conn",
                        _load(gw_port, "/v1/chat/completions", routed, conns, args.seconds, other_cpus, auth),
                    )
                )
            stream_direct = _load(
                up_port,
                "/v1/chat/completions",
                CHAT % ("gpt-4o", ',"stream":true'),
                1,
                args.seconds,
                other_cpus,
                [],
            )
            stream_gw = _load(
                gw_port,
                "/v1/chat/completions",
                CHAT % ("openai/gpt-4o", ',"stream":true'),
                1,
                args.seconds,
                other_cpus,
                auth,
            )
        audit_file.close()
        audit_lines = sum(1 for _ in open(Path(tmp) / "audit.jsonl"))
    _print(rows, stream_direct, stream_gw, audit_lines, gw_cpus)


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
    print(f"{'case':<20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, r in rows:
        print(f"{name:<20}{r['req_per_s']:>10.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{int(r['errors']):>8}")
    by = {name.split()[0] + name.split()[1]: r for name, r in rows}
    print(
        f"\nstreaming time to first byte (1 conn): direct {sd['ttfb_p50_ms']:.3f} ms, "
        f"gateway {sg['ttfb_p50_ms']:.3f} ms (+{sg['ttfb_p50_ms'] - sd['ttfb_p50_ms']:.3f} ms)"
    )
    if "direct1" in by and "gateway1" in by:
        added = by["gateway1"]["p50_ms"] - by["direct1"]["p50_ms"]
        print(
            f"added p50 at 1 connection: {added:.3f} ms "
            f"(target <= 0.30 ms: {'met' if added <= 0.30 else 'MISSED'})"
        )
    if "gateway16" in by:
        rps = by["gateway16"]["req_per_s"]
        print(
            f"gateway req/s at 16 connections: {rps:.0f} "
            f"(target >= 12,000: {'met' if rps >= 12000 else 'MISSED'})"
        )
    print(f"audit lines written during the run: {audit_lines}")


if __name__ == "__main__":
    main()
