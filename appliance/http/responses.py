"""The bytes of HTTP/1.1 response heads, precomputed where they repeat.

Owns the status-line table, the once-a-second ``Date`` header, the fixed header lines the server
adds, and the rendering of a ``GatewayError`` into a complete JSON error response. It must never
write to a transport, read a request, or log anything: it only turns values into bytes.
"""

from __future__ import annotations

import http
import time
from email.utils import formatdate

from appliance.errors import GatewayError


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINES: dict[int, bytes] = {status: _status_line(status) for status in range(100, 600)}
"""``HTTP/1.1 <status> <phrase>\\r\\n`` for every status from 100 to 599."""

SERVER = b"server: phi-gateway\r\n"
CONNECTION_CLOSE = b"connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n"
CONTENT_TYPE_JSON = b"content-type: application/json\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"

# Header names the server writes itself; a handler's copy of them is dropped, not duplicated.
RESERVED_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"date", b"server", b"x-request-id"}
)

_date_second = -1
_date_line = b""


def date_header() -> bytes:
    """The ``date:`` header line for the current second, formatted at most once per second."""
    global _date_second, _date_line
    now = time.time()
    second = int(now)
    if second != _date_second:
        _date_line = b"date: " + formatdate(now, usegmt=True).encode("ascii") + CRLF
        _date_second = second
    return _date_line


def request_id_header(request_id: str) -> bytes:
    """The ``x-request-id:`` line every response carries: the id of the request's audit records."""
    return b"x-request-id: " + request_id.encode("ascii") + CRLF


def status_line(status: int) -> bytes:
    """The status line for ``status``; raises ``ValueError`` outside 100-599."""
    line = STATUS_LINES.get(status)
    if line is None:
        raise ValueError(f"invalid HTTP status {status!r}")
    return line


def header_lines(parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> bool:
    """Append ``name: value`` lines to ``parts``, dropping reserved names.

    Returns False when the handler asked for ``connection: close``. Raises ``ValueError`` on a
    CR or LF inside a name or value (response splitting).
    """
    keep_alive = True
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name or b":" in name:
            raise ValueError("invalid character in response header")
        lowered = name.lower()
        if lowered in RESERVED_HEADERS:
            if lowered == b"connection" and value.lower() == b"close":
                keep_alive = False
            continue
        parts.append(b"%b: %b\r\n" % (name, value))
    return keep_alive


def connection_line(keep_alive: bool, http10: bool) -> bytes:
    """The ``connection`` header line, or nothing when HTTP/1.1's default (keep-alive) applies."""
    if not keep_alive:
        return CONNECTION_CLOSE
    return CONNECTION_KEEP_ALIVE if http10 else b""


def error_response(
    error: GatewayError,
    *,
    request_id: str,
    keep_alive: bool,
    head_only: bool = False,
    http10: bool = False,
) -> bytes:
    """A complete response carrying ``error`` as OpenAI-shaped JSON, with the error's own headers."""
    body = error.body()
    parts = [
        status_line(error.status),
        date_header(),
        SERVER,
        request_id_header(request_id),
        CONTENT_TYPE_JSON,
    ]
    header_lines(parts, error.headers)
    parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(connection_line(keep_alive, http10))
    parts.append(CRLF)
    if not head_only:
        parts.append(body)
    return b"".join(parts)
