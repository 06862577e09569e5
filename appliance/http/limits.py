"""Limits the HTTP server enforces on every connection and request.

Owns the numbers only: sizes, timeouts and caps, validated once at start-up. It must never hold
behaviour; the protocol and the server read these fields and decide what to answer.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HttpLimits(BaseModel):
    """Sizes, timeouts and caps for the HTTP/1.1 server; each breach has its own status code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_line_bytes: int = Field(default=8192, gt=0)
    """Longest request target (URL) accepted; longer is answered 431 and the connection closed."""

    max_header_bytes: int = Field(default=32768, gt=0)
    """Total bytes of header names and values in one request; more is answered 431."""

    max_header_count: int = Field(default=100, gt=0)
    """Most header fields in one request; more is answered 431."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    """Largest request body. A larger Content-Length is answered 413 before any body byte is read;
    a chunked body that grows past it makes ``Request.body()`` raise 413 and the connection close."""

    header_timeout_s: float = Field(default=10.0, gt=0)
    """Time from the first byte of a request to its complete head; slower is answered 408 and closed."""

    body_timeout_s: float = Field(default=30.0, gt=0)
    """Longest gap between body chunks while the handler awaits ``Request.body()``; then 408."""

    body_deadline_s: float = Field(default=60.0, gt=0)
    """Time from a complete head to the last byte of its body; later is answered 408 and the connection
    closed. ``body_timeout_s`` bounds each gap, this the whole: a client sending one byte just inside
    every gap would otherwise hold a request slot for ever. 60 s lets the largest body
    (``max_body_bytes``, 4 MiB) arrive at 70 KB/s, slower than any ward's Wi-Fi."""

    keepalive_timeout_s: float = Field(default=5.0, gt=0)
    """An idle connection (no request in progress) is closed after this many seconds; so is one whose
    request was answered before its body arrived, if the rest of that body takes longer."""

    lingering_timeout_s: float = Field(default=2.0, gt=0)
    """After a final answer on a connection whose input was not all read (a 413, a 431, a 400), the
    server half-closes, then reads and drops what the client still sends for at most this long before
    closing (nginx's ``lingering_close``). Closing at once with unread input sends a TCP reset, and
    the reset can destroy the answer before the client reads it."""

    lingering_bytes: int = Field(default=1024 * 1024, ge=0)
    """Most input read and dropped during that lingering close; beyond it the connection is closed."""

    max_concurrency: int = Field(default=1024, gt=0)
    """Requests handled at once across all connections; above it the server answers 503 itself."""

    max_concurrency_per_address: int = Field(default=256, gt=0)
    """Requests handled at once for one client address; above it the server answers 429 itself
    (``too_many_requests_from_address``). At 256, a quarter of ``max_concurrency`` and as many as the
    connections one address may hold: an SDK's keep-alive pool (100 for OpenAI's and Anthropic's) is
    never refused, and the handlers of streams a client has just left (still finishing while its next
    request arrives on a new connection) have room; the soak drill overran 64 that way with 64 clients.
    Behind a reverse proxy every client has the proxy's address: raise it to ``max_concurrency`` there.
    One caller is bounded separately by ``server.max_in_flight_per_caller``."""

    max_connections: int = Field(default=4096, gt=0)
    """Open client connections across the server; a connection beyond it is answered 503
    (``too_many_connections``) at once, its request unread, and closed. An idle one costs a file
    descriptor and a few KiB of the process (tests/http/test_resource_bounds.py) besides the kernel's
    socket buffers, so 4096 is small change in memory; the process's descriptor limit must be above it
    (8192 leaves room for the vault, models and upstream pools). Idle ones go after
    ``keepalive_timeout_s``, half-sent heads after ``header_timeout_s``."""

    max_connections_per_address: int = Field(default=256, gt=0)
    """Open connections from one client address; beyond it a new one is answered 429
    (``too_many_connections_from_address``) and closed. The global cap alone could be filled by one
    host sending half heads; this keeps it to a sixteenth. 256 is above the keep-alive pools of the
    OpenAI and Anthropic SDKs (100) with room for several processes on one workstation. Behind a
    reverse proxy or a NAT, raise it (up to ``max_connections``)."""

    max_pipelined: int = Field(default=32, gt=0)
    """Requests queued behind the one being handled on a connection before reading pauses."""

    drain_timeout_s: float = Field(default=30.0, ge=0)
    """Graceful shutdown waits this long for in-flight handlers, then cancels them."""

    read_pause_bytes: int = Field(default=65536, gt=0)
    """Unread body bytes buffered per request before reading pauses until the handler reads."""
