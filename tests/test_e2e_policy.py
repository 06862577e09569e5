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
    assert "delete_record" in actions["tool_dropped"]["detail"]


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
