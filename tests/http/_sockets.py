"""The HTTP server over real sockets: a raw client, a server in a ``with`` block, and raw socket helpers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httptools

from appliance.http import HttpLimits, HttpServer, Rejection, Request

Runner = Callable[[Coroutine[Any, Any, None]], None]


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.chunks = 0


class Client:
    """A raw HTTP/1.1 client over asyncio streams; every wait is bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.done: list[Response] = []
        self.current: Response | None = None
        self.parser = httptools.HttpResponseParser(self)

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None, source: str | None = None) -> Client:
        if rcvbuf is None and source is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            return cls(reader, writer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf or 65536)
        return cls(reader, writer)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body
        self.current.chunks += 1

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.done.append(self.current)
        self.current = None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_some(self, wait_s: float = 5.0) -> bytes:
        data = await asyncio.wait_for(self.reader.read(65536), wait_s)
        if data:
            self.parser.feed_data(data)
        return data

    async def response(self, wait_s: float = 5.0) -> Response:
        while not self.done:
            if not await self.read_some(wait_s):
                raise ConnectionError("server closed the connection")
        return self.done.pop(0)

    async def request(self, data: bytes) -> Response:
        await self.send(data)
        return await self.response()

    async def closed_by_server(self, wait_s: float = 5.0) -> bool:
        try:
            return await self.read_some(wait_s) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def serving(
    handler: Any,
    *,
    sock: socket.socket | None = None,
    rejections: list[Rejection] | None = None,
    exempt: Callable[[Request], bool] | None = None,
    **limits: Any,
) -> AsyncIterator[HttpServer]:
    server = HttpServer(
        handler,
        HttpLimits(**limits),
        on_reject=rejections.append if rejections is not None else None,
        exempt=exempt,
    )
    if sock is None:
        await server.start("127.0.0.1", 0)
    else:
        await server.start(sock=sock)
    try:
        yield server
    finally:
        await server.shutdown()


async def until(predicate: Callable[[], bool], wait_s: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (the server's own counters, which have no event to wait on)."""
    async with asyncio.timeout(wait_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def second_address() -> str | None:
    """127.0.0.2 where this host routes all of 127/8 to loopback (Linux does), else None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.2", 0))
    except OSError:
        return None
    finally:
        probe.close()
    return "127.0.0.2"


async def raw_connect(port: int, *, source: str | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to the server (for the loop's ``sock_*`` calls)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if source is not None:
            sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_until_closed(sock: socket.socket, wait_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes its side; ``ConnectionResetError`` if it resets."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(wait_s):
        while data := await loop.sock_recv(sock, 65536):
            received += data
    return bytes(received)


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a crashed or hostile client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
