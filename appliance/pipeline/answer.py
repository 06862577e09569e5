"""Writing to the client: a route's answer (JSON, or a stream relayed chunk by chunk) and error answers.

Owns: the digest of every answer body (for the outcome record), the in-band error frame when an upstream
fails mid-stream (``data:`` for OpenAI, ``event: error`` for Anthropic), and sending an error only while
nothing has been sent yet. The server adds ``X-Request-Id`` to every response itself.
Never: keeps or logs the bytes it relays.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

from appliance.errors import ClientDisconnected, GatewayError
from appliance.http import Responder
from appliance.pipeline.exchange import Exchange
from appliance.pipeline.record import Outcome
from routes.result import RouteResult

_SSE_HEADERS = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")]
_JSON = b"application/json"


async def send_result(responder: Responder, result: RouteResult, out: Outcome) -> None:
    body = result.body or b""
    out.digest = hashlib.sha256(body).hexdigest()
    headers = [(b"Content-Type", result.content_type or _JSON), *result.extra_headers]
    await responder.send(result.status, headers, body)


async def relay_stream(ex: Exchange, responder: Responder, result: RouteResult, out: Outcome) -> None:
    assert result.stream is not None
    digest = hashlib.sha256()
    try:
        await responder.start(result.status, [*_SSE_HEADERS, *result.extra_headers])
        async for chunk in result.stream:
            digest.update(chunk)
            await responder.write(chunk)
            if out.first_chunk_s is None:
                out.first_chunk_s = time.perf_counter() - ex.request.received_at
        await responder.end()
    except GatewayError as exc:  # the upstream failed mid-stream: tell the caller in-band, then end
        out.error = exc
        frame = b"event: error\ndata: " if ex.endpoint == "messages" else b"data: "
        with contextlib.suppress(ClientDisconnected):
            await responder.write(frame + ex.render(exc) + b"\n\n")
            await responder.end()
    finally:
        out.digest = digest.hexdigest()


async def send_error(ex: Exchange, responder: Responder, error: GatewayError) -> None:
    if responder.started or responder.disconnected:
        return
    headers = [(b"Content-Type", _JSON), *error.headers]
    with contextlib.suppress(ClientDisconnected):
        await responder.send(error.status, headers, ex.render(error))


async def send_json(responder: Responder, body: bytes) -> None:
    await responder.send(200, [(b"Content-Type", _JSON)], body)
