"""Reading the Police phase's facts from OpenAI and Anthropic bodies, and writing its edits back."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.errors import BadRequest
from appliance.pipeline.facts import BodyFacts, apply_edits, read_facts

OPENAI = {
    "model": "openai/gpt-4o",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "MRN 1234"}, {"type": "image_url"}]},
    ],
    "tools": [
        {"type": "function", "function": {"name": "lookup_patient"}},
        {"type": "function", "function": {"name": "search"}},
    ],
    "max_tokens": 900,
}
ANTHROPIC = {
    "model": "anthropic/claude",
    "system": "be careful",
    "messages": [{"role": "user", "content": "hello"}],
    "tools": [{"name": "lookup_patient", "input_schema": {}}],
    "max_tokens": 64,
}


def read_facts_of(endpoint: str, body: dict[str, Any], header: str | None) -> BodyFacts:
    return read_facts(body, endpoint, header)


def test_openai_body() -> None:
    facts = read_facts(OPENAI, "chat", "Deidentified ")
    assert facts.data_class == "deidentified"
    assert facts.tools == ["lookup_patient", "search"]
    # Tool names reach the model, and the model name the provider: both are text to screen.
    assert facts.message_count == 2
    assert facts.text == "openai/gpt-4o\nbe brief\nMRN 1234\nlookup_patient\nsearch"
    assert facts.max_tokens == 900


def test_anthropic_body_and_no_header() -> None:
    facts = read_facts(ANTHROPIC, "messages", None)
    assert facts.data_class is None and facts.tools == ["lookup_patient"]
    assert facts.text == "anthropic/claude\nbe careful\nhello\nlookup_patient" and facts.max_tokens == 64


def test_completions_and_embeddings_text() -> None:
    assert read_facts_of("completions", {"prompt": "abc"}, None).text == "abc"
    assert read_facts_of("embeddings", {"input": ["a", "b"]}, None).text == "a\nb"


def test_text_is_complete_and_its_length_exact() -> None:
    facts = read_facts_of("chat", {"messages": [{"role": "user", "content": "x" * 200_000}]}, None)
    assert len(facts.text) == 200_000 == facts.text_len  # the policy engine bounds its own scan


@pytest.mark.parametrize("header", ["secret", "PHI;", ""])
def test_unknown_data_class_is_400(header: str) -> None:
    with pytest.raises(BadRequest, match="X-Phi-Data-Class"):
        read_facts(OPENAI, "chat", header)


def test_tools_without_names_are_400() -> None:
    with pytest.raises(BadRequest):
        read_facts_of("chat", {"tools": [{"type": "function"}]}, None)
    with pytest.raises(BadRequest):
        read_facts_of("chat", {"tools": "lookup"}, None)


def test_edits() -> None:
    body = {**OPENAI, "tools": list(OPENAI["tools"]), "tool_choice": "auto"}  # type: ignore[arg-type]
    apply_edits(body, model="gpt-4o-mini", drop_tools=["search"], max_tokens=256)
    assert body["model"] == "gpt-4o-mini" and body["max_tokens"] == 256
    assert [t["function"]["name"] for t in body["tools"]] == ["lookup_patient"]
    apply_edits(body, model="x", drop_tools=["lookup_patient"], max_tokens=None)
    assert "tools" not in body and "tool_choice" not in body and body["max_tokens"] == 256


def test_every_text_a_model_reads_is_scanned() -> None:
    body = {
        "system": [{"type": "text", "text": "sys 111-11-1111"}],
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"ssn": "222-22-2222"}'},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "333-33-3333"},
                    {"type": "tool_result", "content": [{"type": "text", "text": "444"}]},
                    {"type": "tool_use", "id": "u1", "name": "g", "input": {"q": "555"}},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                ],
            },
        ],
    }
    text = read_facts(body, "messages", None).text
    for needle in ("111-11-1111", "222-22-2222", "333-33-3333", "444", "555"):
        assert needle in text
    assert "AAAA" not in text  # an image payload is not text; ids are screened as well as shaped


def test_legacy_functions_count_as_tools_and_are_dropped() -> None:
    body = {
        "functions": [{"name": "lookup"}, {"name": "delete_record"}],
        "function_call": {"name": "delete_record"},
    }
    assert read_facts(body, "chat", None).tools == ["lookup", "delete_record"]
    apply_edits(body, model="m", drop_tools=["delete_record"], max_tokens=None)
    assert body["functions"] == [{"name": "lookup"}] and "function_call" not in body


def test_a_tool_choice_naming_a_dropped_tool_goes_too() -> None:
    body = {"tools": [{"name": "keep"}, {"name": "drop"}], "tool_choice": {"type": "tool", "name": "drop"}}
    apply_edits(body, model="m", drop_tools=["drop"], max_tokens=None)
    assert body["tools"] == [{"name": "keep"}] and "tool_choice" not in body


def test_both_token_limits_count_and_are_both_clamped() -> None:
    body = {"max_completion_tokens": 10, "max_tokens": 100_000}
    assert read_facts(body, "chat", None).max_tokens == 100_000
    apply_edits(body, model="m", drop_tools=[], max_tokens=256)
    assert body["max_tokens"] == body["max_completion_tokens"] == 256
