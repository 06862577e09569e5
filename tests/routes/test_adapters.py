"""The OpenAI and Anthropic adapters and the route table against the fake upstream, stream and not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from appliance.errors import BadRequest, NotFound, RateLimited, UpstreamError, UpstreamTimeout
from routes.client import UpstreamClient
from routes.result import EVENT_STREAM, JSON, RouteResult, Usage
from routes.table import RouteTable
from routes.usage import MAX_EVENT, SSEScanner, event_fields, split_events
from tests.support.fake_upstream import (
    BIG_JSON_CONTENT,
    FakeUpstream,
    ReceivedRequest,
    anthropic_answer,
    openai_answer,
)

KEY = "sk-provider-0123456789abcdefWXYZ"
CALLER_TOKEN = "radiology-bot:" + "9f" * 24
PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there friend"}]


@dataclass
class Spec:
    kind: str
    base_url: str | None
    auth: str
    timeout_s: float = 5.0


Scenario = Callable[[FakeUpstream, RouteTable], Awaitable[None]]


def run(scenario: Scenario, *, timeout_s: float = 5.0) -> None:
    async def main() -> None:
        async with FakeUpstream() as fake, UpstreamClient() as client:
            specs = {
                "openai": Spec("openai", fake.base_url + "/v1", "bearer", timeout_s),
                "anthropic": Spec("anthropic", fake.base_url, "x-api-key", timeout_s),
                "vllm": Spec("openai", fake.base_url + "/v1/", "none", timeout_s),
                "proxy": Spec("anthropic", fake.base_url, "bearer", timeout_s),
                "local": Spec("local", None, "none", timeout_s),
            }
            await scenario(fake, RouteTable(specs, client))

    asyncio.run(main())


async def call(
    table: RouteTable, model: str, endpoint: str = "chat", key: str | None = KEY, **body: object
) -> RouteResult:
    route, upstream_model = table.resolve(model)
    request = {"model": model, "messages": PROMPT, **body}
    if endpoint == "messages":
        request = {"model": model, "system": "be brief", "messages": PROMPT[1:], "max_tokens": 64, **body}
        return await route.messages(request, upstream_model=upstream_model, key=key)
    return await route.chat_completions(request, upstream_model=upstream_model, key=key)


async def drain(result: RouteResult) -> bytes:
    assert result.stream is not None and result.body is None
    try:
        return b"".join([chunk async for chunk in result.stream])
    finally:
        await result.aclose()


def payloads(stream: bytes) -> list[Any]:
    out = []
    for event in split_events(SSEScanner("fake").feed(stream)):
        data = event_fields(event)[1]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def assert_clean_headers(request: ReceivedRequest, auth: dict[str, str]) -> None:
    expected = {"host", "content-length", "content-type", "user-agent", "accept", *auth}
    if request.path == "/v1/messages":
        expected.add("anthropic-version")
        assert request.headers["anthropic-version"] == "2023-06-01"
    assert set(request.headers) == expected
    for name, value in auth.items():
        assert request.headers[name] == value
    assert request.headers["user-agent"] == "phi-gateway"
    assert CALLER_TOKEN not in json.dumps(request.headers) + request.body.decode()


# --- OpenAI-compatible route -------------------------------------------------------------------------------


def test_openai_route_non_stream() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, "openai/gpt-4o", temperature=0.1)
        assert (result.status, result.content_type, result.stream) == (200, JSON, None)
        assert result.body is not None
        assert json.loads(result.body)["choices"][0]["message"]["content"] == "Hello from gpt-4o"
        assert result.usage == Usage(5, 4, True)
        assert result.upstream_model == "gpt-4o"
        assert result.extra_headers == [(b"x-upstream-request-id", b"req_fake")]
        [sent] = fake.requests
        assert sent.path == "/v1/chat/completions"
        assert sent.json() == {"model": "gpt-4o", "messages": PROMPT, "temperature": 0.1}
        assert sent.headers["accept"] == "application/json"
        assert_clean_headers(sent, {"authorization": f"Bearer {KEY}"})
        ChatCompletion.model_validate_json(result.body)

    run(scenario)


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_route_stream_counts_usage_and_hides_the_usage_chunk(include_usage: bool) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        result = await call(table, "openai/gpt-4o", stream=True, **options)
        assert (result.status, result.content_type) == (200, EVENT_STREAM)
        chunks = payloads(await drain(result))
        assert chunks[-1] == "[DONE]"
        for chunk in chunks[:-1]:
            ChatCompletionChunk.model_validate(chunk)
        assert any(not c["choices"] for c in chunks[:-1]) is include_usage
        assert result.usage == Usage(5, 4, True)
        assert fake.requests[0].json()["stream_options"] == {"include_usage": True}
        assert fake.requests[0].headers["accept"] == "text/event-stream"

    run(scenario)


def test_openai_route_model_keeps_later_slashes_and_auth_none_sends_no_key() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, "vllm/meta-llama/llama-3", key=None)
        assert result.status == 200
        [sent] = fake.requests
        assert sent.path == "/v1/chat/completions"
        assert sent.json()["model"] == "meta-llama/llama-3"
        assert_clean_headers(sent, {})

    run(scenario)


def test_openai_route_refuses_messages_endpoint() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        with pytest.raises(BadRequest, match="serves anthropic routes only") as info:
            await call(table, "openai/gpt-4o", "messages")
        assert info.value.code == "unsupported_endpoint"
        assert fake.requests == []

    run(scenario)


# --- Anthropic route ---------------------------------------------------------------------------------------


def test_anthropic_messages_passthrough() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, "anthropic/claude-x", "messages")
        assert result.body is not None and result.status == 200
        assert json.loads(result.body)["content"] == [{"type": "text", "text": "Hello from claude-x"}]
        assert result.usage == Usage(5, 4, True)
        [sent] = fake.requests
        assert sent.path == "/v1/messages"
        assert sent.json()["model"] == "claude-x" and sent.json()["system"] == "be brief"
        assert_clean_headers(sent, {"x-api-key": KEY})
        anthropic.types.Message.model_validate_json(result.body)

    run(scenario)


def test_anthropic_messages_stream_passthrough_is_byte_identical() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, "anthropic/claude-x", "messages", stream=True)
        assert result.content_type == EVENT_STREAM
        received = await drain(result)
        assert received == b"".join(anthropic_answer(fake.requests[0].json())[1])
        assert result.usage == Usage(5, 4, True)

    run(scenario)


def test_anthropic_route_with_bearer_auth() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        await call(table, "proxy/claude-x", "messages")
        assert_clean_headers(fake.requests[0], {"authorization": f"Bearer {KEY}"})

    run(scenario)


def test_anthropic_route_serves_chat_completions_translated() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, "anthropic/claude-x", max_tokens=10, stop=["\n\n"])
        assert result.body is not None and result.content_type == JSON
        completion = ChatCompletion.model_validate_json(result.body)
        assert completion.choices[0].message.content == "Hello from claude-x"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.total_tokens == 9
        assert result.usage == Usage(5, 4, True)
        [sent] = fake.requests
        assert sent.path == "/v1/messages"
        assert sent.json() == {
            "model": "claude-x",
            "max_tokens": 10,
            "system": "be brief",
            "messages": [{"role": "user", "content": "hello there friend"}],
            "stop_sequences": ["\n\n"],
        }
        assert_clean_headers(sent, {"x-api-key": KEY})

    run(scenario)


def test_anthropic_route_translates_tool_use() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        messages = [{"role": "user", "content": "please use tool"}]
        result = await call(table, "anthropic/claude-x", messages=messages, tools=tools)
        assert result.body is not None
        choice = ChatCompletion.model_validate_json(result.body).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        call_ = choice.message.tool_calls[0]
        assert (call_.id, call_.function.name, json.loads(call_.function.arguments)) == (  # type: ignore[union-attr]
            "toolu_fake01",
            "lookup",
            {"query": "fake"},
        )
        assert fake.requests[0].json()["tools"] == [{"name": "lookup", "input_schema": {"type": "object"}}]

        stream = await call(table, "anthropic/claude-x", messages=messages, tools=tools, stream=True)
        chunks = payloads(await drain(stream))
        deltas = [ChatCompletionChunk.model_validate(c).choices[0].delta for c in chunks[:-1]]
        arguments = "".join(
            tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [] if tc.function
        )
        assert json.loads(arguments) == {"query": "fake"}
        assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"

    run(scenario)


@pytest.mark.parametrize("include_usage", [False, True])
def test_anthropic_route_chat_stream_translated(include_usage: bool) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        result = await call(table, "anthropic/claude-x", stream=True, **options)
        assert result.content_type == EVENT_STREAM
        chunks = payloads(await drain(result))
        assert chunks[-1] == "[DONE]"
        parsed = [ChatCompletionChunk.model_validate(c) for c in chunks[:-1]]
        assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == "Hello from claude-x"
        assert len({c.id for c in parsed}) == 1
        assert any(c.usage is not None for c in parsed) is include_usage
        assert result.usage == Usage(5, 4, True)
        assert "stream_options" not in fake.requests[0].json()

    run(scenario)


# --- failures ----------------------------------------------------------------------------------------------

ENDPOINTS = [("openai/", "chat"), ("anthropic/", "chat"), ("anthropic/", "messages")]


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_caller_errors_pass_through_as_json(prefix: str, endpoint: str, status: int) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, f"{prefix}fail-{status}", endpoint)
        assert (result.status, result.content_type, result.stream) == (status, JSON, None)
        assert result.body is not None
        body = json.loads(result.body)
        if endpoint == "messages":
            assert body["type"] == "error"  # the Anthropic caller gets the Anthropic shape
        else:
            assert body["error"]["message"] == f"fake failure {status}"  # OpenAI shape, translated or not
        assert result.usage == Usage()

    run(scenario)


@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_non_json_error_body_is_wrapped(prefix: str, endpoint: str) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, f"{prefix}fail-400-text", endpoint)
        assert result.status == 400 and result.body is not None
        assert json.loads(result.body)["error"]["message"] == f"upstream {prefix[:-1]} answered status 400"

    run(scenario)


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_rejected_key_is_a_502_that_never_echoes_the_key(prefix: str, endpoint: str, status: int) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        with pytest.raises(UpstreamError) as info:
            await call(table, f"{prefix}fail-{status}", endpoint)
        error = info.value
        assert (error.status, error.code) == (502, "provider_key_rejected")
        assert error.message == f"upstream {prefix[:-1]} rejected the gateway's provider key"
        assert KEY[:6] not in error.body().decode() and KEY[-4:] not in error.body().decode()

    run(scenario)


@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_rate_limit_carries_retry_after(prefix: str, endpoint: str) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        with pytest.raises(RateLimited) as info:
            await call(table, f"{prefix}fail-429", endpoint)
        assert info.value.retry_after == 7
        assert info.value.headers == [(b"Retry-After", b"7")]

    run(scenario)


@pytest.mark.parametrize("status", [500, 502, 503, 529])
@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_server_errors_are_502(prefix: str, endpoint: str, status: int) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        with pytest.raises(UpstreamError) as info:
            await call(table, f"{prefix}fail-{status}", endpoint)
        assert type(info.value) is UpstreamError and info.value.status == 502
        assert info.value.message == f"upstream {prefix[:-1]} failed with status {status}"

    run(scenario)


@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
@pytest.mark.parametrize("stream", [False, True])
def test_timeout_reset_and_midstream_drop(prefix: str, endpoint: str, stream: bool) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        with pytest.raises(UpstreamTimeout) as timeout:
            await call(table, f"{prefix}fail-timeout", endpoint, stream=stream)
        assert timeout.value.status == 504
        with pytest.raises(UpstreamError) as reset:
            await call(table, f"{prefix}fail-reset", endpoint, stream=stream)
        assert reset.value.status == 502
        if stream:
            result = await call(table, f"{prefix}fail-midstream", endpoint, stream=True)
            with pytest.raises(UpstreamError, match="closed the connection early"):
                await drain(result)

    run(scenario, timeout_s=0.2)


@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_stream_ended_cleanly_without_its_last_event_raises(prefix: str, endpoint: str) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, f"{prefix}fail-nodone", endpoint, stream=True)
        last = "[DONE]" if prefix == "openai/" else "message_stop"
        expected = re.escape(f"upstream {prefix[:-1]} ended the stream before {last}")
        received = await read_until_error(result, expected)
        assert received.startswith(b"data: " if endpoint == "chat" else b"event: message_start")

    run(scenario)


@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_large_answers_and_error_bodies_are_read_whole(prefix: str, endpoint: str) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        result = await call(table, f"{prefix}big-json", endpoint)
        assert result.status == 200 and result.body is not None
        answer = json.loads(result.body)
        text = answer["content"][0]["text"] if endpoint == "messages" else answer["choices"][0]["message"]
        assert text == BIG_JSON_CONTENT or text["content"] == BIG_JSON_CONTENT
        refused = await call(table, f"{prefix}fail-400-big", endpoint)
        assert (
            refused.status == 400 and refused.body is not None and len(refused.body) > len(BIG_JSON_CONTENT)
        )
        assert fake.accepts == 1

    run(scenario)


@pytest.mark.parametrize(("prefix", "endpoint"), ENDPOINTS)
def test_missing_provider_key(prefix: str, endpoint: str) -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        with pytest.raises(UpstreamError) as info:
            await call(table, f"{prefix}m", endpoint, key=None)
        name = prefix[:-1]
        assert info.value.code == "provider_key_missing"
        assert (
            info.value.message == f"no provider key is set for route {name}; run: phi-gateway keys set {name}"
        )
        assert fake.requests == []

    run(scenario)


def test_result_aclose_mid_stream_closes_the_upstream_connection() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        for model, endpoint in [
            ("openai/slow-stream", "chat"),
            ("anthropic/slow-stream", "chat"),
            ("anthropic/slow-stream", "messages"),
        ]:
            result = await call(table, model, endpoint, stream=True)
            assert result.stream is not None
            assert (await result.stream.__anext__()).startswith((b"data: ", b"event: "))
            await result.aclose()
            await result.aclose()  # idempotent
            for _ in range(200):
                if fake.open_connections == 0:
                    break
                await asyncio.sleep(0.005)
            assert fake.open_connections == 0

    run(scenario)


def test_connections_are_reused_across_adapters() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        await call(table, "openai/m")
        await drain(await call(table, "openai/m", stream=True))
        await call(table, "anthropic/m", "messages")
        await drain(await call(table, "anthropic/m", stream=True))
        with pytest.raises(RateLimited):  # an error body is read to the end: its connection stays pooled
            await call(table, "openai/fail-429")
        await call(table, "anthropic/m")
        assert fake.accepts == 1

    run(scenario)


# --- the route table ---------------------------------------------------------------------------------------


def test_route_table_resolve() -> None:
    async def scenario(fake: FakeUpstream, table: RouteTable) -> None:
        route, model = table.resolve("openai/gpt-4o")
        assert (route.name, route.kind, model) == ("openai", "openai", "gpt-4o")
        assert table.resolve("openai/gpt-4o")[0] is route  # built once, reused
        assert table.resolve("vllm/org/model/v2")[1] == "org/model/v2"
        assert table.resolve("anthropic/claude-x")[0].kind == "anthropic"
        for bad in ["nope/x", "gpt-4o", "openai/", "/x"]:
            with pytest.raises(NotFound) as info:
                table.resolve(bad)
            assert info.value.code == "model_not_found"
        with pytest.raises(NotFound, match="local models are not available yet"):
            table.resolve("local/tiny")

    run(scenario)


def test_route_table_builds_a_local_route_per_local_route_name() -> None:
    class Local:
        kind = "local"

        def __init__(self, name: str) -> None:
            self.name = name

    async def main() -> None:
        async with UpstreamClient() as client:
            table = RouteTable(
                {"local": Spec("local", None, "none"), "gpu": Spec("local", None, "none")},
                client,
                local=Local,
            )
            route, model = table.resolve("gpu/tiny")
            assert (route.name, model) == ("gpu", "tiny") and table.resolve("local/x")[0].name == "local"
            with pytest.raises(ValueError, match="needs a base_url"):
                RouteTable({"x": Spec("openai", None, "bearer")}, client)
            with pytest.raises(ValueError, match="unknown kind"):
                RouteTable({"x": Spec("grpc", "http://x", "none")}, client)

    asyncio.run(main())


# --- the fake speaks well enough for the real SDKs (the gateway's end-to-end tests rely on it) -------------


def test_fake_upstream_serves_the_real_sdks_from_a_thread() -> None:
    fake = FakeUpstream()
    with fake.in_thread() as base_url:
        with openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0) as oai:
            completion = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}])
            assert completion.choices[0].message.content == "Hello from m"
            chunks = list(
                oai.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "a"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        with anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0) as claude:
            message = claude.messages.create(
                model="c", max_tokens=10, messages=[{"role": "user", "content": "a"}]
            )
            assert message.content[0].type == "text" and message.content[0].text == "Hello from c"
            with claude.messages.stream(
                model="c", max_tokens=10, messages=[{"role": "user", "content": "a"}]
            ) as s:
                assert "".join(s.text_stream) == "Hello from c"
                assert s.get_final_message().usage.output_tokens == 4
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"
    sdk_headers = fake.requests[-1].headers  # recent anthropic SDKs send the key as a bearer token
    assert KEY in (sdk_headers.get("x-api-key"), sdk_headers.get("authorization", "").removeprefix("Bearer "))


def _sse_server_answer(events: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + body


@contextlib.asynccontextmanager
async def sse_upstream(events: list[bytes]) -> AsyncIterator[RouteTable]:
    """Routes "claude" (anthropic) and "gpt" (openai) to a server that answers ``events`` as one SSE body."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_sse_server_answer(events))
            await writer.drain()
        except ConnectionError:
            pass  # the client gave up on the answer
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, UpstreamClient() as client:
        specs = {
            "claude": Spec("anthropic", base_url, "none"),
            "gpt": Spec("openai", base_url + "/v1", "none"),
        }
        yield RouteTable(specs, client)


async def read_until_error(result: RouteResult, expected: str) -> bytes:
    """What the stream yielded before it raised ``UpstreamError`` matching ``expected``."""
    assert result.stream is not None
    received = b""
    with pytest.raises(UpstreamError, match=expected):
        async for chunk in result.stream:
            received += chunk
    await result.aclose()
    return received


@pytest.mark.parametrize("endpoint", ["chat", "messages"])
@pytest.mark.parametrize("ending", ["truncated", "error-event"])
def test_anthropic_stream_that_does_not_finish_raises(endpoint: str, ending: str) -> None:
    _, events = anthropic_answer({"model": "c", "messages": []})
    if ending == "truncated":
        events = events[:4]  # a clean end of the HTTP body, but no message_stop
    else:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        events = [*events[:4], b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"]

    async def main() -> None:
        async with sse_upstream(events) as table:
            result = await call(table, "claude/c", endpoint, stream=True)
            expected = "before message_stop" if ending == "truncated" else r"mid-stream \(overloaded_error\)"
            received = await read_until_error(result, expected)
            if endpoint == "messages":  # the native caller saw every event, the error one included
                assert received == b"".join(events)

    asyncio.run(main())


@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_anthropic_stream_ends_are_told_by_event_name_not_by_text(endpoint: str) -> None:
    # The model name is part of the answer's text: these answers talk about the events that end a stream.
    _, complete = anthropic_answer({"model": "event: error\n\nevent: message_stop", "messages": []})
    _, cut = anthropic_answer({"model": "event: message_stop\n\nmessage_stop", "messages": []})
    cut = cut[:7]  # the text deltas, the one naming message_stop included; then a clean end of the body

    async def main() -> None:
        async with sse_upstream(complete) as table:
            result = await call(table, "claude/c", endpoint, stream=True)
            received = await drain(result)
            if endpoint == "messages":
                assert received == b"".join(complete)
        async with sse_upstream(cut) as table:
            result = await call(table, "claude/c", endpoint, stream=True)
            await read_until_error(result, "upstream claude ended the stream before message_stop")

    asyncio.run(main())


def test_openai_stream_end_is_told_by_the_done_event_not_by_text() -> None:
    _, events = openai_answer({"model": "data: [DONE]\n\n[DONE]", "messages": []})
    assert b"[DONE]" in events[-2]

    async def main() -> None:
        async with sse_upstream(events[:-1]) as table:
            result = await call(table, "gpt/m", stream=True)
            received = await read_until_error(result, r"upstream gpt ended the stream before \[DONE\]")
            assert received == b"".join(events[:-1])  # everything that came was passed on first

    asyncio.run(main())


@pytest.mark.parametrize(
    ("model", "endpoint"), [("gpt/m", "chat"), ("claude/c", "chat"), ("claude/c", "messages")]
)
def test_oversized_stream_event_is_refused(model: str, endpoint: str) -> None:
    start = b"data: {" if model.startswith("gpt/") else b"event: content_block_delta\ndata: {"
    unfinished = [start + b"x" * (64 * 1024)] * (MAX_EVENT // (64 * 1024) + 1)  # never a blank line

    async def main() -> None:
        async with sse_upstream(unfinished) as table:
            result = await call(table, model, endpoint, stream=True)
            route = model.split("/")[0]
            await read_until_error(result, f"upstream {route} sent an oversized event")

    asyncio.run(main())
