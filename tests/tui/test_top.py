"""``phi-gateway top`` against a real gateway (the numbers, in 80 columns) and against none (exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from appliance.cli.console import top_cmd, top_lines
from tests.support.gateway import GatewayHarness
from tests.tui.conftest import REQUESTS, BusyGateway
from tests.tui.fixed import ACTIVITY, SOCKET


def test_top_prints_the_numbers(busy_gateway: BusyGateway) -> None:
    result = CliRunner().invoke(
        top_cmd, ["--home", str(busy_gateway.harness.home.root)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    text = result.stdout
    for label in ("now (last 10 s)", "requests", "errors", "p50", "p99", "tokens", "in flight", "since start",
                  "spend today", "ledger", "last checkpoint", "policy  version 1, expires in"):  # fmt: skip
        assert label in text, label
    assert f"since start      {REQUESTS} requests" in text
    assert "console-test" in text  # today's spend by caller


def test_top_json(busy_gateway: BusyGateway) -> None:
    result = CliRunner().invoke(top_cmd, ["--home", str(busy_gateway.harness.home.root), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["totals"]["requests"] == REQUESTS
    assert len(doc["series"]["requests_per_s"]) == doc["window_s"]


def test_top_exits_1_when_no_gateway_runs(tmp_path: Path) -> None:
    home = GatewayHarness(tmp_path).home  # initialised, never started
    result = CliRunner().invoke(top_cmd, ["--home", str(home.root)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "error: no gateway is running for this home" in result.stderr
    assert str(home.admin_socket) in result.stderr


def test_top_fits_80_columns_with_every_section() -> None:
    lines = top_lines(ACTIVITY, SOCKET)
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    needles = ["radiology-reports", "anthropic", "local/tiny", "3,912,447 records", "1m 39s ago"]
    needles += ["version 14, expires in 27d 11h", "44.7/s requests", "p99 1,043 ms", "in flight 17"]
    for needle in needles:
        assert needle in text, needle
