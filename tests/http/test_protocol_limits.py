"""The HTTP protocol on a mock transport: size caps, timeouts, the concurrency cap, backpressure, drops."""

from __future__ import annotations

import asyncio

import pytest

from appliance.errors import ClientDisconnected, PayloadTooLarge
from appliance.http import Request, Responder
from appliance.http.protocol import HttpProtocol
from tests.http._harness import SIMPLE_GET, Harness, MockTransport, async_test, echo, ok, parse_responses


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", "request line too long"),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", "too many"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", "headers too large"),
    ],
    ids=["long-url", "many-headers", "big-header"],
)
@async_test
async def test_oversized_heads_are_431(request_bytes: bytes, message: str) -> None:
    h = Harness(ok)
    h.feed(request_bytes)
    await h.settle()
    [response] = h.responses()
    assert response.status == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
    assert message in response.json()["error"]["message"]
    assert h.transport.closed
    assert [r.status for r in h.rejections] == [431]


@async_test
async def test_head_growing_in_pieces_past_the_cap_is_431() -> None:
    h = Harness(ok, max_header_bytes=1000, max_request_line_bytes=100, max_header_count=10)
    h.feed(b"GET / HTTP/1.1\r\nX-Slow: ")
    for _ in range(20):
        h.feed(b"v" * 100)
        if h.transport.closed:
            break
    await h.settle()
    [response] = h.responses()
    assert response.status == 431


@async_test
async def test_content_length_over_limit_is_413_before_reading_the_body() -> None:
    called = False

    async def handler(request: Request, responder: Responder) -> None:
        nonlocal called
        called = True

    h = Harness(handler, max_body_bytes=100)
    h.feed(b"POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"a" * 50)
    await h.settle()
    [response] = h.responses()
    assert response.status == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.headers[b"connection"] == b"close"
    assert h.transport.closed
    assert h.transport.read_paused
    assert not called
    assert [(r.status, r.path) for r in h.rejections] == [(413, "/x")]


@async_test
async def test_chunked_body_over_limit_is_413_and_closes() -> None:
    h = Harness(echo, max_body_bytes=8)
    h.feed(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await asyncio.sleep(0)
    h.feed(b"5\r\nworld\r\n0\r\n\r\n")
    await h.settle()
    [response] = h.responses()
    assert response.status == 413
    assert h.transport.closed


@async_test
async def test_read_pauses_above_threshold_and_resumes_when_the_handler_reads() -> None:
    gate = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await gate.wait()
        await echo(request, responder)

    h = Harness(handler, read_pause_bytes=1000)
    h.feed(b"POST /x HTTP/1.1\r\nContent-Length: 3000\r\n\r\n" + b"a" * 500)
    assert not h.transport.read_paused
    h.feed(b"a" * 1000)
    assert h.transport.read_paused
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not h.transport.read_paused  # the handler asked for the body
    h.feed(b"a" * 1500)
    await h.settle()
    [response] = h.responses()
    assert response.body == b"a" * 3000


@async_test
async def test_write_waits_for_drain_when_the_transport_is_paused() -> None:
    progress: list[str] = []
    gate = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        progress.append("started")
        await gate.wait()
        await responder.write(b"chunk")
        progress.append("written")
        await responder.end()

    h = Harness(handler)
    h.protocol.pause_writing()
    h.feed(SIMPLE_GET)
    for _ in range(5):
        await asyncio.sleep(0)
    assert progress == []  # start() waits too
    h.protocol.resume_writing()
    for _ in range(2):
        await asyncio.sleep(0)
    assert progress[0] == "started"
    h.protocol.pause_writing()
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert progress == ["started"]
    assert b"5\r\nchunk" not in h.transport.buffer
    h.protocol.resume_writing()
    await h.settle()
    assert progress == ["started", "written"]
    assert h.responses()[0].body == b"chunk"


@async_test
async def test_connection_lost_wakes_every_waiter() -> None:
    outcomes: dict[str, str] = {}
    entered = asyncio.Event()

    async def body_reader(request: Request, responder: Responder) -> None:
        async def watch() -> None:
            await responder.wait_disconnected()
            outcomes["watch"] = "woken"

        watcher = asyncio.create_task(watch())
        entered.set()
        try:
            await request.body()
        except ClientDisconnected:
            outcomes["body"] = "ClientDisconnected"
        await watcher
        assert responder.disconnected
        await responder.send(200, [], b"nobody listens")  # a no-op now
        await responder.start(200, [])
        with pytest.raises(ClientDisconnected):
            await responder.write(b"x")

    h = Harness(body_reader)
    h.feed(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    await entered.wait()
    await asyncio.sleep(0)
    h.lose()
    await h.settle()
    assert outcomes == {"body": "ClientDisconnected", "watch": "woken"}
    assert h.transport.buffer == b""


@async_test
async def test_connection_lost_wakes_a_writer_waiting_for_drain() -> None:
    outcome: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        h.protocol.pause_writing()
        try:
            await responder.write(b"x")
        except ClientDisconnected:
            outcome.append("disconnected")

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    for _ in range(5):
        await asyncio.sleep(0)
    h.lose()
    await h.settle()
    assert outcome == ["disconnected"]


@async_test
async def test_concurrency_cap_is_503_without_calling_the_handler() -> None:
    gate = asyncio.Event()
    calls: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        calls.append(request.path)
        await gate.wait()
        await ok(request, responder)

    first = Harness(handler, max_concurrency=1)
    second = HttpProtocol(first.state)
    transport = MockTransport()
    second.connection_made(transport)
    first.feed(b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0)
    second.data_received(b"POST /refused HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    [refused] = parse_responses(transport.take())
    assert refused.status == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert calls == ["/slow"]
    assert [(r.status, r.code, r.path) for r in first.rejections] == [(503, "overloaded", "/refused")]
    assert not transport.closed  # the connection stays usable
    gate.set()
    await first.settle()
    second.data_received(b"GET /later HTTP/1.1\r\n\r\n")
    await first.settle()
    assert parse_responses(transport.take())[0].body == b"ok /later"


@async_test
async def test_header_timeout_is_408() -> None:
    h = Harness(ok, header_timeout_s=0.05)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
    await asyncio.sleep(0.1)
    [response] = h.responses()
    assert response.status == 408
    assert response.json()["error"]["type"] == "timeout_error"
    assert h.transport.closed
    assert [r.status for r in h.rejections] == [408]


@async_test
async def test_body_timeout_raises_request_timeout_in_the_handler() -> None:
    h = Harness(echo, body_timeout_s=0.05)
    h.feed(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    await asyncio.sleep(0.1)
    await h.settle()
    [response] = h.responses()
    assert response.status == 408
    assert h.transport.closed


@async_test
async def test_body_error_surfaces_through_body() -> None:
    errors: list[Exception] = []

    async def handler(request: Request, responder: Responder) -> None:
        try:
            await request.body()
        except PayloadTooLarge as exc:
            errors.append(exc)
            await responder.send(413, [], b"")

    h = Harness(handler, max_body_bytes=4)
    h.feed(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    await asyncio.sleep(0)
    h.feed(b"9\r\ntoo large\r\n")
    await h.settle()
    assert len(errors) == 1
    assert h.transport.closed
