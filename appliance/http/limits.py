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

    keepalive_timeout_s: float = Field(default=5.0, gt=0)
    """An idle connection (no request in progress) is closed after this many seconds; so is one whose
    request was answered before its body arrived, if the rest of that body takes longer."""

    max_concurrency: int = Field(default=1024, gt=0)
    """Requests handled at once across all connections; above it the server answers 503 itself."""

    max_pipelined: int = Field(default=32, gt=0)
    """Requests queued behind the one being handled on a connection before reading pauses."""

    drain_timeout_s: float = Field(default=30.0, ge=0)
    """Graceful shutdown waits this long for in-flight handlers, then cancels them."""

    read_pause_bytes: int = Field(default=65536, gt=0)
    """Unread body bytes buffered per request before reading pauses until the handler reads."""
