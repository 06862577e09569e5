"""``Activity``: what it counts as an answer, its per-second series, today's spend across a restart and a
midnight, and the bound on model labels a caller could otherwise grow."""

from __future__ import annotations

from typing import Any

import openai
from prometheus_client import CollectorRegistry

from appliance.activity import MAX_MODEL_LABELS, WINDOW_S, Activity
from appliance.admin.client import AdminClient
from tests.admin.conftest import Sdk, chat, wait_for
from tests.support.gateway import GatewayHarness

DAY = 86400.0


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _answer(**fields: Any) -> dict[str, Any]:
    record = {
        "type": "response",
        "decision": "allowed",
        "status_code": 200,
        "route": "openai",
        "model": "openai/gpt-4o-mini",
        "claw_id": "radiology-bot",
        "latency_ms": 10.0,
        "tokens_in": 3,
        "tokens_out": 5,
        "cost_usd": 0.5,
        "ts": None,
    }
    record.update(fields)
    return record


def test_only_answers_count_and_each_second_has_its_own_bucket() -> None:
    clock = _Clock(100 * DAY + 50)
    live = Activity(CollectorRegistry(), clock)
    live.take([(_answer(type="request", status_code=None), 1), (_answer(), 2)])
    clock.now += 1
    refused = _answer(type="intervention", decision="denied", status_code=403, intervention="policy_denied")
    live.take([(refused, 3), (_answer(type="intervention", decision="allowed", intervention="fallback"), 4)])
    live.take([(_answer(type="admin", status_code=None), 5)])
    doc = live.series()
    assert doc["series"]["requests_per_s"][-2:] == [1.0, 1.0]
    assert doc["series"]["error_rate"][-2:] == [0.0, 1.0]
    assert doc["series"]["tokens_per_s"][-2:] == [5.0, 5.0]
    assert len(doc["series"]["p50_ms"]) == WINDOW_S
    assert live.totals == {"requests": 2, "errors": 0, "refusals": 1, "tokens_in": 6, "tokens_out": 10}
    clock.now += WINDOW_S
    assert sum(live.series()["series"]["requests_per_s"]) == 0  # the window moved past them


def test_spend_today_starts_again_at_midnight() -> None:
    clock = _Clock(100 * DAY - 1)
    live = Activity(CollectorRegistry(), clock)
    live.take([(_answer(cost_usd=2.0), 1)])
    assert live.spend_today()["total_usd"] == 2.0
    clock.now += 2
    assert live.spend_today() == {"date": "1970-04-11", "total_usd": 0.0, "by_caller": [], "by_route": []}
    live.take([(_answer(cost_usd=0.25, claw_id="lab-bot"), 2)])
    spend = live.spend_today()
    assert spend["total_usd"] == 0.25 and [row["caller"] for row in spend["by_caller"]] == ["lab-bot"]


def test_model_labels_are_bounded() -> None:
    live = Activity(CollectorRegistry(), _Clock(100 * DAY))
    live.take([(_answer(model=f"openai/made-up-{i}"), i) for i in range(MAX_MODEL_LABELS + 50)])
    live.drain()
    labels = {s.labels["model"] for s in live.requests.collect()[0].samples}
    assert len(labels) == MAX_MODEL_LABELS + 1 and "other" in labels


def test_spend_today_is_rebuilt_from_the_ledger_after_a_restart(harness: GatewayHarness, sdk: Sdk) -> None:
    client: openai.OpenAI = sdk(harness, harness.issue("radiology-bot"))
    for _ in range(3):
        chat(client)
    admin = AdminClient(harness.home.admin_socket, timeout=30)
    before = wait_for(
        lambda: (
            (s := admin.call("GET", "/admin/activity")["spend_today"])["by_caller"]
            and s["by_caller"][0]["requests"] == 3
            and s
        )
    )
    harness.stop()
    harness.start()
    after = admin.call("GET", "/admin/activity")
    assert after["spend_today"] == before
    assert after["totals"]["requests"] == 0  # counters start again with the process, as Prometheus expects
