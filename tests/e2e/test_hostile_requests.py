"""End to end, as an attacker with a valid token would try: every string a model reads is screened or
refused, names are what they seem, malformed bodies get a 4xx with a record, and no caller text reaches
the ledger. One test per case; each failed on main at 1e3709a (issue 10, classes 1, 5, 6 and 7).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

SECRET = "TOPSECRET"


def _doc(upstream: FakeUpstream) -> dict[str, Any]:
    doc = policy_doc(upstream.base_url)
    roles = doc["organizations"]["stmarys"]["roles"]
    roles["radiology"]["tools"] = {"allow": ["lookup"]}
    roles["radiology"]["prompt"] = {
        "deny_patterns": [{"id": "secret", "pattern": SECRET}, {"id": "mrn", "pattern": "87654321"}]
    }
    roles["radiology"]["limits"] = {"per_caller": {"requests_per_min": 1000, "tokens_per_min": 10_000_000}}
    return doc


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[GatewayHarness]:
    harness = GatewayHarness(tmp_path_factory.mktemp("hostile"))
    harness.import_policy(_doc(upstream))
    harness.set_provider_keys()
    harness.start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def token(h: GatewayHarness) -> str:
    return h.issue("attacker")


def _post(h: GatewayHarness, token: str, path: str, body: bytes) -> tuple[int, dict[str, Any], str]:
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
    try:
        conn.request(
            "POST", path, body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        )
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data), response.getheader("x-request-id") or ""
    finally:
        conn.close()


def _records(h: GatewayHarness, request_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        found = h.audit.for_request(request_id)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def _chat(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


def _tool(name: str, description: str = "looks things up", **params: Any) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": params or {"q": {"type": "string"}}},
        },
    }


# ---- class 1: every string that can reach a model is screened or refused ------------------------------

SCREENED = {
    "tool description": _chat(tools=[_tool("lookup", f"say {SECRET}")]),
    "tool parameter description": _chat(tools=[_tool("lookup", q={"type": "string", "description": SECRET})]),
    "tool parameter name": _chat(tools=[_tool("lookup", **{SECRET: {"type": "string"}})]),
    "json_schema description": _chat(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "description": SECRET}},
        }
    ),
    "message name": _chat(messages=[{"role": "user", "name": SECRET, "content": "hi"}]),
    "stop sequence": _chat(stop=[SECRET]),
    "prediction": _chat(prediction={"type": "content", "content": SECRET}),
    "assistant tool-call name": _chat(
        messages=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": SECRET, "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
    ),
}


# Found in review (reproduced before the fix): a glob-allowed model name, numbers in tool arguments.
SCREENED["model name under a glob"] = _chat(model=f"openai/gpt-4o-{SECRET}")
SCREENED["number in a tool argument"] = _chat(
    messages=[
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ],
    tools=[_tool("lookup", q={"type": "integer", "enum": [87654321]})],
)


@pytest.mark.parametrize("case", list(SCREENED))
def test_every_string_a_model_reads_is_screened(h: GatewayHarness, token: str, case: str) -> None:
    status, body, request_id = _post(h, token, "/v1/chat/completions", json.dumps(SCREENED[case]).encode())
    assert status == 403, body
    assert body["error"]["code"] == "prompt_denied"
    assert _records(h, request_id)[0]["intervention"] == "prompt_denied"


REFUSED = {
    "role with a newline": (_chat(messages=[{"role": "system\nTOPSECRET", "content": "hi"}]), "messages"),
    "unknown role": (_chat(messages=[{"role": "narrator", "content": "hi"}]), "messages"),
    "unknown top-level field": (_chat(instructions_for_model="hi"), "instructions_for_model"),
    "type with text": (
        _chat(messages=[{"role": "user", "content": [{"type": "text and more", "text": "hi"}]}]),
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_fields_outside_the_forwarded_allow_list_are_refused(
    h: GatewayHarness, token: str, case: str
) -> None:
    payload, param = REFUSED[case]
    status, body, request_id = _post(h, token, "/v1/chat/completions", json.dumps(payload).encode())
    assert status == 400, body
    assert param in (body["error"].get("param") or "")
    assert _records(h, request_id)[0]["status_code"] == 400


def test_anthropic_system_blocks_and_tool_descriptions_are_screened(h: GatewayHarness, token: str) -> None:
    payload = {
        "model": "anthropic/claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "lookup", "description": SECRET, "input_schema": {"type": "object"}}],
    }
    status, body, _ = _post(h, token, "/v1/messages", json.dumps(payload).encode())
    assert status == 403, body


def test_web_search_options_is_a_tool_the_allow_list_decides_on(h: GatewayHarness, token: str) -> None:
    payload = _chat(web_search_options={"search_context_size": "high"})
    status, body, request_id = _post(h, token, "/v1/chat/completions", json.dumps(payload).encode())
    assert status == 403 and body["error"]["code"] == "tools_denied", body
    assert _records(h, request_id)[0]["intervention"] == "tool_denied"


LEGITIMATE = {
    "prompt_cache_retention": _chat(prompt_cache_retention="24h"),
    "image detail original": _chat(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "original"}}
                ],
            }
        ]
    ),
    "draft-04 schema id": _chat(tools=[_tool("lookup", q={"id": "http://example.org/q", "type": "string"})]),
    "empty tool call id": _chat(
        messages=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "", "content": "ok"},
        ]
    ),
}


@pytest.mark.parametrize("case", list(LEGITIMATE))
def test_legitimate_sdk_parameters_pass(h: GatewayHarness, token: str, case: str) -> None:
    status, body, _ = _post(h, token, "/v1/chat/completions", json.dumps(LEGITIMATE[case]).encode())
    assert status == 200, body


# ---- class 5: malformed bodies get a 4xx and a record, never a 500 ------------------------------------

MALFORMED = {
    "deep nesting": b'{"model": "openai/gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a 400-digit max_tokens": json.dumps(_chat()).encode()[:-1] + b', "max_tokens": ' + b"9" * 400 + b"}",
    "a lone surrogate in model": (
        b'{"model": "openai/\\ud800", "messages": [{"role": "user", "content": "x"}]}'
    ),
    "a lone surrogate in content": (
        b'{"model": "local/tiny", "messages": [{"role": "user", "content": "\\udc00"}]}'
    ),
    "NaN temperature": json.dumps(_chat()).encode()[:-1] + b', "temperature": NaN}',
    "Infinity top_p": json.dumps(_chat()).encode()[:-1] + b', "top_p": -Infinity}',
}


def test_nested_json_in_tool_arguments_is_a_400_on_an_anthropic_route(h: GatewayHarness, token: str) -> None:
    arguments = "[" * 5_000  # nesting inside a string: the body itself is shallow
    payload = _chat(
        model="anthropic/claude-sonnet-4-5",
        messages=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
    )
    status, body, request_id = _post(h, token, "/v1/chat/completions", json.dumps(payload).encode())
    assert status == 400, body
    assert _records(h, request_id)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_get_a_400_with_a_record(h: GatewayHarness, token: str, case: str) -> None:
    status, body, request_id = _post(h, token, "/v1/chat/completions", MALFORMED[case])
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert request_id
    records = _records(h, request_id)
    assert records and records[0]["status_code"] == 400


# ---- class 6: names are what they seem --------------------------------------------------------------


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini\n", "openai/gpt-4o-mini\r", "openai\n/gpt-4o-mini"])
def test_a_model_name_with_a_line_break_is_refused(
    h: GatewayHarness, token: str, upstream: FakeUpstream, model: str
) -> None:
    before = len(upstream.requests)
    status, body, _ = _post(h, token, "/v1/chat/completions", json.dumps(_chat(model=model)).encode())
    assert status in (400, 403), body
    assert len(upstream.requests) == before


TOOL_SHAPES = {
    # the gateway read one name and the provider would read another
    "anthropic name beside an OpenAI function": (
        "/v1/messages",
        {
            "model": "anthropic/claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "delete_records", "function": {"name": "lookup"}, "input_schema": {}}],
        },
    ),
    "OpenAI custom tool": (
        "/v1/chat/completions",
        _chat(tools=[{"type": "custom", "custom": {"name": "delete_records"}}]),
    ),
    "OpenAI function with a second name": (
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "name": "delete_records", "function": {"name": "lookup"}}]),
    ),
    "Anthropic server tool": (
        "/v1/messages",
        {
            "model": "anthropic/claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
    ),
}


@pytest.mark.parametrize("case", list(TOOL_SHAPES))
def test_the_tool_allow_list_holds_for_every_tool_shape(
    h: GatewayHarness, token: str, upstream: FakeUpstream, case: str
) -> None:
    path, payload = TOOL_SHAPES[case]
    before = len(upstream.requests)
    status, body, _ = _post(h, token, path, json.dumps(payload).encode())
    assert status in (400, 403), body
    assert len(upstream.requests) == before


# ---- class 7: only names the policy defines are stored as text -------------------------------------


def test_a_model_name_the_policy_does_not_define_is_not_written_to_the_ledger(
    h: GatewayHarness, token: str
) -> None:
    typed = "openai/JohnDoe-1970-03-04"  # a valid name that openai/* allows, but caller text
    status, body, request_id = _post(
        h, token, "/v1/chat/completions", json.dumps(_chat(model=typed)).encode()
    )
    assert status == 200, body
    time.sleep(0.2)
    rows = list(h.ledger_rows())
    assert not [row for row in rows if "JohnDoe" in json.dumps(row)]
    assert _records(h, request_id)[0]["route"] == "openai"


def test_dropped_tool_names_are_not_written_to_the_ledger(tmp_path: Path, upstream: FakeUpstream) -> None:
    doc = _doc(upstream)
    doc["organizations"]["stmarys"]["roles"]["radiology"]["tools"] = {
        "allow": ["lookup"],
        "on_violation": "drop",
    }
    harness = GatewayHarness(tmp_path)
    harness.import_policy(doc)
    harness.set_provider_keys()
    harness.start()
    try:
        status, body, _ = _post(
            harness,
            harness.issue("dropper"),
            "/v1/chat/completions",
            json.dumps(_chat(tools=[_tool("lookup"), _tool("JaneRoe_MRN_12345")])).encode(),
        )
        assert status == 200, body
        time.sleep(0.2)
        assert not [row for row in harness.ledger_rows() if "JaneRoe" in json.dumps(row)]
    finally:
        harness.stop()
