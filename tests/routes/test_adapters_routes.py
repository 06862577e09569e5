"""The OpenAI and Anthropic adapters and the route table on the fake upstream: answers, streams, reuse."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from appliance.errors import BadRequest, NotFound, RateLimited
from routes.client import UpstreamClient
from routes.result import EVENT_STREAM, JSON, Usage
from routes.table import RouteTable
from tests.routes._adapters import KEY, PROMPT, Spec, assert_clean_headers, call, drain, payloads, run
from tests.support.fake_upstream import FakeUpstream, anthropic_answer

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


# --- connections -------------------------------------------------------------------------------------------


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
