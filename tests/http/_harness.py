"""The HTTP protocol without sockets: a mock transport, requests as bytes, the responses written, parsed."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httptools

from appliance.http import HttpLimits, Rejection, Request, Responder
from appliance.http.protocol import HttpProtocol, ServerState

SIMPLE_GET = b"GET /v1/models HTTP/1.1\r\nHost: example.org\r\n\r\n"
SIMPLE_HEAD = b"HEAD /v1/models HTTP/1.1\r\nHost: example.org\r\n\r\n"
SIMPLE_POST = b"POST /echo?x=1 HTTP/1.1\r\nHost: example.org\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED_POST = (
    b"POST /echo HTTP/1.1\r\nHost: example.org\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
)
CONNECTION_CLOSE_GET = b"GET / HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n"
HTTP10_GET = b"GET / HTTP/1.0\r\n\r\n"
HTTP10_KEEPALIVE_GET = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
MALFORMED = b"GET / HTTP/1.1\r\nHost: example.org\r\nBad Header\r\n\r\n"
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
EXPECT_HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop, bounded by a timeout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 10))

    return wrapper


class MockTransport(asyncio.Transport):
    """A transport that keeps what is written. ``half_close``: it supports ``write_eof``, as TCP does (off
    by default, as for TLS, so tests see the plain close unless they ask for the lingering one)."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 54321), *, half_close: bool = False) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.closed = False
        self.read_paused = False
        self.peer = peer
        self.half_close = half_close
        self.eof_written = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        assert not self.eof_written, "write after write_eof"
        self.buffer += data

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        assert self.half_close, "write_eof on a transport that cannot"
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.chunks: list[bytes] = []

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[Response]:
    """Split what the server wrote into responses (not for answers to HEAD)."""
    responses: list[Response] = []

    class Callbacks:
        def on_message_begin(self) -> None:
            responses.append(Response())

        def on_header(self, name: bytes, value: bytes) -> None:
            responses[-1].headers[name.lower()] = value

        def on_headers_complete(self) -> None:
            responses[-1].status = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            responses[-1].body += body
            responses[-1].chunks.append(body)

    parser = httptools.HttpResponseParser(Callbacks())
    parser.feed_data(data)
    return responses


class Harness:
    """One protocol on a mock transport, with the rejections it reported."""

    def __init__(
        self,
        handler: Callable[[Request, Responder], Awaitable[None]],
        *,
        half_close: bool = False,
        exempt: Callable[[Request], bool] | None = None,
        **limits: Any,
    ) -> None:
        self.rejections: list[Rejection] = []
        self.state = ServerState(handler, HttpLimits(**limits), self.rejections.append, exempt)
        self.protocol, self.transport = self.open(half_close=half_close)

    def open(
        self, peer: tuple[str, int] = ("127.0.0.1", 54321), *, half_close: bool = False
    ) -> tuple[HttpProtocol, MockTransport]:
        """Another connection to the same server state."""
        protocol = HttpProtocol(self.state)
        transport = MockTransport(peer, half_close=half_close)
        protocol.connection_made(transport)
        return protocol, transport

    def feed(self, data: bytes) -> None:
        self.protocol.data_received(data)

    async def settle(self) -> None:
        """Let handler tasks run until every one of them has finished."""
        for _ in range(5):
            await asyncio.sleep(0)
        if self.state.tasks:
            await asyncio.wait(list(self.state.tasks), timeout=5)

    def responses(self) -> list[Response]:
        return parse_responses(self.transport.take())

    def lose(self) -> None:
        self.transport.closed = True
        self.protocol.connection_lost(None)


async def ok(request: Request, responder: Responder) -> None:
    await responder.send(200, [(b"content-type", b"text/plain")], b"ok " + request.path.encode())


async def echo(request: Request, responder: Responder) -> None:
    body = await request.body()
    assert await request.body() is body  # a second call returns the same bytes
    await responder.send(200, [], body)
