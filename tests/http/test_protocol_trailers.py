"""The HTTP protocol on a mock transport: chunked trailers, and bodies that follow an early answer."""

from __future__ import annotations

import asyncio

import pytest

from appliance.http import Request, Responder
from tests.http._harness import SIMPLE_GET, Harness, async_test, echo

TRAILER_POST = (
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nAuthorization: Bearer stolen\r\nX-Trailer: t\r\n\r\n"
)


async def unauthorized(request: Request, responder: Responder) -> None:
    """Answers at once, without reading the body (what an auth check does)."""
    await responder.send(401, [], b"no")


@async_test
async def test_chunked_trailers_never_reach_the_request_headers() -> None:
    seen: list[Request] = []

    async def handler(request: Request, responder: Responder) -> None:
        seen.append(request)
        await echo(request, responder)  # the trailers are parsed by the time the body is returned

    h = Harness(handler)
    h.feed(TRAILER_POST)
    await h.settle()
    [response] = h.responses()
    assert (response.status, response.body) == (200, b"hello")
    request = seen[0]
    assert request.headers == {"host": "x", "transfer-encoding": "chunked"}
    assert request.raw_headers == [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]
    assert not h.transport.closed


@pytest.mark.parametrize(
    "trailers",
    [b"X-T: " + b"a" * 300 + b"\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(20))],
    ids=["bytes", "count"],
)
@async_test
async def test_oversized_trailers_are_431(trailers: bytes) -> None:
    h = Harness(echo, max_header_bytes=200, max_header_count=10)
    h.feed(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        + trailers
        + b"\r\n"
    )
    await h.settle()
    [response] = h.responses()
    assert response.status == 431
    assert h.transport.closed


@async_test
async def test_trailer_growing_in_pieces_past_the_cap_is_431() -> None:
    h = Harness(echo, max_request_line_bytes=100, max_header_bytes=200, max_header_count=10)
    h.feed(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
    for _ in range(10):  # one trailer value that never ends: httptools would buffer it all
        if h.transport.closed:
            break
        h.feed(b"a" * 100)
        await asyncio.sleep(0)
    await h.settle()
    [response] = h.responses()
    assert response.status == 431
    assert h.transport.closed


@async_test
async def test_trailers_after_an_early_answer_are_dropped() -> None:
    h = Harness(unauthorized)
    h.feed(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    await h.settle()
    assert h.responses()[0].status == 401
    h.feed(b"0\r\nAuthorization: Bearer stolen\r\n\r\n" + SIMPLE_GET)
    await h.settle()
    assert h.responses()[0].status == 401  # the next request is unaffected by the trailer


@async_test
async def test_early_answer_closes_if_the_body_never_arrives() -> None:
    h = Harness(unauthorized, keepalive_timeout_s=0.05)
    h.feed(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    await h.settle()
    [response] = h.responses()
    assert response.status == 401
    assert not h.transport.closed  # the rest of the body may still come, and is dropped
    await asyncio.sleep(0.1)
    assert h.transport.closed


@async_test
async def test_early_answer_then_the_body_keeps_the_connection() -> None:
    h = Harness(unauthorized, keepalive_timeout_s=0.05)
    h.feed(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    await h.settle()
    assert h.responses()[0].status == 401
    h.feed(b"defghij")
    assert h.protocol._keepalive_timer is not None  # idle now: the usual keep-alive period applies
    h.feed(SIMPLE_GET)
    await h.settle()
    assert h.responses()[0].status == 401
    assert not h.transport.closed
    await asyncio.sleep(0.1)
    assert h.transport.closed


@async_test
async def test_trickled_body_after_an_early_answer_is_cut_off() -> None:
    h = Harness(unauthorized, keepalive_timeout_s=0.1)
    h.feed(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    await h.settle()
    for _ in range(10):  # a byte every 30 ms never leaves the connection idle for long
        if h.transport.closed:
            break
        h.feed(b"a")
        await asyncio.sleep(0.03)
    assert h.transport.closed


@async_test
async def test_large_chunks_are_not_mistaken_for_trailers() -> None:
    h = Harness(echo, max_request_line_bytes=100, max_header_bytes=200, max_header_count=10)
    h.feed(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n")
    h.feed(b"a" * 1000 + b"\r\n3e8\r\n")  # one chunk's data, then the next chunk-size line
    h.feed(b"b" * 1000 + b"\r\n0\r\n\r\n")
    await h.settle()
    [response] = h.responses()
    assert (response.status, response.body) == (200, b"a" * 1000 + b"b" * 1000)
