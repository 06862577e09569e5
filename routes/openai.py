"""The adapter for OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, llama-server, OpenRouter).

Owns: ``POST {base_url}/chat/completions``, ``/completions`` and ``/embeddings`` for a route of kind
"openai": the caller's body with the model replaced, usage counted from the JSON body or the SSE stream
(the gateway always asks for ``stream_options.include_usage`` and hides the usage-only chunk from callers
that did not ask for it).

It must never re-serialise a content chunk (SSE bytes pass through as they arrive; only events carrying a
usage object are parsed) and never send anything of the caller's request but its JSON body.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import BadRequest, UpstreamError
from routes.client import UpstreamClient, UpstreamHTTPResponse
from routes.result import NO_HINTS, Hints, RouteResult, Usage
from routes.upstream import RouteSpecLike, Upstream, json_object
from routes.usage import (
    SSEScanner,
    check_events,
    event_fields,
    filter_openai_sse,
    openai_usage,
    split_events,
)


class OpenAIStream:
    """The caller's SSE stream: upstream events as they arrive, minus the usage chunk it did not ask for.

    A stream that ends without ``data: [DONE]`` was cut off: what arrived is passed on, then the iterator
    raises ``UpstreamError`` so the answer is not taken for a complete one.
    """

    __slots__ = ("_done", "_keep_usage", "_name", "_response", "_scanner", "usage")

    def __init__(self, response: UpstreamHTTPResponse, name: str, *, keep_usage: bool) -> None:
        self._response = response
        self._scanner = SSEScanner(name)
        self._keep_usage = keep_usage
        self._name = name
        self._done = False
        self.usage = Usage()

    def __aiter__(self) -> OpenAIStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            try:
                chunk = await self._response.__anext__()
            except StopAsyncIteration:
                tail = self._scanner.flush()
                out = self._pass(tail + b"\n\n") if tail else b""
                if out:
                    return out
                if not self._done:
                    raise UpstreamError(f"upstream {self._name} ended the stream before [DONE]") from None
                raise
            region = self._scanner.feed(chunk)
            if region:
                out = self._pass(region)
                if out:
                    return out

    def _pass(self, region: bytes) -> bytes:
        check_events(region, self._name, done_marker=True)
        if not self._done and b"[DONE]" in region:  # the substring may be content: confirm on the events
            self._done = any(event_fields(event)[1] == b"[DONE]" for event in split_events(region))
        return filter_openai_sse(region, self.usage, keep_usage_chunk=self._keep_usage)

    async def aclose(self) -> None:
        await self._response.aclose()


class OpenAIRoute:
    """A route of kind "openai"; built once per policy and shared by all requests."""

    kind = "openai"

    def __init__(self, name: str, spec: RouteSpecLike, client: UpstreamClient) -> None:
        self.name = name
        self._upstream = Upstream(name, spec, client)

    async def chat_completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        return await self._generate("/chat/completions", body, upstream_model, key)

    async def completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        return await self._generate("/completions", body, upstream_model, key)

    async def embeddings(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        request = dict(body)
        request["model"] = upstream_model
        return await self._upstream.exchange(
            "/embeddings",
            request,
            key,
            stream=False,
            upstream_model=upstream_model,
            events=lambda response: OpenAIStream(response, self.name, keep_usage=False),
            answer=self._answer,
        )

    def _answer(self, payload: bytes) -> tuple[bytes, Usage]:
        usage = Usage()
        openai_usage(json_object(payload, self.name), usage)
        return payload, usage

    async def _generate(
        self, path: str, body: dict[str, Any], upstream_model: str, key: str | None
    ) -> RouteResult:
        stream = body.get("stream") is True
        request = dict(body)
        request["model"] = upstream_model
        keep_usage = False
        if stream:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            keep_usage = options.get("include_usage") is True
            options["include_usage"] = True
            request["stream_options"] = options

        return await self._upstream.exchange(
            path,
            request,
            key,
            stream=stream,
            upstream_model=upstream_model,
            events=lambda response: OpenAIStream(response, self.name, keep_usage=keep_usage),
            answer=self._answer,
        )

    async def messages(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        raise BadRequest("/v1/messages serves anthropic routes only", code="unsupported_endpoint")
