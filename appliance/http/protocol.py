"""The HTTP/1.1 connection: an asyncio Protocol that parses with httptools and runs request cycles.

Owns the per-connection state: the parser, keep-alive, head and discard timers, the queue of
pipelined requests, read pausing, and the refusals the server answers itself (400, 408, 413, 431,
503) with their ``Rejection`` records. It must never interpret a request beyond HTTP framing and
limits, never let chunked trailers into a request's headers (they arrive after the handler may have
read them), never log headers or bodies, and never write a response out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote

import httptools

from appliance.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    MalformedHTTP,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
)
from appliance.http.cycle import Handler, Request, Responder
from appliance.http.flow_control import FlowControl
from appliance.http.limits import HttpLimits

logger = logging.getLogger("phi.http")


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


@dataclass(slots=True)
class Rejection:
    """A request the server refused itself, without (or before) calling the handler; for the audit."""

    status: int
    code: str
    method: str | None
    path: str | None
    client: tuple[str, int] | None
    request_id: str


class ServerState:
    """What every connection of one server shares: the handler, limits, and live bookkeeping."""

    __slots__ = ("connections", "draining", "handler", "in_flight", "limits", "on_reject", "tasks")

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        on_reject: Callable[[Rejection], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.on_reject = on_reject
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.draining = False


class _StopParsing(Exception):
    """Raised from a parser callback after a refusal, so httptools stops feeding this connection."""


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.limits = state.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        limits = state.limits
        # Coarse bound on a head httptools is still accumulating (one giant header value, say).
        self._head_cap = limits.max_request_line_bytes + limits.max_header_bytes + 8 * limits.max_header_count

        # per-connection
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.flow: FlowControl = cast(FlowControl, None)
        self.client: tuple[str, int] | None = None
        self.active: Responder | None = None  # the cycle whose response is being produced
        self.pipeline: deque[Responder] = deque()  # parsed cycles waiting for their turn
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._discard_timer: asyncio.TimerHandle | None = None  # body still owed after an early answer
        self._closing = False  # shutdown asked: close after the current response
        self._broken = False  # stop parsing: a refusal is pending or the body was abandoned
        self._eof = False
        self._lost = False
        self._closed: asyncio.Future[None] | None = None

        # per-request (the request being parsed)
        self._current: Responder | None = None
        self._in_head = False
        self._in_body = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._header_count = 0
        self._head_seen = 0  # raw bytes of a head (or trailer section) still being accumulated
        self._head_started = 0.0
        # True from a chunk-size line until that chunk's data: for the last chunk, the trailers.
        self._maybe_trailers = False
        self._chunk_headers = 0  # chunk-size lines parsed on this connection

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        self.state.connections.add(self)
        if self.state.draining:
            self.transport.close()
            return
        self._arm_keepalive()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self._lost = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._broken = True
        self._cancel_keepalive()
        self._cancel_header_timer()
        self._cancel_discard_timer()
        self.flow.resume_writing()  # wake drain waiters; they see ``disconnected`` and stop
        if self.active is not None:
            self.active.connection_lost()
        if self._current is not None:
            self._current.connection_lost()
        for cycle in self.pipeline:
            cycle.connection_lost()
        self.pipeline.clear()

    def eof_received(self) -> bool:
        self._eof = True
        # The client closed its side: it has gone (a timeout, a cancelled call). Returning False closes the
        # transport, so connection_lost tells the handlers and upstream or local generation stops at once.
        # A half-closing HTTP client would lose its answer; nginx and uvicorn make the same trade, and for
        # a gateway whose answers cost tokens, noticing a departed client matters more.
        return False

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        if self._broken:
            return
        was_in_head = self._in_head
        was_in_trailers = self._maybe_trailers
        chunk_headers = self._chunk_headers
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not self._broken:  # not one of our refusals: a bug in a callback
                logger.error("HTTP parser callback failed", exc_info=exc.__context__)
                self._fail(GatewayError("internal error"))
            return
        except httptools.HttpParserError:
            self._fail(MalformedHTTP("malformed HTTP request"))
            return
        except httptools.HttpParserUpgrade:
            return  # refused in on_headers_complete
        if was_in_trailers and self._maybe_trailers and self._chunk_headers == chunk_headers:
            # No chunk data and no new chunk in all of ``data``: it is trailer bytes, which
            # httptools buffers a whole field at a time before on_header sees them; bound them here.
            self._head_seen += len(data)
            if self._head_seen > self._head_cap:
                self._fail(HeadersTooLarge("request trailers too large"))
                return
        if self._in_head:
            if was_in_head:
                self._head_seen += len(data)
                if self._head_seen > self._head_cap:
                    self._fail(HeadersTooLarge("request head too large"))
                    return
            if self._header_timer is None:
                self._header_timer = self.loop.call_at(
                    self._head_started + self.limits.header_timeout_s, self._on_header_timeout
                )

    # ---- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = self.loop.time()
        self._head_seen = 0
        self._url = b""
        self._headers = {}
        self._raw_headers = []
        self._header_bytes = 0
        self._header_count = 0
        self._maybe_trailers = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_request_line_bytes:
            self._fail(HeadersTooLarge("request line too long"))
            raise _StopParsing

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        if self._header_bytes > self.limits.max_header_bytes:
            self._fail(HeadersTooLarge("request headers too large"))
            raise _StopParsing
        if self._header_count > self.limits.max_header_count:
            self._fail(HeadersTooLarge("too many request headers"))
            raise _StopParsing
        if self._in_body:
            # A chunked trailer. The handler may already have checked the headers (authorization
            # among them), so a trailer is counted against the head's limits and then dropped.
            return
        self._raw_headers.append((name, value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        previous = headers.get(key)
        headers[key] = text if previous is None else previous + ", " + text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_header_timer()
        parser = self.parser
        url = self._url
        if url[:1] == b"/":
            raw_path, _, raw_query = url.partition(b"?")
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._fail(MalformedHTTP("malformed request target"))
                raise _StopParsing from None
            raw_path, raw_query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        headers = self._headers
        request = Request(
            parser.get_method().decode("ascii"),
            path,
            raw_query.decode("latin-1"),
            headers,
            self._raw_headers,
            self.client,
            new_request_id(),
            time.perf_counter(),
        )
        cycle = Responder(
            request,
            self,
            keep_alive=parser.should_keep_alive() and not self._closing,
            http10=parser.get_http_version() == "1.0",
        )
        if "expect" in headers:
            cycle.expect_continue = headers["expect"].lower() == "100-continue"
        self._current = cycle
        self._in_body = True

        refusal: GatewayError | None = None
        if parser.should_upgrade():
            refusal = BadRequest("protocol upgrade is not supported", code="upgrade_not_supported")
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                length = -1
            if length < 0:
                refusal = MalformedHTTP("invalid Content-Length")
            elif length > self.limits.max_body_bytes:
                refusal = PayloadTooLarge(f"request body exceeds {self.limits.max_body_bytes} bytes")
        if refusal is not None:
            self._fail(refusal)
            raise _StopParsing
        self._enqueue(cycle)

    def on_chunk_header(self) -> None:
        self._maybe_trailers = True
        self._chunk_headers += 1
        self._head_seen = 0

    def on_chunk_complete(self) -> None:
        self._maybe_trailers = False

    def on_body(self, body: bytes) -> None:
        self._maybe_trailers = False
        cycle = cast(Responder, self._current)
        if not cycle.feed_body(body):
            self._fail(PayloadTooLarge(f"request body exceeds {self.limits.max_body_bytes} bytes"))
            raise _StopParsing
        if cycle.buffered > self.limits.read_pause_bytes and not cycle.reading:
            self.flow.pause_reading()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._maybe_trailers = False
        cycle = self._current
        self._current = None
        if cycle is not None:
            cycle.finish_body()
            if cycle.complete:  # answered before its body ended: the connection is idle only now
                self._cancel_discard_timer()
                self._arm_keepalive()

    # ---- request cycles -----------------------------------------------------------------------

    def _enqueue(self, cycle: Responder) -> None:
        cycle.queued = True
        if self.active is None:
            self._dispatch(cycle)
            return
        self.pipeline.append(cycle)
        if len(self.pipeline) >= self.limits.max_pipelined:
            self.flow.pause_reading()

    def _dispatch(self, cycle: Responder) -> None:
        self.active = cycle
        cycle.dispatched = True
        if cycle.rejection is not None:
            self._refuse(cycle, cycle.rejection)
            return
        state = self.state
        if state.in_flight >= self.limits.max_concurrency:
            self._refuse(cycle, Overloaded("the gateway is at its concurrency limit; retry shortly"))
            return
        state.in_flight += 1
        task = self.loop.create_task(cycle.run(state.handler))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    def _refuse(self, cycle: Responder, error: GatewayError) -> None:
        on_reject = self.state.on_reject
        if on_reject is not None:
            request = cycle.request
            try:
                on_reject(
                    Rejection(
                        error.status,
                        error.code,
                        request.method or None,
                        request.path or None,
                        request.client,
                        request.request_id,
                    )
                )
            except Exception:
                logger.exception("on_reject callback failed")
        cycle.answer_error(error)

    def response_complete(self, cycle: Responder) -> None:
        """Called by the active cycle once its response is fully written."""
        if cycle is not self.active:
            return
        self.active = None
        if not cycle.keep_alive or self._closing or (self._eof and not self.pipeline):
            self.transport.close()
            return
        if self.pipeline:
            self._dispatch(self.pipeline.popleft())
        elif self._in_body:
            # Answered before its body arrived (a 401 needs none). The rest is read and dropped, so
            # the client sees the answer rather than a reset, but only until a fixed deadline: no
            # other timer covers this state, and the client may well be unauthenticated.
            self._discard_timer = self.loop.call_later(
                self.limits.keepalive_timeout_s, self._on_discard_timeout
            )
        elif not self._in_head:
            self._arm_keepalive()
        self.resume_reading()

    def resume_reading(self) -> None:
        """Resume reading unless a queue or an unread body says wait."""
        if self._broken or self.transport.is_closing() or len(self.pipeline) >= self.limits.max_pipelined:
            return
        cycle = self._current
        if (
            cycle is not None
            and not cycle.reading
            and not cycle.complete
            and cycle.buffered > self.limits.read_pause_bytes
        ):
            return
        self.flow.resume_reading()

    def stop_reading(self) -> None:
        """Abandon the rest of this connection's input; it closes after the current response."""
        self._broken = True
        self.flow.pause_reading()
        self._cancel_header_timer()

    def _fail(self, error: GatewayError) -> None:
        """Refuse what is being parsed with ``error``; nothing more is read from this connection."""
        if self._broken:
            return
        self.stop_reading()
        cycle = self._current
        if self._in_body and cycle is not None:
            cycle.keep_alive = False
            if cycle.complete:  # already answered while its body was arriving
                if self.active is None:
                    self.transport.close()
            elif cycle.dispatched:
                cycle.fail_body(error)  # the handler sees it through body()
            else:
                cycle.rejection = error
                if not cycle.queued:
                    self._enqueue(cycle)
            return
        # The head itself is refused: a cycle carrying only what is known so far answers in turn.
        method = ""
        with contextlib.suppress(httptools.HttpParserError, UnicodeDecodeError):
            method = self.parser.get_method().decode("ascii")
        path = ""
        if len(self._url) <= self.limits.max_request_line_bytes:
            path = self._url.partition(b"?")[0].decode("latin-1")
        request = Request(method, path, "", {}, [], self.client, new_request_id(), time.perf_counter())
        cycle = Responder(request, self, keep_alive=False, http10=False)
        cycle.rejection = error
        self._in_head = False
        self._enqueue(cycle)

    # ---- timers and shutdown ------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        self._cancel_keepalive()
        self._keepalive_timer = self.loop.call_later(self.limits.keepalive_timeout_s, self._on_idle)

    def _cancel_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_discard_timer(self) -> None:
        if self._discard_timer is not None:
            self._discard_timer.cancel()
            self._discard_timer = None

    def _on_discard_timeout(self) -> None:
        self._discard_timer = None
        cycle = self._current
        if self._in_body and cycle is not None and cycle.complete:
            self.transport.close()

    def _on_idle(self) -> None:
        self._keepalive_timer = None
        if self.active is None and not self.pipeline and not self._in_head and not self._in_body:
            self.transport.close()

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self._in_head or self._broken:
            return
        if self.flow.read_paused:  # we stopped reading, not the client: give it a fresh period
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_header_timeout)
            return
        self._fail(RequestTimeout("request head not received in time"))

    def shutdown(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        self._closing = True
        if self.active is None and not self.pipeline:
            self.transport.close()
            return
        if self.active is not None:
            self.active.keep_alive = False
        for cycle in self.pipeline:
            cycle.keep_alive = False

    def closed(self) -> asyncio.Future[None]:
        """A future that completes once the connection is lost (for shutdown to wait on)."""
        if self._closed is None:
            self._closed = self.loop.create_future()
            if self._lost:
                self._closed.set_result(None)
        return self._closed

    def abort(self) -> None:
        """Drop the connection at once (after the drain timeout)."""
        self.transport.abort()
