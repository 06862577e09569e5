"""Fuzzing the OpenAI <-> Anthropic translation (``routes.translate``).

Properties: near-valid and arbitrary chat requests become a Messages request or ``BadRequest``; arbitrary
Messages responses, error bodies and stream events translate or raise the project's errors (an ``error``
event is ``UpstreamError``), never ``AttributeError``/``TypeError``/``KeyError``. Where translation is
meant to be faithful it is: every text of a plain-text conversation reaches the Messages request in order,
a response's text blocks become its content, and a stream's text deltas concatenate to the same text, with
the usage the stream reported.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.errors import BadRequest, UpstreamError
from routes.translate import (
    MessagesStreamToChat,
    anthropic_error_to_openai,
    chat_request_to_messages,
    messages_response_to_chat,
)
from routes.usage import event_fields, split_events
from tests.fuzz._profile import examples
from tests.fuzz.strategies import json_values

pytestmark = pytest.mark.fuzz

texts = st.text(max_size=30)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", None, 3])


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(value, json_values(6))


content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _maybe(texts)}),
    st.fixed_dictionaries({"type": st.just("refusal"), "refusal": _maybe(texts)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", "x"])}),
    json_values(6),
)
tool_calls = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "id": _maybe(texts),
                "type": st.sampled_from(["function", "custom"]),
                "function": st.one_of(
                    st.fixed_dictionaries(
                        {
                            "name": _maybe(texts),
                            "arguments": st.one_of(
                                st.sampled_from(['{"a": 1}', "{", "[]", "", "null"]),
                                json_values(6),
                            ),
                        }
                    ),
                    json_values(4),
                ),
            }
        ),
        json_values(4),
    ),
    max_size=3,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": roles, "content": st.one_of(texts, st.lists(content_parts, max_size=3), json_values(4))},
            optional={"tool_calls": st.one_of(tool_calls, json_values(4)), "tool_call_id": _maybe(texts)},
        ),
        json_values(4),
    ),
    max_size=5,
)
chat_requests = st.fixed_dictionaries(
    {"model": st.just("anthropic/claude-sonnet-4-5"), "messages": st.one_of(messages, json_values(4))},
    optional={
        "stream": _maybe(st.booleans()),
        "n": _maybe(st.integers(0, 3)),
        "logprobs": _maybe(st.booleans()),
        "response_format": _maybe(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
        "max_tokens": _maybe(st.integers(1, 4096)),
        "temperature": _maybe(st.floats(0, 2)),
        "stop": _maybe(st.one_of(texts, st.lists(texts, max_size=3))),
        "tools": st.one_of(
            st.lists(
                st.one_of(
                    st.fixed_dictionaries(
                        {
                            "type": st.sampled_from(["function", "web"]),
                            "function": st.one_of(
                                st.fixed_dictionaries(
                                    {"name": texts},
                                    optional={"parameters": json_values(4), "description": texts},
                                ),
                                json_values(4),
                            ),
                        }
                    ),
                    json_values(4),
                ),
                max_size=3,
            ),
            json_values(4),
        ),
        "tool_choice": _maybe(
            st.one_of(
                st.sampled_from(["auto", "none", "required"]),
                st.fixed_dictionaries({"type": st.just("function"), "function": _maybe(st.builds(dict))}),
            )
        ),
        "parallel_tool_calls": _maybe(st.booleans()),
        "user": _maybe(texts),
    },
)


@examples(200)
@given(body=st.one_of(chat_requests, st.dictionaries(st.text(max_size=10), json_values(6), max_size=5)))
@example(
    body={"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}
)
@example(body={"messages": [{"role": "user", "content": [{"type": ["text"]}]}]})
def test_chat_requests_translate_or_raise_bad_request(body: dict[str, Any]) -> None:
    try:
        out = chat_request_to_messages(body, "claude-sonnet-4-5")
    except BadRequest:
        return
    json.dumps(out)  # what goes upstream must serialize
    assert out["model"] == "claude-sonnet-4-5" and isinstance(out["messages"], list)


plain_turns = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(min_size=1, max_size=20)),
    min_size=1,
    max_size=8,
)


@examples(150)
@given(turns=plain_turns)
def test_plain_text_conversations_keep_every_text_in_order(turns: list[tuple[str, str]]) -> None:
    body = {"messages": [{"role": role, "content": text} for role, text in turns]}
    out = chat_request_to_messages(body, "m")
    assert out.get("system", "") == "\n\n".join(text for role, text in turns if role == "system")
    got: list[tuple[str, str]] = []
    for message in out["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        got.extend((message["role"], block["text"]) for block in blocks)
    assert got == [(role, text) for role, text in turns if role != "system"]
    assert all(a["role"] != b["role"] for a, b in zip(out["messages"], out["messages"][1:], strict=False))


blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _maybe(texts)}),
    st.fixed_dictionaries(
        {"type": st.just("tool_use"), "id": _maybe(texts), "name": _maybe(texts), "input": json_values(4)}
    ),
    json_values(4),
)
responses = st.fixed_dictionaries(
    {},
    optional={
        "id": _maybe(texts),
        "model": _maybe(texts),
        "content": st.one_of(st.lists(blocks, max_size=4), json_values(4)),
        "stop_reason": _maybe(st.sampled_from(["end_turn", "max_tokens", "tool_use", "weird"])),
        "usage": _maybe(
            st.fixed_dictionaries(
                {},
                optional={"input_tokens": _maybe(st.integers(0, 99)), "output_tokens": _maybe(st.integers())},
            )
        ),
    },
)


@examples(200)
@given(message=responses)
def test_messages_responses_translate(message: dict[str, Any]) -> None:
    chat = messages_response_to_chat(message, created=1)
    json.dumps(chat)
    content = message.get("content")
    if isinstance(content, list):
        texts_in = [b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"]
        if texts_in and all(isinstance(t, str) for t in texts_in):
            assert chat["choices"][0]["message"]["content"] == "".join(texts_in)
    usage = chat["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] >= 0


@examples(150)
@given(
    body=st.one_of(st.binary(max_size=300), json_values().map(lambda v: json.dumps(v).encode())),
    status=st.integers(400, 599),
)
def test_error_bodies_become_openai_errors(body: bytes, status: int) -> None:
    error = json.loads(anthropic_error_to_openai(body, status))["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str)


event_types = st.sampled_from(
    [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
        "",
    ]
)
event_objects = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "message": _maybe(st.fixed_dictionaries({"id": _maybe(texts), "model": _maybe(texts)})),
            "index": _maybe(st.integers(0, 3)),
            "content_block": _maybe(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "tool_use", "thinking"])},
                    optional={"id": _maybe(texts), "name": _maybe(texts), "text": _maybe(texts)},
                )
            ),
            "delta": _maybe(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text_delta", "input_json_delta", "thinking_delta"])},
                    optional={
                        "text": _maybe(texts),
                        "partial_json": _maybe(texts),
                        "stop_reason": _maybe(texts),
                    },
                )
            ),
            "usage": json_values(4),
            "error": json_values(4),
        },
    ),
    st.dictionaries(st.text(max_size=10), json_values(4), max_size=4),
)


@examples(200)
@given(events=st.lists(st.tuples(event_types, event_objects), max_size=8), include_usage=st.booleans())
@example(events=[("content_block_delta", {"delta": ["text_delta"]})], include_usage=False)
@example(events=[("message_start", {"message": "msg"})], include_usage=False)
@example(
    events=[("content_block_start", {"index": [0], "content_block": {"type": "tool_use"}})],
    include_usage=False,
)
@example(events=[("message_delta", {"delta": {"stop_reason": ["x"]}})], include_usage=False)
@example(events=[("error", {"error": "overloaded"})], include_usage=False)
def test_stream_events_translate_or_raise_upstream_error(
    events: list[tuple[str, dict[str, Any]]], include_usage: bool
) -> None:
    translator = MessagesStreamToChat(include_usage=include_usage, created=1)
    for name, obj in events:
        try:
            out = translator.event(name, obj)
        except UpstreamError as exc:
            assert name == "error" or "without an index" in str(exc), exc
            return
        for event in split_events(out):
            data = event_fields(event)[1]
            if data != b"[DONE]":
                json.loads(data)


@examples(150)
@given(pieces=st.lists(texts, max_size=6), tokens=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)))
def test_a_text_stream_keeps_its_text_and_usage(pieces: list[str], tokens: tuple[int, int]) -> None:
    translator = MessagesStreamToChat(include_usage=True, created=1)
    stream = [
        ("message_start", {"message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": tokens[0]}}}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        *[("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}) for p in pieces],
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": tokens[1]}}),
        ("message_stop", {}),
    ]
    out = b"".join(translator.event(name, obj) for name, obj in stream)
    chunks = [event_fields(e)[1] for e in split_events(out)]
    assert chunks[-1] == b"[DONE]"
    docs = [json.loads(c) for c in chunks[:-1]]
    text = "".join(d["choices"][0]["delta"].get("content", "") for d in docs if d["choices"])
    assert text == "".join(pieces)
    assert {d["id"] for d in docs} == {"chatcmpl-msg_1"}
    assert docs[-1]["usage"] == {
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
        "total_tokens": sum(tokens),
    }
    assert [d["choices"][0]["finish_reason"] for d in docs if d["choices"]][-1] == "stop"
