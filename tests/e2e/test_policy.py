"""End to end: the Police phase's refusals and actions, through the real OpenAI SDK, with their records."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc


def _doc(upstream: FakeUpstream) -> dict[str, Any]:
    doc = policy_doc(upstream.base_url)
    doc["routes"]["nonbaa"] = {
        "kind": "openai",
        "base_url": f"{upstream.base_url}/v1",
        "auth": "none",
        "data_classes": ["deidentified", "public"],
    }
    doc["aliases"] = {"clinical-summary": "openai/gpt-4o-mini"}
    roles = doc["organizations"]["stmarys"]["roles"]
    roles["radiology"]["models"].append("nonbaa/*")
    roles["research"] = {
        "models": ["nonbaa/*", "openai/*"],
        "declarable_data_classes": ["deidentified"],
        "tools": {"allow": ["lookup_*"], "on_violation": "drop"},
        "prompt": {
            "max_tokens": 100,
            "deny_patterns": [{"id": "ssn", "pattern": "[0-9]{3}-[0-9]{2}-[0-9]{4}"}],
        },
    }
    return doc


@pytest.fixture
def h(tmp_path: Path, upstream: FakeUpstream) -> Iterator[GatewayHarness]:
    harness = GatewayHarness(tmp_path)
    harness.import_policy(_doc(upstream))
    harness.set_provider_keys()
    harness.start()
    yield harness
    harness.stop()


def _client(h: GatewayHarness, token: str, data_class: str | None = None) -> openai.OpenAI:
    headers = {"X-Phi-Data-Class": data_class} if data_class else None
    return openai.OpenAI(
        base_url=h.base_url, api_key=token, max_retries=0, timeout=10, default_headers=headers
    )


def _records(h: GatewayHarness, kind: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in h.audit.records() if r["type"] == kind]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


MESSAGES = [{"role": "user", "content": "summarise"}]


def test_phi_never_reaches_a_route_that_may_not_receive_it(h: GatewayHarness, upstream: FakeUpstream) -> None:
    token = h.issue("radiology-bot")
    before = len(upstream.requests)
    with _client(h, token) as client, pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="nonbaa/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert err.value.body["code"] == "data_class_denied"  # type: ignore[index]
    with _client(h, token, "deidentified") as client, pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="nonbaa/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert err.value.body["code"] == "data_class_downgrade"  # type: ignore[index]
    assert len(upstream.requests) == before
    denied = _records(h, "intervention", 2)
    assert [r["intervention"] for r in denied] == ["data_class_denied", "data_class_denied"]
    assert denied[0]["rule"] == "routes.nonbaa.data_classes" and denied[0]["data_class"] == "phi"


def test_a_role_that_may_declare_deidentified_reaches_the_non_baa_route(
    h: GatewayHarness, upstream: FakeUpstream
) -> None:
    token = h.issue("research-bot", role="research")
    with _client(h, token, "deidentified") as client:
        reply = client.chat.completions.create(model="nonbaa/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from gpt-4o"
    response = next(r for r in _records(h, "response", 1) if r["route"] == "nonbaa")
    assert response["data_class"] == "deidentified"


def test_tools_outside_the_allow_list_are_dropped_and_max_tokens_clamped(
    h: GatewayHarness, upstream: FakeUpstream
) -> None:
    token = h.issue("research-bot", role="research")
    tools = [
        {"type": "function", "function": {"name": "lookup_patient", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "delete_record", "parameters": {"type": "object"}}},
    ]
    with _client(h, token) as client:
        client.chat.completions.create(
            model="openai/gpt-4o",
            messages=MESSAGES,
            tools=tools,
            max_tokens=5000,  # type: ignore[arg-type]
        )
    sent = json.loads(upstream.requests[-1][3])
    assert [t["function"]["name"] for t in sent["tools"]] == ["lookup_patient"] and sent["max_tokens"] == 100
    actions = {r["intervention"]: r for r in _records(h, "intervention", 2)}
    assert set(actions) == {"tool_dropped", "max_tokens_clamped"}
    assert actions["tool_dropped"]["rule"].endswith("roles.research.tools.allow")
    # The count, not the names: tool names are caller text, and ledger rows cannot be purged.
    assert actions["tool_dropped"]["detail"] == "dropped 1 tool(s)"


def test_deny_patterns_refuse_the_prompt_without_recording_it(
    h: GatewayHarness, upstream: FakeUpstream
) -> None:
    token = h.issue("research-bot", role="research")
    before = len(upstream.requests)
    ssn = "123-45-6789"
    with _client(h, token) as client, pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(
            model="openai/gpt-4o", messages=[{"role": "user", "content": f"patient {ssn}"}]
        )
    assert err.value.body["code"] == "prompt_denied" and ssn not in str(err.value.body)  # type: ignore[index]
    assert len(upstream.requests) == before
    record = _records(h, "intervention", 1)[0]
    assert record["intervention"] == "prompt_denied" and record["rule"].endswith("prompt.deny_patterns[0]")
    assert ssn not in h.audit.text


def test_an_alias_routes_to_its_model_and_is_recorded(h: GatewayHarness, upstream: FakeUpstream) -> None:
    token = h.issue("radiology-bot")
    with _client(h, token) as client:
        client.chat.completions.create(model="clinical-summary", messages=MESSAGES)  # type: ignore[arg-type]
    assert json.loads(upstream.requests[-1][3])["model"] == "gpt-4o-mini"
    aliased = _records(h, "intervention", 1)[0]
    assert aliased["intervention"] == "model_aliased" and aliased["rule"] == "aliases.clinical-summary"
    assert aliased["model"] == "clinical-summary" and aliased["route"] == "openai"
    with _client(h, token) as client:
        assert "clinical-summary" in [m.id for m in client.models.list()]


def _limited(
    h_path: Path, upstream: FakeUpstream, role_extra: dict[str, Any], **doc_extra: Any
) -> GatewayHarness:
    doc = _doc(upstream)
    doc["organizations"]["stmarys"]["roles"]["capped"] = {"models": ["openai/*"], **role_extra}
    doc.update(doc_extra)
    h = GatewayHarness(h_path)
    h.import_policy(doc)
    h.set_provider_keys()
    h.start()
    return h


def test_requests_per_minute_stop_at_the_cap_with_retry_after(tmp_path: Path, upstream: FakeUpstream) -> None:
    h = _limited(tmp_path, upstream, {"limits": {"per_caller": {"requests_per_min": 3}}})
    token = h.issue("capped-bot", role="capped")
    try:
        with _client(h, token) as client:
            for _ in range(3):
                client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert int(err.value.response.headers["retry-after"]) >= 1
        record = _records(h, "intervention", 1)[0]
        assert record["intervention"] == "rate_limited" and record["status_code"] == 429
        assert record["rule"] == "organizations.stmarys.roles.capped.limits.per_caller.requests_per_min"
    finally:
        h.stop()


def test_a_spend_cap_holds_under_64_parallel_requests_and_survives_a_restart(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    import concurrent.futures

    # gpt-4o at 2.5/10 USD per Mtok. Each request reserves ~3 prompt tokens (9 characters / 4) and its
    # max_tokens (4): 0.0000475 USD; the fake upstream reports 1 + 4 tokens: 0.0000425 USD actually spent.
    # A cap of 0.0002 USD a day therefore admits 4 requests, and never lets spend pass the cap.
    cap = 0.0002
    extra = {"budgets": {"per_caller": {"usd_per_day": cap}}}
    h = _limited(tmp_path, upstream, extra)
    token = h.issue("capped-bot", role="capped")

    def one(_: int) -> int:
        with _client(h, token) as client:
            try:
                client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
            except openai.RateLimitError:
                return 429
            return 200

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(64)))
        admitted = statuses.count(200)
        assert admitted == 4 and statuses.count(429) == 60, statuses
        spent = sum(r["cost_usd"] for r in _records(h, "response", admitted))
        assert spent <= cap
    finally:
        h.stop()
    # A restart rebuilds spend from the ledger: the caller stays capped for the rest of the day.
    h2 = GatewayHarness.__new__(GatewayHarness)
    h2.__dict__.update(h.__dict__)
    h2.audit = type(h.audit)()
    h2.start()
    try:
        with _client(h2, token) as client:
            for _ in range(6):
                try:
                    client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
                except openai.RateLimitError:
                    break
            else:
                raise AssertionError("the budget was forgotten across the restart")
    finally:
        h2.stop()


def test_a_route_that_is_down_falls_back_to_the_next_allowed_model(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    h = _limited(
        tmp_path,
        upstream,
        {},
        fallbacks={"openai/fail-500": ["openai/gpt-4o-mini"]},
    )
    token = h.issue("capped-bot", role="capped")
    try:
        with _client(h, token) as client:
            reply = client.chat.completions.create(model="openai/fail-500", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "Hello from gpt-4o-mini"
        fell = _records(h, "intervention", 1)[0]
        assert fell["intervention"] == "fallback" and fell["rule"] == "fallbacks.openai/fail-500[0]"
        assert fell["detail"] == "openai/fail-500 -> openai/gpt-4o-mini after upstream_error"
        response = _records(h, "response", 1)[0]
        assert response["status_code"] == 200 and response["cost_usd"] > 0  # priced as gpt-4o-mini
    finally:
        h.stop()


def test_a_fallback_cannot_escape_the_budget(tmp_path: Path, upstream: FakeUpstream) -> None:
    # The primary is unpriced (free), its fallback is gpt-4o: the reservation is priced as the dearer.
    h = _limited(
        tmp_path,
        upstream,
        {"budgets": {"per_caller": {"usd_per_day": 0.0002}}},
        fallbacks={"openai/fail-500": ["openai/gpt-4o"]},
    )
    token = h.issue("capped-bot", role="capped")
    statuses = []
    try:
        with _client(h, token) as client:
            for _ in range(12):
                try:
                    client.chat.completions.create(model="openai/fail-500", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
                    statuses.append(200)
                except openai.RateLimitError:
                    statuses.append(429)
        assert statuses.count(200) == 4 and statuses[4:] == [429] * 8
    finally:
        h.stop()


def test_a_forced_model_never_writes_the_callers_text_into_the_ledger(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    h = _limited(tmp_path, upstream, {"force_model": "openai/gpt-4o-mini"})
    token = h.issue("capped-bot", role="capped")
    pasted = "John Smith MRN 4471"
    try:
        with _client(h, token) as client:
            client.chat.completions.create(model=pasted, messages=MESSAGES)  # type: ignore[arg-type]
        forced = _records(h, "intervention", 1)[0]
        assert forced["intervention"] == "model_forced" and "John" not in h.audit.text
    finally:
        h.stop()
