"""Policy lifecycle as an operator sees it: remaining validity in /health, and warning lines at 14, 7 and 1
days before the policy in force expires (after which every request is refused)."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.admin.client import AdminClient
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc


def _expiring_in(upstream: FakeUpstream, left: timedelta, version: int = 1) -> dict[str, Any]:
    doc = policy_doc(upstream.base_url, version=version)
    doc["expires_at"] = (datetime.now(UTC) + left).strftime("%Y-%m-%dT%H:%M:%SZ")
    return doc


@pytest.fixture
def h(tmp_path: Path) -> Iterator[GatewayHarness]:
    harness = GatewayHarness(tmp_path)
    yield harness
    harness.stop()


def _health(h: GatewayHarness) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{h.port}/health", timeout=5) as response:
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def test_health_shows_the_remaining_validity(h: GatewayHarness, upstream: FakeUpstream) -> None:
    h.import_policy(_expiring_in(upstream, timedelta(days=20)))
    h.start()
    left = _health(h)["policy"]["expires_in_s"]
    assert 20 * 86400 - 120 <= left <= 20 * 86400


def test_a_gateway_started_close_to_expiry_warns_once_for_the_threshold_it_is_under(
    h: GatewayHarness, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    h.import_policy(_expiring_in(upstream, timedelta(days=5)))
    with caplog.at_level(logging.WARNING, logger="phi.policy"):
        h.start()
    warnings = [r.getMessage() for r in caplog.records if "expires in" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("policy v1 expires in 4 days 23 h")
    assert "import a renewed bundle" in warnings[0]


def test_each_threshold_warns_once_per_policy_version(h: GatewayHarness, upstream: FakeUpstream) -> None:
    h.import_policy(_expiring_in(upstream, timedelta(days=30)))
    h.start()
    keeper = h.gateway.keeper
    assert keeper is not None and keeper.current is not None
    expires = keeper.current.policy.expires_at
    seen = []
    for days_left in (20, 14, 13.5, 10, 7, 6.9, 3, 1, 0.5, 0.01):
        message = keeper.warn_of_expiry(expires - timedelta(days=days_left))
        seen.append(None if message is None else message.split(" (")[0])
    assert seen == [
        None,
        "policy v1 expires in 14 days 0 h",
        None,
        None,
        "policy v1 expires in 7 days 0 h",
        None,
        None,
        "policy v1 expires in 1 day 0 h",
        None,
        None,
    ]
    # a renewed bundle that also expires soon starts the thresholds again for its own version
    h.import_policy(_expiring_in(upstream, timedelta(days=10), version=2))
    keeper.refresh(force=True)
    assert keeper.current is not None and keeper.current.version == 2
    assert keeper.warn_of_expiry() is not None and keeper.warn_of_expiry() is None


def _metrics(h: GatewayHarness) -> dict[str, float]:
    text = AdminClient(h.home.admin_socket).text("/metrics")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_the_remaining_validity_is_a_metric_on_the_admin_socket(
    h: GatewayHarness, upstream: FakeUpstream
) -> None:
    h.import_policy(_expiring_in(upstream, timedelta(days=9)))
    h.start()
    token = h.issue("radiology-bot")
    values = _metrics(h)
    assert values["phi_policy_in_force"] == 1
    assert values["phi_policy_version"] == 1
    assert 9 * 86400 - 120 <= values["phi_policy_remaining_validity_seconds"] <= 9 * 86400
    expires = datetime.now(UTC) + timedelta(days=9)
    assert abs(values["phi_policy_expiry_timestamp_seconds"] - expires.timestamp()) < 120
    assert values["phi_ledger_writable"] == 1
    assert values["phi_tls_enabled"] == 0
    text = AdminClient(h.home.admin_socket).text("/metrics")
    assert token not in text and token.split(":")[1] not in text
