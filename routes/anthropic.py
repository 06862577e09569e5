"""The adapter for Anthropic Messages upstreams.

Owns: ``messages()``, the native pass-through of ``POST {base_url}/v1/messages`` (JSON or SSE, bytes
untouched, usage read from ``usage`` / ``message_start`` / ``message_delta``), and ``chat_completions()``,
which serves an OpenAI chat completions caller through the translation in ``routes.translate`` (request,
response, stream and error bodies).

It must never send anything of the caller's request but the (translated) JSON body, and never let an
upstream stream end look like a complete answer when ``message_stop`` never came.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import BadRequest, GatewayError, UpstreamError
from routes.client import UpstreamClient, UpstreamHTTPResponse
from routes.result import NO_HINTS, Hints, RouteResult, Usage
from routes.translate import (
    MessagesStreamToChat,
    anthropic_error_to_openai,
    chat_request_to_messages,
    messages_response_to_chat,
)
from routes.upstream import RouteSpecLike, Upstream, dumps, json_object
from routes.usage import (
    SSEScanner,
    anthropic_usage,
    check_events,
    event_fields,
    parse_object,
    scan_anthropic_sse,
    split_events,
)

ANTHROPIC_VERSION = b"2023-06-01"


class MessagesStream:
    """Native pass-through: upstream SSE chunks as they arrive; a scanner beside them counts usage.

    An ``error`` event reaches the caller like any other; the gateway then ends the stream with an
    ``UpstreamError``, as it does when ``message_stop`` never came. Both are told by event name, never by
    a substring that the answer's own text could contain.
    """

    __slots__ = ("_failure", "_name", "_response", "_scanner", "_stopped", "usage")

    def __init__(self, response: UpstreamHTTPResponse, name: str) -> None:
        self._response = response
        self._scanner = SSEScanner(name)
        self._stopped = False
        self._failure: str | None = None
        self._name = name
        self.usage = Usage()

    def __aiter__(self) -> MessagesStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.__anext__()
        except StopAsyncIteration:
            self._watch(self._scanner.flush() + b"\n\n")
            if self._failure is not None:
                raise UpstreamError(f"upstream {self._name} failed mid-stream ({self._failure})") from None
            if not self._stopped:
                raise UpstreamError(f"upstream {self._name} ended the stream before message_stop") from None
            raise
        self._watch(self._scanner.feed(chunk))
        return chunk

    def _watch(self, region: bytes) -> None:
        check_events(region, self._name, done_marker=False)
        scan_anthropic_sse(region, self.usage)
        if b"message_stop" not in region and b"error" not in region:
            return  # neither event can be in this region; most regions end here
        for event in split_events(region):
            name, data = event_fields(event)
            if name == "message_stop":
                self._stopped = True
            elif name == "error" and self._failure is None:
                self._failure = _error_type(data)

    async def aclose(self) -> None:
        await self._response.aclose()


def _error_type(data: bytes) -> str:
    obj = parse_object(data)
    error = obj.get("error") if obj is not None else None
    return str(error["type"])[:60] if isinstance(error, dict) and "type" in error else "error"


class ChatFromMessagesStream:
    """Anthropic SSE events translated into ``chat.completion.chunk`` SSE for an OpenAI caller."""

    __slots__ = ("_name", "_response", "_scanner", "_translator", "usage")

    def __init__(self, response: UpstreamHTTPResponse, translator: MessagesStreamToChat, name: str) -> None:
        self._response = response
        self._scanner = SSEScanner(name)
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
            obj = parse_object(data)
            if obj is None:
                raise UpstreamError(f"upstream {self._name} sent a malformed stream event")
            try:
                out.append(self._translator.event(name or str(obj.get("type", "")), obj))
            except GatewayError:
                raise
            except (AttributeError, TypeError, KeyError):
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

    async def messages(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        """Anthropic caller, Anthropic upstream: the body goes through with only the model replaced."""
        request = dict(body)
        request["model"] = upstream_model

        def answer(payload: bytes) -> tuple[bytes, Usage]:
            usage = Usage()
            anthropic_usage(json_object(payload, self.name), usage)
            return payload, usage

        return await self._upstream.exchange(
            "/v1/messages",
            request,
            key,
            stream=body.get("stream") is True,
            upstream_model=upstream_model,
            events=lambda response: MessagesStream(response, self.name),
            answer=answer,
        )

    async def completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        raise BadRequest(
            "/v1/completions is not served by anthropic routes; use /v1/chat/completions",
            code="unsupported_endpoint",
        )

    async def embeddings(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        raise BadRequest("anthropic routes serve no embeddings", code="unsupported_endpoint")

    async def chat_completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        """OpenAI caller, Anthropic upstream: request, answer, stream and errors are translated."""
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def events(response: UpstreamHTTPResponse) -> ChatFromMessagesStream:
            translator = MessagesStreamToChat(include_usage=include_usage, route=self.name)
            return ChatFromMessagesStream(response, translator, self.name)

        def answer(payload: bytes) -> tuple[bytes, Usage]:
            message = json_object(payload, self.name)
            try:
                completion = messages_response_to_chat(message)
            except (AttributeError, TypeError, KeyError):
                raise UpstreamError(f"upstream {self.name} returned a malformed response") from None
            usage = Usage()
            anthropic_usage(message, usage)
            return dumps(completion), usage

        return await self._upstream.exchange(
            "/v1/messages",
            chat_request_to_messages(body, upstream_model),
            key,
            stream=body.get("stream") is True,
            upstream_model=upstream_model,
            events=events,
            answer=answer,
            error_body=anthropic_error_to_openai,
        )
