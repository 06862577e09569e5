"""The upstream HTTP/1.1 client: pooled keep-alive connections to the providers the routes name.

Owns: one connection pool per origin (scheme, host, port); the exchange itself over an asyncio Protocol
with httptools parsing the response (Content-Length, chunked and close-delimited bodies); TLS; the head,
per-chunk and connect timeouts; back-pressure from a slow consumer to the upstream socket (reading
pauses above 64 KiB of unconsumed body); and the size limits on what an upstream may send (a response head
of ``MAX_HEAD``, a body read whole of ``MAX_BODY``). Socket and parser failures leave as ``UpstreamError``
/ ``UpstreamTimeout``.

It must never: put a header value, a body or a URL in an error message (provider keys and prompt text
travel through here); return a connection to the pool before its response was read to the end; retry a
request that may have been answered, the one exception being a pooled connection that closed before
answering a single byte (the server dropped it while idle: the stale keep-alive case), retried once on a
fresh connection.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, cast

import httptools

from appliance.errors import UpstreamError, UpstreamTimeout

HIGH_WATER: Final = 64 * 1024  # pause reading the upstream socket above this much unconsumed body
LOW_WATER: Final = 16 * 1024
MAX_HEAD: Final = 64 * 1024  # status line and headers (interim 1xx heads included)
MAX_BODY: Final = 32 * 1024 * 1024  # a body read whole with read(); streamed bodies are read as they come
_MAX_TARGETS: Final = 512
_CLOSE_GRACE_S: Final = 2.0


class _StaleConnection(Exception):
    """The connection closed before a single response byte: safe to retry on a fresh connection."""


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Target:
    """A parsed request URL, cached by its string."""

    __slots__ = ("host", "host_header", "origin", "path", "port", "tls")

    def __init__(self, url: str) -> None:
        try:
            parsed = httptools.parse_url(url.encode())
        except httptools.HttpParserInvalidURLError:
            raise ValueError("upstream URL is not valid") from None
        scheme = (parsed.schema or b"").lower()
        if scheme not in (b"http", b"https") or not parsed.host:
            raise ValueError("upstream URL must be absolute http(s)")
        self.tls = scheme == b"https"
        self.host = parsed.host.decode("ascii")
        default_port = 443 if self.tls else 80
        self.port = parsed.port or default_port
        self.origin = (scheme.decode(), self.host, self.port)
        host = parsed.host if b":" not in parsed.host else b"[" + parsed.host + b"]"
        self.host_header = host if self.port == default_port else host + b":%d" % self.port
        path = parsed.path or b"/"
        self.path = path + b"?" + parsed.query if parsed.query else path


class _Pool:
    """Connections to one origin: the idle ones (most recent last), every live one, waiters for a slot."""

    __slots__ = ("conns", "idle", "opening", "sweep", "waiters")

    def __init__(self) -> None:
        self.idle: deque[_Connection] = deque()
        self.conns: set[_Connection] = set()
        self.opening = 0
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.sweep: asyncio.TimerHandle | None = None

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return


class _Connection(asyncio.Protocol):
    """One upstream TCP (or TLS) connection; it carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: _Pool) -> None:
        # per-connection
        self.loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.lost: asyncio.Future[None] | None = None
        self.label = "upstream"
        # per-response
        self.busy = False
        self.head_only = False
        self.interim = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.framed = False
        self.head_done = False
        self.complete = False
        self.close_delimited = False
        self.keep_alive = False
        self.received = False
        self.head_bytes = 0
        self.broken: str | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.read_paused = False
        self.waiter: asyncio.Future[bool] | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for: the connection is out of step and cannot be reused.
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.broken = "sent a malformed response"
            self.close()
        if not self.head_done and self.broken is None:
            # Every byte so far belongs to a head still unfinished, which httptools would buffer whole.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._oversized_head()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close our side as well; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pool = self.pool
        pool.conns.discard(self)
        if not self.busy:
            try:
                pool.idle.remove(self)
            except ValueError:
                pass
        elif not self.complete:
            if self.head_done and self.close_delimited and exc is None:
                self.complete = True
            elif self.broken is None:
                self.broken = "closed the connection early"
        pool.wake_one()
        self._wake()
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if sum(len(name) + len(value) for name, value in self.headers) > MAX_HEAD:
            self._oversized_head()  # a head that came whole in one read; head_done stays False
            return
        status = self.parser.get_status_code()
        if status < 200:
            self.interim = True  # 100 Continue / 103 Early Hints: the real head follows
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if self.head_only or status in (204, 304):
            self.complete = True
            self.keep_alive = False  # the parser would expect a body after a HEAD; do not reuse
        elif not self.framed:
            self.close_delimited = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.headers = []
            self.framed = False
            return
        self.complete = True

    def _oversized_head(self) -> None:
        self.broken = "sent an oversized response head"
        self.close()

    # --- used by the client and the response ---

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, timeout_s: float) -> None:
        """Wait for the next parser progress; UpstreamTimeout when nothing came within ``timeout_s``."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self.waiter = waiter
        timer = self.loop.call_later(timeout_s, _expire, waiter)
        try:
            progressed = await waiter
        finally:
            timer.cancel()
            self.waiter = None
        if not progressed:
            self.close()
            raise UpstreamTimeout(f"upstream {self.label} did not answer within {timeout_s:g} s")

    def begin(self, label: str, head_only: bool) -> None:
        self.label = label
        self.busy = True
        self.head_only = head_only
        self.interim = False
        self.status = 0
        self.headers = []
        self.framed = self.head_done = self.complete = self.close_delimited = False
        self.keep_alive = False
        self.received = False
        self.head_bytes = 0
        self.broken = None
        self.chunks = []
        self.buffered = 0

    def take(self) -> bytes:
        """Everything buffered so far, as one bytes object; resumes reading if it was paused."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class UpstreamHTTPResponse:
    """The head of an upstream response; the body is read with ``read()`` or ``async for``.

    The connection goes back to the pool once the body was read to the end (``read()``, the end of
    iteration, or ``aclose()`` after either); ``aclose()`` before that closes the socket instead.
    """

    __slots__ = ("_client", "_conn", "_timeout_s", "headers", "status")

    def __init__(self, client: UpstreamClient, conn: _Connection, timeout_s: float) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self._timeout_s = timeout_s
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def _broken(self, conn: _Connection) -> UpstreamError:
        self._conn = None
        self._client._discard(conn)
        return UpstreamError(f"upstream {conn.label} {conn.broken or 'closed the connection early'}")

    async def read(self) -> bytes:
        """The whole (remaining) body, at most ``MAX_BODY`` bytes; the connection is released when it returns.

        The body is taken as it arrives, like ``async for`` does, so reading never stays paused on it.
        """
        label = self._conn.label if self._conn is not None else ""
        parts: list[bytes] = []
        size = 0
        async for data in self:
            size += len(data)
            if size > MAX_BODY:
                await self.aclose()
                raise UpstreamError(f"upstream {label} sent a body over {MAX_BODY // (1024 * 1024)} MiB")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                self._conn = None
                self._client._release(conn)
                raise StopAsyncIteration
            if conn.broken is not None or conn.closed:
                raise self._broken(conn)
            try:
                await conn.wait(self._timeout_s)
            except BaseException:
                self._conn = None
                self._client._discard(conn)
                raise

    async def aclose(self) -> None:
        """Release the connection: back to the pool when the body was fully received, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and conn.broken is None:
            conn.chunks = []
            conn.buffered = 0
            self._client._release(conn)
        else:
            self._client._discard(conn)


class UpstreamClient:
    """HTTP/1.1 client with a keep-alive pool per origin. Create and use it on one event loop."""

    def __init__(
        self,
        max_per_origin: int = 64,
        connect_timeout_s: float = 5,
        idle_timeout_s: float = 30,
        *,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._max = max_per_origin
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._targets: dict[str, _Target] = {}
        self._closed = False

    # --- public ---

    async def request(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout_s: float,
        route: str | None = None,
    ) -> UpstreamHTTPResponse:
        """Send one request and wait (at most ``timeout_s``) for the response head.

        ``headers`` must not include Host or Content-Length (set here). ``route`` names the upstream in
        error messages (the host when omitted).
        """
        if self._closed:
            raise RuntimeError("UpstreamClient is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        label = route or target.host
        head = [method.encode(), b" ", target.path, b" HTTP/1.1\r\nhost: ", target.host_header, b"\r\n"]
        if body or method not in ("GET", "HEAD"):
            head += (b"content-length: ", b"%d" % len(body), b"\r\n")
        for name, value in headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise UpstreamError(f"a header for upstream {label} contains a line break")
            head += (name, b": ", value, b"\r\n")
        head += (b"\r\n", body)
        payload = b"".join(head)
        pool = self._pools.get(target.origin)
        if pool is None:
            pool = self._pools[target.origin] = _Pool()
        for attempt in (0, 1):
            conn = await self._acquire(pool, target, label, timeout_s, fresh=attempt == 1)
            try:
                await self._exchange(conn, label, method == "HEAD", payload, timeout_s)
            except _StaleConnection:
                self._discard(conn)
                if attempt == 0:
                    continue
                raise UpstreamError(f"upstream {label} closed the connection without answering") from None
            except BaseException:
                self._discard(conn)
                raise
            return UpstreamHTTPResponse(self, conn, timeout_s)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close every connection (pooled or in use) and wait briefly until the sockets are gone."""
        self._closed = True
        lost: list[asyncio.Future[None]] = []
        for pool in self._pools.values():
            if pool.sweep is not None:
                pool.sweep.cancel()
                pool.sweep = None
            for conn in list(pool.conns):
                if not conn.closed:
                    if conn.lost is None:
                        conn.lost = conn.loop.create_future()
                    lost.append(conn.lost)
                    conn.close()
            pool.idle.clear()
            for waiter in pool.waiters:
                if not waiter.done():
                    waiter.set_result(True)
        if lost:
            await asyncio.wait(lost, timeout=_CLOSE_GRACE_S)

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- pool ---

    def _target(self, url: str) -> _Target:
        target = _Target(url)
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        self._targets[url] = target
        return target

    async def _exchange(
        self, conn: _Connection, label: str, head_only: bool, payload: bytes, timeout_s: float
    ) -> None:
        reused = conn.reused
        conn.begin(label, head_only)
        assert conn.transport is not None
        conn.transport.write(payload)
        while not conn.head_done:
            if conn.closed or conn.broken is not None:
                if reused and not conn.received:
                    raise _StaleConnection
                raise UpstreamError(
                    f"upstream {label} {conn.broken or 'closed the connection without answering'}"
                )
            await conn.wait(timeout_s)

    async def _acquire(
        self, pool: _Pool, target: _Target, label: str, timeout_s: float, *, fresh: bool = False
    ) -> _Connection:
        """An idle pooled connection, else a new one, else wait for a slot. ``fresh`` (the retry after a
        stale connection) skips the idle ones: the server may have dropped them all at once."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise RuntimeError("UpstreamClient is closed")
            idle = pool.idle
            if fresh and idle and len(pool.conns) + pool.opening >= self._max:
                self._discard(idle.popleft())  # make room for the fresh connection
            while idle and not fresh:
                conn = idle.pop()
                if conn.usable() and loop.time() - conn.idle_since < self._idle_timeout_s:
                    return conn
                self._discard(conn)
            if len(pool.conns) + pool.opening < self._max:
                return await self._connect(loop, pool, target, label)
            waiter: asyncio.Future[bool] = loop.create_future()
            pool.waiters.append(waiter)
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                got = await waiter
            finally:
                timer.cancel()
            if not got:
                raise UpstreamTimeout(f"upstream {label}: no free connection within {timeout_s:g} s")

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, pool: _Pool, target: _Target, label: str
    ) -> _Connection:
        ssl_context = None
        if target.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self._ca_file)
            ssl_context = self._ssl
        pool.opening += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop, pool),
                    target.host,
                    target.port,
                    ssl=ssl_context,
                    server_hostname=target.host if target.tls else None,
                ),
                self._connect_timeout_s,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {label} unreachable (connect timed out)") from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"upstream {label} failed the TLS handshake") from exc
        except OSError as exc:
            raise UpstreamError(f"upstream {label} unreachable") from exc
        finally:
            pool.opening -= 1
            if pool.waiters:
                pool.wake_one()
        pool.conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the idle pool if the connection can carry another exchange, else close it."""
        conn.busy = False
        if not conn.keep_alive or not conn.usable() or self._closed:
            conn.close()
            return
        if conn.read_paused and conn.transport is not None:
            conn.read_paused = False
            conn.transport.resume_reading()  # so a close by the server while idle is noticed
        conn.reused = True
        pool = conn.pool
        conn.idle_since = conn.loop.time()
        pool.idle.append(conn)
        if pool.sweep is None:
            pool.sweep = conn.loop.call_later(self._idle_timeout_s, self._sweep, pool)
        if pool.waiters:
            pool.wake_one()

    def _discard(self, conn: _Connection) -> None:
        conn.busy = False
        conn.close()

    def _sweep(self, pool: _Pool) -> None:
        pool.sweep = None
        if not pool.idle:
            return
        loop = pool.idle[0].loop
        now = loop.time()
        while pool.idle and now - pool.idle[0].idle_since >= self._idle_timeout_s:
            self._discard(pool.idle.popleft())
        if pool.idle:
            delay = self._idle_timeout_s - (now - pool.idle[0].idle_since)
            pool.sweep = loop.call_later(max(delay, 0.01), self._sweep, pool)
