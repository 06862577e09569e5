"""One request/response cycle: the request a handler reads and the responder it answers through.

Owns the per-request state: the request id, the buffered request body and its waiters, the response
head and the chunked stream, the ``100 Continue`` interim answer, and what happens when a handler
raises or returns without answering. It must never parse bytes, touch another request's state, or log
headers or bodies (they carry secrets and PHI); the connection protocol drives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from appliance.errors import ClientDisconnected, GatewayError, MalformedHTTP, RequestTimeout
from appliance.http.flow_control import FlowControl
from appliance.http.limits import HttpLimits
from appliance.http.peer import Peer
from appliance.http.responses import (
    CHUNKED,
    CONTINUE,
    CRLF,
    LAST_CHUNK,
    SERVER,
    connection_line,
    date_header,
    error_response,
    header_lines,
    request_id_header,
    status_line,
)

logger = logging.getLogger("phi.http")


class Connection(Protocol):
    """What a cycle needs of its connection; ``protocol.HttpProtocol`` is the one implementation (a
    structural type, so the connection module imports this one and never the other way round)."""

    transport: asyncio.Transport
    flow: FlowControl
    limits: HttpLimits

    def resume_reading(self) -> None: ...

    def stop_reading(self) -> None: ...

    def response_complete(self, cycle: Responder) -> None: ...

    def handler_finished(self) -> None: ...


class _RandomPool:
    """os.urandom bytes fetched 4 KiB at a time: one getrandom call per 409 ids instead of one each (a
    system call releases and retakes the GIL, which the ledger's writer thread contends for)."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._pool):
            self._pool, self._at = os.urandom(4096), 0
        self._at += n
        return self._pool[self._at - n : self._at]


_random = _RandomPool()  # the event loop's thread only


def new_request_id() -> str:
    """32 hex digits: milliseconds since the epoch (12), then 80 random bits (20).

    Time-ordered so the ledger's request_id index grows at its right edge: with random ids every insert
    lands on a random B-tree page, and the durable append rate of the ledger falls by more than half
    (bench/ledger.py). 80 random bits keep ids unguessable and unique.
    """
    return f"{time.time_ns() // 1_000_000:012x}{_random.take(10).hex()}"


class Request:
    """What the client asked for: method, path, headers, and a way to read the body."""

    __slots__ = (
        "_cycle",
        "client",
        "headers",
        "method",
        "path",
        "peer",
        "query",
        "raw_headers",
        "received_at",
        "request_id",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        raw_headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        request_id: str,
        received_at: float,
        peer: Peer | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.raw_headers = raw_headers
        self.client = client
        self.request_id = request_id
        self.received_at = received_at
        self.peer = peer if peer is not None else Peer(client)
        """What the transport knows of the client: OS user on the admin socket, certificate under TLS."""
        self._cycle: Responder | None = None

    async def body(self) -> bytes:
        """The whole body. Raises ``PayloadTooLarge``, ``RequestTimeout`` or ``ClientDisconnected``."""
        if self._cycle is None:
            return b""
        return await self._cycle.read_body()


class Responder:
    """The per-request cycle: buffers the request body and writes the response, in one of two shapes.

    ``send`` writes a complete response; ``start``/``write``/``end`` stream a chunked one. Writes wait
    for the transport to drain first (backpressure). On a client that is gone, ``send``/``start``/``end``
    do nothing and ``write`` raises ``ClientDisconnected`` so a stream stops.
    """

    __slots__ = (
        "_body",
        "_body_error",
        "_body_event",
        "_buffered",
        "_chunked",
        "_chunks",
        "_conn",
        "_disconnect_callbacks",
        "_disconnect_event",
        "_received",
        "body_done",
        "complete",
        "disconnected",
        "dispatched",
        "expect_continue",
        "head_only",
        "http10",
        "keep_alive",
        "queued",
        "reading",
        "rejection",
        "request",
        "started",
    )

    def __init__(self, request: Request, conn: Connection, *, keep_alive: bool, http10: bool) -> None:
        request._cycle = self
        self.request = request
        self._conn = conn
        # connection handling for this response
        self.keep_alive = keep_alive
        self.http10 = http10
        self.head_only = request.method == "HEAD"
        self.expect_continue = False
        self.rejection: GatewayError | None = None
        self.queued = False
        self.dispatched = False
        # request body
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._received = 0
        self._body: bytes | None = None
        self._body_error: GatewayError | None = None
        self._body_event: asyncio.Event | None = None
        self.body_done = False
        self.reading = False
        # response
        self.started = False
        self.complete = False
        self.disconnected = False
        self._chunked = False
        self._disconnect_event: asyncio.Event | None = None
        self._disconnect_callbacks: list[Callable[[], object]] | None = None

    # ---- fed by the connection protocol -------------------------------------------------------

    def feed_body(self, data: bytes) -> bool:
        """Buffer a body chunk; False when the body has grown past ``max_body_bytes``."""
        if self.complete:
            return True  # answered already: the rest of the body is read and dropped
        self._received += len(data)
        if self._received > self._conn.limits.max_body_bytes:
            return False
        self._chunks.append(data)
        self._buffered += len(data)
        if self._body_event is not None:
            self._body_event.set()
        return True

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken by the handler."""
        return self._buffered

    def finish_body(self) -> None:
        self.body_done = True
        if self._body_event is not None:
            self._body_event.set()

    def fail_body(self, error: GatewayError) -> None:
        """The body cannot be completed (too large, malformed): ``body()`` raises ``error``."""
        self._body_error = error
        self.keep_alive = False
        self._chunks = []
        self._buffered = 0
        if self._body_event is not None:
            self._body_event.set()

    def connection_lost(self) -> None:
        self.disconnected = True
        if self._body_event is not None:
            self._body_event.set()
        if self._disconnect_event is not None:
            self._disconnect_event.set()
        if self._disconnect_callbacks is not None:
            for callback in self._disconnect_callbacks:
                callback()

    # ---- the request body ---------------------------------------------------------------------

    async def read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if not self.body_done:
            await self._wait_for_body()
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        self._body = body
        return body

    async def _wait_for_body(self) -> None:
        if self.expect_continue and not self.started and not self.disconnected and self._body_error is None:
            self.expect_continue = False
            self._conn.transport.write(CONTINUE)
        self.reading = True
        self._conn.resume_reading()
        timeout = self._conn.limits.body_timeout_s
        try:
            while not self.body_done:
                if self._body_error is not None:
                    raise self._body_error
                if self.disconnected:
                    raise ClientDisconnected("client disconnected while sending the body")
                event = self._body_event
                if event is None:
                    event = self._body_event = asyncio.Event()
                event.clear()
                try:
                    async with asyncio.timeout(timeout):
                        await event.wait()
                except TimeoutError:
                    error = RequestTimeout("request body not received in time")
                    self.fail_body(error)
                    self._conn.stop_reading()
                    raise error from None
        finally:
            self.reading = False

    # ---- the response -------------------------------------------------------------------------

    async def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> list[bytes] | None:
        """The start of a response head, once the client has drained; None if the client has gone."""
        if self.started:
            raise RuntimeError("response already started")
        flow = self._conn.flow
        if flow.write_paused and not self.disconnected:
            await flow.drain()
        if self.disconnected:
            return None
        # Every answer names its request, whoever wrote it: the handler, or the server refusing it.
        parts = [status_line(status), date_header(), SERVER, request_id_header(self.request.request_id)]
        if not header_lines(parts, headers):
            self.keep_alive = False
        return parts

    async def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write a complete response; Content-Length, Date, Server and Connection are added here."""
        parts = await self._head(status, headers)
        if parts is None:
            return
        if status < 200 or status == 204 or status == 304:
            body = b""
        else:
            parts.append(b"content-length: %d\r\n" % len(body))
        self._settle_connection()
        parts.append(connection_line(self.keep_alive, self.http10))
        parts.append(CRLF)
        if body and not self.head_only:
            parts.append(body)
        self.started = True
        self._conn.transport.write(b"".join(parts))
        self._finish()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Write the head of a streamed response (chunked; plain until close for HTTP/1.0 clients)."""
        parts = await self._head(status, headers)
        if parts is None:
            return
        if self.http10:
            self.keep_alive = False  # no chunked encoding in HTTP/1.0: the body ends at close
        else:
            parts.append(CHUNKED)
            self._chunked = True
        self._settle_connection()
        parts.append(connection_line(self.keep_alive, self.http10))
        parts.append(CRLF)
        self.started = True
        self._conn.transport.write(b"".join(parts))

    async def write(self, chunk: bytes) -> None:
        """Write one chunk of a started stream, waiting for the client to drain first if needed."""
        if self.disconnected:
            raise ClientDisconnected("client disconnected")
        if not self.started or self.complete:
            raise RuntimeError("write() needs a started, unfinished streaming response")
        if not chunk or self.head_only:
            return
        flow = self._conn.flow
        if flow.write_paused:
            await flow.drain()
            if self.disconnected:
                raise ClientDisconnected("client disconnected")
        if self._chunked:
            self._conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._conn.transport.write(chunk)

    async def end(self) -> None:
        """Finish a streamed response with the terminating zero-length chunk."""
        if not self.started:
            raise RuntimeError("end() before start()")
        if self.complete or self.disconnected:
            return
        if self._chunked and not self.head_only:
            self._conn.transport.write(LAST_CHUNK)
        self._finish()

    def on_disconnect(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on the event loop when the client connection is lost (at once if it is).

        Cheaper than a task waiting on ``wait_disconnected`` for work that must stop when the client goes.
        """
        if self.disconnected:
            callback()
            return
        if self._disconnect_callbacks is None:
            self._disconnect_callbacks = []
        self._disconnect_callbacks.append(callback)

    async def wait_disconnected(self) -> None:
        """Return when the client connection is lost."""
        if self.disconnected:
            return
        if self._disconnect_event is None:
            self._disconnect_event = asyncio.Event()
        await self._disconnect_event.wait()

    def _settle_connection(self) -> None:
        # A client still waiting for "100 Continue" may never send the body we would have to skip.
        if self.expect_continue and not self.body_done:
            self.keep_alive = False
        self.expect_continue = False

    def _finish(self) -> None:
        self.complete = True
        if not self.body_done:
            self._chunks = []
            self._buffered = 0
        self._conn.response_complete(self)

    # ---- running the handler ------------------------------------------------------------------

    async def run(self, handler: Handler) -> None:
        """Call the handler and make sure the client gets exactly one well-formed answer."""
        try:
            await handler(self.request, self)
        except ClientDisconnected:
            pass
        except GatewayError as exc:
            self.answer_error(exc)
        except Exception:
            logger.exception("handler failed (request %s)", self.request.request_id)
            self.answer_error(GatewayError("internal error"))
        else:
            if not self.complete and not self.disconnected:
                logger.error(
                    "handler returned without %s (request %s)",
                    "finishing its stream" if self.started else "responding",
                    self.request.request_id,
                )
                self.answer_error(GatewayError("internal error"))
        finally:
            self._conn.handler_finished()

    def answer_error(self, error: GatewayError) -> None:
        """Answer with ``error`` as JSON; once a stream has started, cut the connection instead."""
        if self.disconnected or self.complete:
            return
        if self.started:
            # The head is out: the only honest signal left is a truncated stream.
            self.keep_alive = False
            self._conn.transport.close()
            return
        if isinstance(error, MalformedHTTP):
            self.keep_alive = False
        self._settle_connection()
        self.started = True
        self._conn.transport.write(
            error_response(
                error,
                request_id=self.request.request_id,
                keep_alive=self.keep_alive,
                head_only=self.head_only,
                http10=self.http10,
            )
        )
        self._finish()


Handler = Callable[[Request, Responder], Awaitable[None]]
"""An application: called once per request; answers through the ``Responder``."""
