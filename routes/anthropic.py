"""The adapter for Anthropic Messages upstreams.

Owns: ``messages()``, the native pass-through of ``POST {base_url}/v1/messages`` (JSON or SSE, bytes
untouched, usage read from ``usage`` / ``message_start`` / ``message_delta``), and ``chat_completions()``,
which serves an OpenAI chat completions caller through the translation in ``routes.translate`` (request,
response, stream and error bodies).

It must never send anything of the caller's request but the (translated) JSON body, and never let an
upstream stream end look like a complete answer when ``message_stop`` never came.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.errors import GatewayError, UpstreamError
from routes.client import UpstreamClient, UpstreamHTTPResponse
from routes.result import EVENT_STREAM, JSON, RouteResult, Usage
from routes.translate import (
    MessagesStreamToChat,
    anthropic_error_to_openai,
    chat_request_to_messages,
    messages_response_to_chat,
)
from routes.upstream import RouteSpecLike, Upstream, dumps, json_object, wants_stream
from routes.usage import SSEScanner, anthropic_usage, event_fields, scan_anthropic_sse, split_events

ANTHROPIC_VERSION = b"2023-06-01"


class MessagesStream:
    """Native pass-through: upstream SSE chunks as they arrive; a scanner beside them counts usage.

    An ``error`` event reaches the caller like any other; the gateway then ends the stream with an
    ``UpstreamError``, as it does when ``message_stop`` never came.
    """

    __slots__ = ("_failure", "_name", "_response", "_scanner", "_stopped", "usage")

    def __init__(self, response: UpstreamHTTPResponse, usage: Usage, name: str) -> None:
        self._response = response
        self._scanner = SSEScanner()
        self._stopped = False
        self._failure: str | None = None
        self._name = name
        self.usage = usage

    def __aiter__(self) -> MessagesStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.__anext__()
        except StopAsyncIteration:
            if self._failure is not None:
                raise UpstreamError(f"upstream {self._name} failed mid-stream ({self._failure})") from None
            if not self._stopped:
                raise UpstreamError(f"upstream {self._name} ended the stream before message_stop") from None
            raise
        region = self._scanner.feed(chunk)
        if region:
            scan_anthropic_sse(region, self.usage)
            if b"message_stop" in region:
                self._stopped = True
            if b"event: error" in region:
                self._failure = _error_type(region)
        return chunk

    async def aclose(self) -> None:
        await self._response.aclose()


def _error_type(region: bytes) -> str:
    for event in split_events(region):
        name, data = event_fields(event)
        if name == "error":
            try:
                return str(json.loads(data)["error"]["type"])[:60]
            except (ValueError, KeyError, TypeError):
                break
    return "error"


class ChatFromMessagesStream:
    """Anthropic SSE events translated into ``chat.completion.chunk`` SSE for an OpenAI caller."""

    __slots__ = ("_name", "_response", "_scanner", "_translator", "usage")

    def __init__(self, response: UpstreamHTTPResponse, translator: MessagesStreamToChat, name: str) -> None:
        self._response = response
        self._scanner = SSEScanner()
        self._translator = translator
        self._name = name
        self.usage = translator.usage

    def __aiter__(self) -> ChatFromMessagesStream:
        return self

    async def __anext__(self) -> bytes:
        translator = self._translator
        while True:
            try:
                chunk = await self._response.__anext__()
            except StopAsyncIteration:
                tail = self._scanner.flush()
                out = self._translate(tail + b"\n\n") if tail else b""
                if out:
                    return out
                if not translator.done:
                    raise UpstreamError(
                        f"upstream {self._name} ended the stream before message_stop"
                    ) from None
                raise
            region = self._scanner.feed(chunk)
            if region:
                out = self._translate(region)
                if out:
                    return out

    def _translate(self, region: bytes) -> bytes:
        out: list[bytes] = []
        for event in split_events(region):
            name, data = event_fields(event)
            if not data or self._translator.done:
                continue
            try:
                obj = json.loads(data)
                out.append(self._translator.event(name or str(obj.get("type", "")), obj))
            except GatewayError:
                raise
            except (ValueError, AttributeError, TypeError, KeyError):
                raise UpstreamError(f"upstream {self._name} sent a malformed stream event") from None
        return b"".join(out)

    async def aclose(self) -> None:
        await self._response.aclose()


class AnthropicRoute:
    """A route of kind "anthropic"; built once per policy and shared by all requests."""

    kind = "anthropic"

    def __init__(self, name: str, spec: RouteSpecLike, client: UpstreamClient) -> None:
        self.name = name
        self._upstream = Upstream(name, spec, client, ((b"anthropic-version", ANTHROPIC_VERSION),))

    async def messages(self, body: dict[str, Any], *, upstream_model: str, key: str | None) -> RouteResult:
        """Anthropic caller, Anthropic upstream: the body goes through with only the model replaced."""
        stream = wants_stream(body)
        headers = self._upstream.headers(key, stream=stream)
        request = dict(body)
        request["model"] = upstream_model
        response = await self._upstream.post("/v1/messages", dumps(request), headers)
        handed_over = False
        try:
            if not 200 <= response.status < 300:
                return await self._upstream.refusal(response, upstream_model)
            extra = self._upstream.allowed_headers(response)
            usage = Usage()
            if stream and (response.header(b"content-type") or b"").startswith(EVENT_STREAM):
                sse = MessagesStream(response, usage, self.name)
                handed_over = True
                return RouteResult(200, EVENT_STREAM, None, sse, usage, upstream_model, extra, sse.aclose)
            payload = await response.read()
            anthropic_usage(json_object(payload, self.name), usage)
            return RouteResult(response.status, JSON, payload, None, usage, upstream_model, extra)
        finally:
            if not handed_over:
                await response.aclose()

    async def chat_completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None
    ) -> RouteResult:
        """OpenAI caller, Anthropic upstream: request, answer, stream and errors are translated."""
        stream = wants_stream(body)
        request = chat_request_to_messages(body, upstream_model)
        headers = self._upstream.headers(key, stream=stream)
        response = await self._upstream.post("/v1/messages", dumps(request), headers)
        handed_over = False
        try:
            if not 200 <= response.status < 300:
                return await self._upstream.refusal(response, upstream_model, anthropic_error_to_openai)
            extra = self._upstream.allowed_headers(response)
            if stream and (response.header(b"content-type") or b"").startswith(EVENT_STREAM):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                translator = MessagesStreamToChat(include_usage=include_usage, route=self.name)
                sse = ChatFromMessagesStream(response, translator, self.name)
                handed_over = True
                return RouteResult(
                    200, EVENT_STREAM, None, sse, translator.usage, upstream_model, extra, sse.aclose
                )
            message = json_object(await response.read(), self.name)
            try:
                completion = messages_response_to_chat(message)
            except (AttributeError, TypeError, KeyError):
                raise UpstreamError(f"upstream {self.name} returned a malformed response") from None
            usage = Usage()
            anthropic_usage(message, usage)
            return RouteResult(response.status, JSON, dumps(completion), None, usage, upstream_model, extra)
        finally:
            if not handed_over:
                await response.aclose()
