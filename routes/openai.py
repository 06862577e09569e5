"""The adapter for OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, llama-server, OpenRouter).

Owns: ``POST {base_url}/chat/completions`` for a route of kind "openai": the caller's body with the model
replaced, usage counted from the JSON body or the SSE stream (the gateway always asks for
``stream_options.include_usage`` and hides the usage-only chunk from callers that did not ask for it).

It must never re-serialise a content chunk (SSE bytes pass through as they arrive; only events carrying a
usage object are parsed) and never send anything of the caller's request but its JSON body.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import BadRequest
from routes.client import UpstreamClient, UpstreamHTTPResponse
from routes.result import EVENT_STREAM, JSON, RouteResult, Usage
from routes.upstream import RouteSpecLike, Upstream, dumps, json_object, wants_stream
from routes.usage import SSEScanner, filter_openai_sse, openai_usage


class OpenAIStream:
    """The caller's SSE stream: upstream events as they arrive, minus the usage chunk it did not ask for."""

    __slots__ = ("_keep_usage", "_response", "_scanner", "usage")

    def __init__(self, response: UpstreamHTTPResponse, usage: Usage, *, keep_usage: bool) -> None:
        self._response = response
        self._scanner = SSEScanner()
        self._keep_usage = keep_usage
        self.usage = usage

    def __aiter__(self) -> OpenAIStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            try:
                chunk = await self._response.__anext__()
            except StopAsyncIteration:
                tail = self._scanner.flush()
                if tail:
                    return filter_openai_sse(tail + b"\n\n", self.usage, keep_usage_chunk=self._keep_usage)
                raise
            region = self._scanner.feed(chunk)
            if region:
                out = filter_openai_sse(region, self.usage, keep_usage_chunk=self._keep_usage)
                if out:
                    return out

    async def aclose(self) -> None:
        await self._response.aclose()


class OpenAIRoute:
    """A route of kind "openai"; built once per policy and shared by all requests."""

    kind = "openai"

    def __init__(self, name: str, spec: RouteSpecLike, client: UpstreamClient) -> None:
        self.name = name
        self._upstream = Upstream(name, spec, client)

    async def chat_completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None
    ) -> RouteResult:
        stream = wants_stream(body)
        headers = self._upstream.headers(key, stream=stream)
        request = dict(body)
        request["model"] = upstream_model
        keep_usage = False
        if stream:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            keep_usage = options.get("include_usage") is True
            options["include_usage"] = True
            request["stream_options"] = options
        response = await self._upstream.post("/chat/completions", dumps(request), headers)
        handed_over = False
        try:
            if not 200 <= response.status < 300:
                return await self._upstream.refusal(response, upstream_model)
            extra = self._upstream.allowed_headers(response)
            usage = Usage()
            content_type = response.header(b"content-type") or b""
            if stream and content_type.startswith(EVENT_STREAM):
                sse = OpenAIStream(response, usage, keep_usage=keep_usage)
                handed_over = True
                return RouteResult(200, EVENT_STREAM, None, sse, usage, upstream_model, extra, sse.aclose)
            # Non-stream, or an upstream that ignored "stream": a complete JSON body either way.
            payload = await response.read()
            openai_usage(json_object(payload, self.name), usage)
            return RouteResult(response.status, JSON, payload, None, usage, upstream_model, extra)
        finally:
            if not handed_over:
                await response.aclose()

    async def messages(self, body: dict[str, Any], *, upstream_model: str, key: str | None) -> RouteResult:
        raise BadRequest("/v1/messages serves anthropic routes only", code="unsupported_endpoint")
