"""One route's side of an upstream exchange, shared by the OpenAI and Anthropic adapters.

Owns: the request headers built from scratch (content type, accept, user agent, the provider key in the
route's auth scheme), the exchange through the shared ``UpstreamClient`` (a 2xx answer becomes the
adapter's stream or body, the connection is released on every other path), the allow-list of upstream
response headers a caller may see, and the mapping of non-2xx upstream statuses to what the caller gets.

It must never forward a caller's header (its Authorization or x-api-key above all), and never pass an
upstream 401/403 body on: provider errors can echo parts of the gateway's key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from appliance.errors import RateLimited, UpstreamError
from routes.client import UpstreamClient, UpstreamHTTPResponse
from routes.result import EVENT_STREAM, JSON, ByteStream, RouteResult, Usage
from routes.usage import parse_object

# Upstream errors whose body is the caller's to read: the request itself was wrong or too big.
PASS_THROUGH_STATUSES = frozenset({400, 404, 409, 413, 422})
# Upstream response headers a caller may see, under the name it sees them by; everything else (rate-limit
# state of the gateway's provider account, cookies, organisation ids) stays here. The provider's request
# id is renamed: x-request-id on the caller's response is the gateway's own (the audit record carries it).
ALLOWED_HEADERS = {
    b"x-request-id": b"x-upstream-request-id",
    b"request-id": b"x-upstream-request-id",
    b"retry-after": b"retry-after",
}


class RouteSpecLike(Protocol):
    """What the adapters need of a policy route entry."""

    @property
    def kind(self) -> str: ...

    @property
    def base_url(self) -> str | None: ...

    @property
    def auth(self) -> str: ...

    @property
    def timeout_s(self) -> float: ...


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_object(body: bytes, route: str) -> dict[str, Any]:
    """A 2xx upstream body as a JSON object; UpstreamError when it is not one."""
    obj = parse_object(body)
    if obj is None:
        raise UpstreamError(f"upstream {route} returned a malformed response")
    return obj


class UsageStream(ByteStream, Protocol):
    """An adapter's SSE stream for the caller, with the usage it counts as it goes."""

    usage: Usage


class Upstream:
    """The HTTP side of one route: its URL base, auth scheme, timeout and the shared client."""

    __slots__ = ("_auth", "_client", "_static", "base_url", "name", "timeout_s")

    def __init__(
        self,
        name: str,
        spec: RouteSpecLike,
        client: UpstreamClient,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        if not spec.base_url:
            raise ValueError(f"route {name} ({spec.kind}) needs a base_url")
        if spec.auth not in ("bearer", "x-api-key", "none"):
            raise ValueError(f"route {name}: unknown auth scheme {spec.auth!r}")
        self.name = name
        self.base_url = spec.base_url.rstrip("/")
        self.timeout_s = spec.timeout_s
        self._auth = spec.auth
        self._client = client
        self._static = ((b"content-type", JSON), (b"user-agent", b"phi-gateway"), *extra)

    def headers(self, key: str | None, *, stream: bool) -> list[tuple[bytes, bytes]]:
        """Request headers built from scratch: nothing of the caller's request is carried over."""
        headers = [*self._static, (b"accept", b"text/event-stream" if stream else JSON)]
        if self._auth == "none":
            return headers
        if not key:
            raise UpstreamError(
                f"no provider key is set for route {self.name}; run: phi-gateway keys set {self.name}",
                code="provider_key_missing",
            )
        if self._auth == "bearer":
            headers.append((b"authorization", b"Bearer " + key.encode()))
        else:
            headers.append((b"x-api-key", key.encode()))
        return headers

    async def exchange(
        self,
        path: str,
        request: dict[str, Any],
        key: str | None,
        *,
        stream: bool,
        upstream_model: str,
        events: Callable[[UpstreamHTTPResponse], UsageStream],
        answer: Callable[[bytes], tuple[bytes, Usage]],
        error_body: Callable[[bytes, int], bytes] | None = None,
    ) -> RouteResult:
        """POST ``request`` to ``path`` and turn the upstream's answer into the caller's.

        A 2xx SSE answer to a stream request becomes ``events(response)``, which owns the connection from
        then on; any other 2xx answer is read whole and becomes ``answer(body)`` (body bytes, usage), so an
        upstream that ignored ``stream`` still answers. Non-2xx answers go to ``refusal``.
        """
        headers = self.headers(key, stream=stream)
        response = await self._client.request(
            "POST", self.base_url + path, headers, dumps(request), timeout_s=self.timeout_s, route=self.name
        )
        try:
            if not 200 <= response.status < 300:
                return await self.refusal(response, upstream_model, error_body)
            extra = self.allowed_headers(response)
            if stream and (response.header(b"content-type") or b"").startswith(EVENT_STREAM):
                sse = events(response)
                return RouteResult(200, EVENT_STREAM, None, sse, sse.usage, upstream_model, extra)
            body, usage = answer(await response.read())
            return RouteResult(response.status, JSON, body, None, usage, upstream_model, extra)
        except BaseException:
            await response.aclose()  # read() and refusal() release it themselves; this covers the rest
            raise

    @staticmethod
    def allowed_headers(response: UpstreamHTTPResponse) -> list[tuple[bytes, bytes]]:
        return [(ALLOWED_HEADERS[name], value) for name, value in response.headers if name in ALLOWED_HEADERS]

    async def refusal(
        self,
        response: UpstreamHTTPResponse,
        upstream_model: str,
        error_body: Callable[[bytes, int], bytes] | None = None,
    ) -> RouteResult:
        """The caller's answer to a non-2xx upstream response: a pass-through result or a raised error.

        The response is read and released here in every case. ``error_body`` rewrites a passed-through body
        into the caller's wire format (the translated route needs it).
        """
        status = response.status
        try:
            # Read even bodies we drop: a fully read response keeps its connection for the next request.
            body = await response.read()
        finally:
            await response.aclose()
        if status in PASS_THROUGH_STATUSES:
            if parse_object(body) is None:
                body = dumps(
                    {
                        "error": {
                            "message": f"upstream {self.name} answered status {status}",
                            "type": "upstream_error",
                            "code": None,
                            "param": None,
                        }
                    }
                )
            elif error_body is not None:
                body = error_body(body, status)
            return RouteResult(
                status, JSON, body, None, Usage(), upstream_model, self.allowed_headers(response)
            )
        if status in (401, 403):
            raise UpstreamError(
                f"upstream {self.name} rejected the gateway's provider key", code="provider_key_rejected"
            )
        if status == 429:
            raise RateLimited(
                f"upstream {self.name} is rate limiting the gateway",
                retry_after=_retry_after(response.header(b"retry-after")),
                code="upstream_rate_limited",
            )
        if status >= 500:
            raise UpstreamError(f"upstream {self.name} failed with status {status}")
        raise UpstreamError(f"upstream {self.name} answered status {status}")


def _retry_after(value: bytes | None) -> float:
    if value is None:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        return 1.0  # an HTTP-date; one second is a safe hint
    return seconds if 0 < seconds < 86_400 else 1.0
