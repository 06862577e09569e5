"""The soak and fault drills (``bench/soak.py``, ``bench/faults.py``) and the overhead bench still run,
briefly.

The full drills take minutes (``./dev soak``, ``./dev faults``); here each runs as its own process, as an
operator would start it: the soak for about ten seconds on eight connections, and the cheap fault rows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHEAP_FAULTS = ("upstream-refused", "garbage-not-http", "upstream-midstream")


def _drill(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_a_short_soak_passes_and_prints_its_table() -> None:
    done = _drill("bench.soak", "--minutes", "0.17", "--connections", "8")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for row in ("requests sent", "answers by status", "unexpected errors", "gateway RSS", "open fds"):
        assert row in output, output
    assert "audit verify" in output and "ok:" in output, output
    assert "result: PASS" in output, output


def test_the_fault_drill_lists_its_scenarios() -> None:
    done = _drill("bench.faults", "--list")
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    for name in (*CHEAP_FAULTS, "upstream-stall", "huge-json", "disk-full", "clock-step", "sigkill"):
        assert name in names, done.stdout


def test_the_fault_drill_refuses_an_unknown_scenario() -> None:
    done = _drill("bench.faults", "--only", "no-such-row")
    assert done.returncode == 2 and "unknown scenario" in done.stderr, done.stderr


def test_cheap_fault_rows_pass() -> None:
    done = _drill("bench.faults", *(arg for name in CHEAP_FAULTS for arg in ("--only", name)))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for name in (*CHEAP_FAULTS, "shared-ledger"):
        assert f"PASS  {name}" in output, output
    assert not [line for line in output.splitlines() if line.startswith("FAIL")], output


def test_the_overhead_bench_runs_briefly_with_its_tls_rows() -> None:
    """``./dev bench`` (``bench/gateway.py``): plain and TLS rows, the handshake line, from one run."""
    done = _drill("bench.gateway", "--seconds", "0.3")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for row in ("gateway   1 conn", "gw TLS  16 conn", "TLS new conn   1", "gw new conn   1"):
        assert row in output, output
    assert "TLS handshake (ECDSA P-256" in output and "keep-alive over TLS at 16 connections" in output, (
        output
    )
