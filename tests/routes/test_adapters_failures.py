"""The OpenAI and Anthropic adapters when upstream fails: error statuses, timeouts, resets, cut streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator

import pytest

from appliance.errors import RateLimited, UpstreamError, UpstreamTimeout
from routes.client import UpstreamClient
from routes.result import JSON, RouteResult, Usage
from routes.table import RouteTable
from routes.usage import MAX_EVENT
from tests.routes._adapters import KEY, Spec, call, drain, run
from tests.support.fake_upstream import BIG_JSON_CONTENT, FakeUpstream, anthropic_answer, openai_answer

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


# --- streams that end badly, from a bare SSE server --------------------------------------------------------


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
