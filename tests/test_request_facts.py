"""Reading the Police phase's facts from OpenAI and Anthropic bodies, and writing its edits back."""

from __future__ import annotations

import pytest

from appliance.errors import BadRequest
from appliance.request_facts import apply_edits, read_facts

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


def test_openai_body() -> None:
    facts = read_facts(OPENAI, "Deidentified ")
    assert facts.data_class == "deidentified"
    assert facts.tools == ["lookup_patient", "search"]
    assert facts.message_count == 2 and facts.text == "be brief\nMRN 1234" and facts.text_len == 16
    assert facts.max_tokens == 900


def test_anthropic_body_and_no_header() -> None:
    facts = read_facts(ANTHROPIC, None)
    assert facts.data_class is None and facts.tools == ["lookup_patient"]
    assert facts.text == "be careful\nhello" and facts.max_tokens == 64


def test_completions_and_embeddings_text() -> None:
    assert read_facts({"prompt": "abc"}, None).text == "abc"
    assert read_facts({"input": ["a", "b"]}, None).text == "a\nb"


def test_text_is_complete_and_its_length_exact() -> None:
    facts = read_facts({"messages": [{"role": "user", "content": "x" * 200_000}]}, None)
    assert len(facts.text) == 200_000 == facts.text_len  # the policy engine bounds its own scan


@pytest.mark.parametrize("header", ["secret", "PHI;", ""])
def test_unknown_data_class_is_400(header: str) -> None:
    with pytest.raises(BadRequest, match="X-Phi-Data-Class"):
        read_facts(OPENAI, header)


def test_tools_without_names_are_400() -> None:
    with pytest.raises(BadRequest):
        read_facts({"tools": [{"type": "function"}]}, None)
    with pytest.raises(BadRequest):
        read_facts({"tools": "lookup"}, None)


def test_edits() -> None:
    body = {**OPENAI, "tools": list(OPENAI["tools"]), "tool_choice": "auto"}  # type: ignore[arg-type]
    apply_edits(body, model="gpt-4o-mini", drop_tools=["search"], max_tokens=256)
    assert body["model"] == "gpt-4o-mini" and body["max_tokens"] == 256
    assert [t["function"]["name"] for t in body["tools"]] == ["lookup_patient"]
    apply_edits(body, model="x", drop_tools=["lookup_patient"], max_tokens=None)
    assert "tools" not in body and "tool_choice" not in body and body["max_tokens"] == 256
