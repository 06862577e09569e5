"""OpenAI <-> Anthropic translation, usage, the SSE scanner, pricing: pure functions, no sockets."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from appliance.errors import BadRequest, UpstreamError
from routes.pricing import cost_usd
from routes.result import Usage
from routes.translate import (
    MessagesStreamToChat,
    anthropic_error_to_openai,
    chat_request_to_messages,
    messages_response_to_chat,
)
from routes.usage import (
    MAX_EVENT,
    SSEScanner,
    anthropic_usage,
    event_fields,
    filter_openai_sse,
    openai_usage,
    scan_anthropic_sse,
    split_events,
)
from tests.support.fake_upstream import anthropic_answer, openai_answer

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

# (name, OpenAI chat request, expected Anthropic Messages request)
REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "minimal",
        {"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "claude", "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "system, developer and sampling",
        {
            "model": "x",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "no lists"}]},
                {"role": "user", "content": "hi"},
            ],
            "max_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": "END",
            "stream": True,
            "user": "u-1",
            "seed": 3,
        },
        {
            "model": "claude",
            "max_tokens": 50,
            "system": "be brief\n\nno lists",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.2,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"},
            "stream": True,
        },
    ),
    (
        "max_completion_tokens and stop list",
        {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 7, "stop": ["x", "y"]},
        {
            "model": "claude",
            "max_tokens": 7,
            "messages": [{"role": "user", "content": "a"}],
            "stop_sequences": ["x", "y"],
        },
    ),
    (
        "text parts stay blocks when there are several",
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]
        },
        {
            "model": "claude",
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        },
    ),
    (
        "tools, tool calls and tool results",
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "warm"}]},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        {
            "model": "claude",
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "call_1",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                        {
                            "type": "tool_use",
                            "id": "call_2",
                            "name": "get_weather",
                            "input": {"city": "Rome"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "cold"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "warm"},
                    ],
                },
            ],
            "tools": [
                {
                    "name": "get_weather",
                    "description": "Weather at a place",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
    ),
    (
        "named tool choice and text beside a tool call",
        {
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": "checking",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
                    ],
                },
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        {
            "model": "claude",
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "c", "name": "f", "input": {}},
                    ],
                },
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "tool", "name": "f"},
        },
    ),
    (
        "tool_choice none and auto",
        {"messages": [{"role": "user", "content": "a"}], "tools": [WEATHER_TOOL], "tool_choice": "none"},
        {
            "model": "claude",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "a"}],
            "tools": [
                {
                    "name": "get_weather",
                    "description": "Weather at a place",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
            "tool_choice": {"type": "none"},
        },
    ),
]


@pytest.mark.parametrize(("name", "chat", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_chat_request_translates_to_messages(
    name: str, chat: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert chat_request_to_messages(chat, "claude") == expected


@pytest.mark.parametrize(
    ("chat", "code_or_param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "unsupported_content",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
        (
            {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "a"}]}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "not json"},
                            }
                        ],
                    }
                ]
            },
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "code_interpreter"}]}, "tools"),
    ],
)
def test_untranslatable_requests_are_refused(chat: dict[str, Any], code_or_param: str) -> None:
    with pytest.raises(BadRequest) as info:
        chat_request_to_messages(chat, "claude")
    assert code_or_param in (info.value.code, info.value.param)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
        (None, None),
    ],
)
def test_messages_response_translates_to_chat_completion(stop_reason: str | None, finish: str | None) -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Let me "},
            {"type": "thinking", "thinking": "hidden"},
            {"type": "text", "text": "check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2},
    }
    chat = messages_response_to_chat(message, created=123)
    assert chat == {
        "id": "chatcmpl-msg_1",
        "object": "chat.completion",
        "created": 123,
        "model": "claude-x",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def test_tool_only_answer_has_null_content() -> None:
    chat = messages_response_to_chat(
        {
            "id": "m",
            "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            "stop_reason": "tool_use",
        }
    )
    assert chat["choices"][0]["message"]["content"] is None
    assert chat["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_error_becomes_openai_shaped() -> None:
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}'
    assert json.loads(anthropic_error_to_openai(body, 400)) == {
        "error": {
            "message": "max_tokens: too big",
            "type": "invalid_request_error",
            "code": None,
            "param": None,
        }
    }
    assert (
        json.loads(anthropic_error_to_openai(b"[1]", 422))["error"]["message"]
        == "upstream answered status 422"
    )


# --- streams -----------------------------------------------------------------------------------------------


def _sse_payloads(stream: bytes) -> list[Any]:
    out: list[Any] = []
    for event in split_events(stream):
        data = event_fields(event)[1]
        out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return out


def _translate_stream(events: list[bytes], *, include_usage: bool) -> tuple[list[Any], MessagesStreamToChat]:
    translator = MessagesStreamToChat(include_usage=include_usage, created=5)
    scanner = SSEScanner("fake")
    out = b""
    for raw in events:
        for event in split_events(scanner.feed(raw)):
            name, data = event_fields(event)
            out += translator.event(name, json.loads(data))
    return _sse_payloads(out), translator


@pytest.mark.parametrize("include_usage", [False, True])
def test_messages_stream_translates_to_chunks(include_usage: bool) -> None:
    _, events = anthropic_answer(
        {"model": "claude-x", "messages": [{"role": "user", "content": "one two three"}]}
    )
    chunks, translator = _translate_stream(events, include_usage=include_usage)
    assert chunks[-1] == "[DONE]"
    bodies = chunks[:-1]
    assert {c["id"] for c in bodies} == {"chatcmpl-msg_fake01"}  # one stable id
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "claude-x" for c in bodies)
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in bodies if c["choices"])
    assert text == "Hello from claude-x"
    finals = [c for c in bodies if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    usage_chunks = [c for c in bodies if not c["choices"]]
    if include_usage:
        assert usage_chunks == [
            dict(usage_chunks[0], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        ]
    else:
        assert usage_chunks == []
    assert translator.usage == Usage(3, 4, True)
    assert translator.done


def test_messages_stream_tool_use_translates_to_tool_call_deltas() -> None:
    request = {
        "model": "c",
        "messages": [{"role": "user", "content": "please use tool"}],
        "tools": [{"name": "lookup", "input_schema": {}}],
    }
    _, events = anthropic_answer(request)
    chunks, _ = _translate_stream(events, include_usage=False)
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks[:-1]
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_fake01",
        "type": "function",
        "function": {"name": "lookup", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"query": "fake"}'
    assert all(c["index"] == 0 for c in calls)
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_error_event_raises_upstream_error() -> None:
    translator = MessagesStreamToChat(include_usage=False, route="claude-route")
    with pytest.raises(UpstreamError, match=r"upstream claude-route failed mid-stream \(overloaded_error\)"):
        translator.event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})


# --- the SSE scanner ---------------------------------------------------------------------------------------

OPENAI_EVENTS = openai_answer(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "a b"}],
        "stream_options": {"include_usage": True},
    }
)[1]
OPENAI_STREAM = b"".join(OPENAI_EVENTS)
ANTHROPIC_STREAM = b"".join(
    anthropic_answer({"model": "m", "messages": [{"role": "user", "content": "a b c"}]})[1]
)


def _events(pieces: list[bytes]) -> list[bytes]:
    scanner = SSEScanner("fake")
    region = b"".join(scanner.feed(piece) for piece in pieces)
    return split_events(region + scanner.flush())


@pytest.mark.parametrize(
    "stream", [OPENAI_STREAM, ANTHROPIC_STREAM, ANTHROPIC_STREAM.replace(b"\n", b"\r\n")]
)
def test_scanner_yields_the_same_events_at_every_split(stream: bytes) -> None:
    whole = _events([stream])
    assert len(whole) > 5
    for cut in range(len(stream) + 1):
        assert _events([stream[:cut], stream[cut:]]) == whole, cut
    assert _events([stream[i : i + 1] for i in range(len(stream))]) == whole


def test_scanner_holds_an_unfinished_event_and_flushes_the_tail() -> None:
    scanner = SSEScanner("fake")
    assert scanner.feed(b"data: 1\n\ndata: 2") == b"data: 1\n\n"
    assert scanner.feed(b"\r") == b""
    assert scanner.feed(b"\n\r\n") == b"data: 2\n\n"
    assert scanner.feed(b"data: 3\n") == b""
    assert scanner.flush() == b"data: 3\n"
    assert scanner.flush() == b""


def test_scanner_refuses_an_event_over_the_limit() -> None:
    scanner = SSEScanner("fake")
    assert scanner.feed(b"data: " + b"x" * (MAX_EVENT - 100)) == b""
    assert scanner.feed(b"x\n\ndata: next") == b"data: " + b"x" * (MAX_EVENT - 99) + b"\n\n"
    with pytest.raises(UpstreamError, match="upstream fake sent an oversized event") as info:
        for _ in range(MAX_EVENT // 4096 + 1):
            scanner.feed(b"y" * 4096)
    assert info.value.status == 502


def test_scanner_time_is_linear_in_the_bytes_fed() -> None:
    # One long event in small pieces: re-joining and re-searching the held tail on every feed would cost
    # about 30 GB of copying here (many seconds); searching each piece once costs milliseconds.
    scanner = SSEScanner("fake")
    piece = b"x" * 31 + b"\n"
    started = time.perf_counter()
    for _ in range((MAX_EVENT - 64 * 1024) // len(piece)):
        assert scanner.feed(piece) == b""
    assert scanner.feed(b"\n").endswith(b"x\n\n")
    assert time.perf_counter() - started < 1.0


def test_event_fields_joins_data_lines_and_skips_comments() -> None:
    assert event_fields(b': keep-alive\nevent: ping\ndata: {"a":\ndata:1}\nid: 4') == ("ping", b'{"a":\n1}')


@pytest.mark.parametrize("keep", [False, True])
def test_openai_usage_chunk_counted_and_dropped_unless_asked(keep: bool) -> None:
    usage = Usage()
    out = filter_openai_sse(SSEScanner("fake").feed(OPENAI_STREAM), usage, keep_usage_chunk=keep)
    assert usage == Usage(2, 4, True)
    payloads = _sse_payloads(out)
    assert payloads[-1] == "[DONE]"
    assert any(isinstance(p, dict) and p["choices"] == [] for p in payloads) is keep
    if not keep:  # every other event is passed on byte for byte
        assert out == b"".join(e for e in OPENAI_EVENTS if b'"choices":[]' not in e)


def test_openai_region_without_usage_object_is_returned_as_is() -> None:
    region = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
    usage = Usage()
    assert filter_openai_sse(region, usage, keep_usage_chunk=False) is region
    assert usage == Usage()


def test_usage_in_a_chunk_with_choices_is_counted_and_kept() -> None:
    region = (
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\n'
    )
    usage = Usage()
    assert filter_openai_sse(region, usage, keep_usage_chunk=False) == region
    assert usage == Usage(3, 9, True)


def test_anthropic_stream_usage() -> None:
    usage = Usage()
    scan_anthropic_sse(SSEScanner("fake").feed(ANTHROPIC_STREAM), usage)
    assert usage == Usage(3, 4, True)
    later = (
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":8,"output_tokens":2}}'
    )
    later += b"\n\n"
    scan_anthropic_sse(later, usage)
    assert usage == Usage(8, 2, True)


def test_json_usage_extraction() -> None:
    usage = Usage()
    assert not openai_usage({"choices": []}, usage) and usage == Usage()
    assert openai_usage({"usage": {"prompt_tokens": 1, "completion_tokens": True}}, usage)
    assert usage == Usage(1, 0, True)
    usage = Usage()
    assert anthropic_usage(
        {"usage": {"input_tokens": 4, "cache_creation_input_tokens": 1, "output_tokens": 2}}, usage
    )
    assert usage == Usage(5, 2, True)


# --- pricing -----------------------------------------------------------------------------------------------


@dataclass
class Price:
    input_per_mtok: float
    output_per_mtok: float


def test_cost_usd() -> None:
    assert cost_usd(None, 1000, 1000) == 0.0
    assert cost_usd(Price(2.5, 10.0), 1_000_000, 0) == 2.5
    assert cost_usd(Price(2.5, 10.0), 123, 45) == 0.0007575
    assert cost_usd(Price(0.1, 0.3), 1, 1) == 4e-07
    assert cost_usd(Price(1 / 3, 0), 1, 0) == 3.3e-07
