"""The HTTP/1.1 connection: an asyncio Protocol that parses with httptools and runs request cycles.

Owns the per-connection state: the parser, keep-alive, the head, body-deadline, discard and lingering
timers, the queue of pipelined requests, read pausing, the lingering close, and the refusals the server
answers itself (400, 408, 413, 429, 431, 503) with their ``Rejection`` records; ``admission`` keeps the
counts behind the connection and concurrency caps. It must never interpret a request beyond HTTP
framing and limits, never let chunked trailers into a request's headers (they arrive after the handler
may have read them), never log headers or bodies, never write a response out of order, and never read
a request on a connection it turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote

import httptools

from appliance.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    MalformedHTTP,
    PayloadTooLarge,
    RequestTimeout,
)
from appliance.http.admission import Admission, Rejection
from appliance.http.cycle import Handler, Request, Responder, new_request_id
from appliance.http.flow_control import FlowControl
from appliance.http.limits import HttpLimits
from appliance.http.peer import Peer, peer_of
from appliance.http.responses import error_response

logger = logging.getLogger("phi.http")


class ServerState:
    """What every connection of one server shares: the handler, limits, and live bookkeeping.

    ``exempt``, when given, picks the requests that bypass the concurrency caps (a readiness probe);
    it is called once per request on the event loop, so it must be quick and must not raise.
    """

    __slots__ = ("admission", "connections", "draining", "exempt", "handler", "limits", "tasks")

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        on_reject: Callable[[Rejection], None] | None = None,
        exempt: Callable[[Request], bool] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.exempt = exempt
        self.admission = Admission(limits, on_reject)
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False

    @property
    def in_flight(self) -> int:
        """Requests whose handler is running now."""
        return self.admission.in_flight


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
        self.peer = Peer()
        self._address: str | None = None  # the client's host, the key of the per-address caps
        self._admitted = False  # counted by admission: given back once, on connection_lost
        self.active: Responder | None = None  # the cycle whose response is being produced
        self.pipeline: deque[Responder] = deque()  # parsed cycles waiting for their turn
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._discard_timer: asyncio.TimerHandle | None = None  # body still owed after an early answer
        self._body_timer: asyncio.TimerHandle | None = None  # body_deadline_s of the body being read
        self._linger_timer: asyncio.TimerHandle | None = None  # set once the lingering close began
        self._linger_left = 0  # input bytes the lingering close still reads and drops
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
        self._heads_begun = 0  # messages begun on this connection: did one start inside this segment?
        self._body_seen = 0  # body bytes parsed on this connection: how much of a segment was body
        self._head_started = 0.0
        # True from a chunk-size line until that chunk's data: for the last chunk, the trailers.
        self._maybe_trailers = False
        self._chunk_headers = 0  # chunk-size lines parsed on this connection

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)
        self.peer = peer = peer_of(transport)
        if peer.address is not None:
            self.client = peer.address
            self._address = self.client[0]
        state = self.state
        if state.draining:
            self._broken = True
            self.transport.close()
            return
        refusal = state.admission.open(self._address)
        if refusal is not None:
            self._turn_away(refusal)
            return
        self._admitted = True
        state.connections.add(self)
        self._arm_keepalive()

    def _turn_away(self, refusal: GatewayError) -> None:
        # A short answer and a close, without reading: the request is unread, so the close may reset
        # and lose the answer, but lingering would spend the very descriptors the cap protects.
        self._broken = True
        request_id = self.state.admission.report(refusal, None, self.client)
        self.transport.write(error_response(refusal, request_id=request_id, keep_alive=False))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.state.admission.close(self._address)
        self.state.connections.discard(self)
        self._lost = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._broken = True
        self._cancel_keepalive()
        self._cancel_header_timer()
        self._cancel_discard_timer()
        self._cancel_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
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
            if self._linger_timer is not None:  # lingering: read and drop, within a budget
                self._linger_left -= len(data)
                if self._linger_left < 0:
                    self.transport.close()
            return
        was_in_trailers = self._maybe_trailers
        chunk_headers = self._chunk_headers
        heads_begun = self._heads_begun
        body_seen = self._body_seen
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
            if self._heads_begun != heads_begun:
                # The head began inside ``data``, after whatever requests came before it in the same
                # segment: count only its own bytes (see _head_bytes), never the whole segment.
                self._head_seen = _head_bytes(data, self._body_seen - body_seen)
            else:
                self._head_seen += len(data)
            if self._head_seen > self._head_cap:
                self._fail(HeadersTooLarge("request head too large"))
                return
            if self._header_timer is None:
                self._header_timer = self.loop.call_at(
                    self._head_started + self.limits.header_timeout_s, self._on_header_timeout
                )
        elif self._in_body and self._body_timer is None and not self._broken:
            # The head completed in this segment and its body did not: the body's whole deadline starts.
            self._body_timer = self.loop.call_later(self.limits.body_deadline_s, self._on_body_deadline)

    # ---- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._heads_begun += 1
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
        self._url = b""  # a later refusal of the next head must not take this request's target or method
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
            self.peer,
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
        self._body_seen += len(body)
        cycle = cast(Responder, self._current)
        if not cycle.feed_body(body):
            self._fail(PayloadTooLarge(f"request body exceeds {self.limits.max_body_bytes} bytes"))
            raise _StopParsing
        if cycle.buffered > self.limits.read_pause_bytes and not cycle.reading:
            self.flow.pause_reading()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._maybe_trailers = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
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
        exempt = state.exempt
        refusal = state.admission.start(self._address, exempt=exempt is not None and exempt(cycle.request))
        if refusal is not None:
            self._refuse(cycle, refusal)
            return
        task = self.loop.create_task(cycle.run(state.handler))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    def _refuse(self, cycle: Responder, error: GatewayError) -> None:
        self.state.admission.report(error, cycle.request, self.client)
        cycle.answer_error(error)

    def handler_finished(self) -> None:
        """Called once by each cycle whose handler ``_dispatch`` started, when the handler returns."""
        self.state.admission.finish(self._address)

    def response_complete(self, cycle: Responder) -> None:
        """Called by the active cycle once its response is fully written."""
        if cycle is not self.active:
            return
        self.active = None
        if not cycle.keep_alive or self._closing or (self._eof and not self.pipeline):
            self._close()
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
                    self._close()
            elif cycle.dispatched:
                cycle.fail_body(error)  # the handler sees it through body()
            else:
                cycle.rejection = error
                if not cycle.queued:
                    self._enqueue(cycle)
            return
        # The head itself is refused: a cycle carrying only what is known so far answers in turn.
        method = ""
        if self._url:  # the method precedes the target: without one, the parser still holds the last method
            with contextlib.suppress(httptools.HttpParserError, UnicodeDecodeError):
                method = self.parser.get_method().decode("ascii")
        path = ""
        if len(self._url) <= self.limits.max_request_line_bytes:
            path = self._url.partition(b"?")[0].decode("latin-1")
        request = Request(
            method, path, "", {}, [], self.client, new_request_id(), time.perf_counter(), self.peer
        )
        cycle = Responder(request, self, keep_alive=False, http10=False)
        cycle.rejection = error
        self._in_head = False
        self._enqueue(cycle)

    def _close(self) -> None:
        """Close after the last answer; first linger if the client may still be sending.

        Closing a socket with unread input makes the kernel send a reset, and a reset can overtake the
        answer and destroy it in the client's buffers. So, as nginx's lingering_close: half-close
        (the client reads the answer and then end-of-file), read and drop what still comes for a
        bounded time and number of bytes, then close; the client's own close ends it sooner.
        """
        transport = self.transport
        pending = self._broken or self._in_head or self._in_body or self.pipeline
        if not pending or self._eof or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self._broken = True
        self._cancel_keepalive()
        self._cancel_header_timer()
        self._cancel_discard_timer()
        self._cancel_body_timer()
        self._linger_left = self.limits.lingering_bytes
        self._linger_timer = self.loop.call_later(self.limits.lingering_timeout_s, transport.close)
        transport.write_eof()
        self.flow.resume_reading()

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

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_body_deadline(self) -> None:
        self._body_timer = None
        if not self._in_body or self._broken:
            return
        if self.flow.read_paused:  # we stopped reading, not the client: give it a fresh period
            self._body_timer = self.loop.call_later(self.limits.body_deadline_s, self._on_body_deadline)
            return
        self._fail(RequestTimeout("request body not received in time"))

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


def _head_bytes(segment: bytes, body_bytes: int) -> int:
    """An upper bound on the bytes of the head that began inside ``segment`` and is still incomplete.

    Every complete head ends with an empty line, and an incomplete one holds none, so the head is within
    what follows the segment's last CRLF CRLF; it is also within what is not body (``body_bytes`` of
    the segment were). The smaller of the two counts it, pipelined requests before it excluded.
    """
    beyond_body = len(segment) - body_bytes
    end = segment.rfind(b"\r\n\r\n")
    if end < 0:
        return beyond_body
    return min(beyond_body, len(segment) - end - 4)
