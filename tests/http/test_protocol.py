"""The HTTP protocol without sockets: a mock transport, requests as bytes, assertions on bytes written."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httptools
import pytest

from appliance.errors import ClientDisconnected, GatewayError, PayloadTooLarge, RateLimited
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
    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.closed = False
        self.read_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 54321), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.buffer += data

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

    def __init__(self, handler: Callable[[Request, Responder], Awaitable[None]], **limits: Any) -> None:
        self.rejections: list[Rejection] = []
        self.state = ServerState(handler, HttpLimits(**limits), self.rejections.append)
        self.protocol = HttpProtocol(self.state)
        self.transport = MockTransport()
        self.protocol.connection_made(self.transport)

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


@async_test
async def test_simple_get() -> None:
    seen: list[Request] = []

    async def handler(request: Request, responder: Responder) -> None:
        seen.append(request)
        await ok(request, responder)

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    await h.settle()
    raw = bytes(h.transport.buffer)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    [response] = h.responses()
    assert response.body == b"ok /v1/models"
    assert response.headers[b"content-length"] == b"13"
    assert response.headers[b"server"] == b"phi-gateway"
    assert response.headers[b"date"].endswith(b" GMT")
    assert b"connection" not in response.headers
    request = seen[0]
    assert (request.method, request.path, request.query) == ("GET", "/v1/models", "")
    assert request.headers == {"host": "example.org"}
    assert request.raw_headers == [(b"Host", b"example.org")]
    assert request.client == ("127.0.0.1", 54321)
    assert len(request.request_id) == 32
    assert not h.transport.closed
    assert h.state.in_flight == 0


@async_test
async def test_post_with_body_and_query() -> None:
    seen: list[Request] = []

    async def handler(request: Request, responder: Responder) -> None:
        seen.append(request)
        await echo(request, responder)

    h = Harness(handler)
    h.feed(SIMPLE_POST)
    await h.settle()
    [response] = h.responses()
    assert (response.status, response.body) == (200, b"hello world")
    assert seen[0].query == "x=1"


@async_test
async def test_percent_encoded_path_is_decoded_and_repeated_headers_joined() -> None:
    seen: list[Request] = []

    async def handler(request: Request, responder: Responder) -> None:
        seen.append(request)
        await ok(request, responder)

    h = Harness(handler)
    h.feed(b"GET /a%20b?q=%20 HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    await h.settle()
    assert seen[0].path == "/a b"
    assert seen[0].query == "q=%20"
    assert seen[0].headers["x-a"] == "1, 2"


@async_test
async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    h = Harness(ok)
    h.feed(SIMPLE_GET)
    await h.settle()
    h.feed(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
    await h.settle()
    assert [r.body for r in h.responses()] == [b"ok /v1/models", b"ok /second"]
    assert not h.transport.closed
    assert h.protocol._keepalive_timer is not None
    h.feed(b"G")  # any byte cancels the idle timer
    assert h.protocol._keepalive_timer is None


@async_test
async def test_pipelined_requests_are_answered_in_order() -> None:
    delays = {"/1": 0.05, "/2": 0.0, "/3": 0.02}
    running: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        running.append(request.path)
        assert len(running) == 1, "pipelined requests must run one at a time"
        await asyncio.sleep(delays[request.path])
        running.remove(request.path)
        await ok(request, responder)

    h = Harness(handler)
    h.feed(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
    assert len(h.protocol.pipeline) == 2
    for _ in range(3):
        await h.settle()
    assert [r.body for r in h.responses()] == [b"ok /1", b"ok /2", b"ok /3"]


@async_test
async def test_pipeline_cap_pauses_reading() -> None:
    gate = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await gate.wait()
        await ok(request, responder)

    h = Harness(handler, max_pipelined=2)
    h.feed(SIMPLE_GET * 3)
    assert h.transport.read_paused
    gate.set()
    for _ in range(3):
        await h.settle()
    assert len(h.responses()) == 3
    assert not h.transport.read_paused


@async_test
async def test_chunked_request_body() -> None:
    h = Harness(echo)
    h.feed(CHUNKED_POST)
    await h.settle()
    [response] = h.responses()
    assert response.body == b"hello world"


@async_test
async def test_chunked_streaming_response() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.start(200, [(b"content-type", b"text/event-stream")])
        assert responder.started
        await responder.write(b"data: 1\n\n")
        await responder.write(b"")  # no-op, must not end the stream
        await responder.write(b"data: 2\n\n")
        await responder.end()

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    await h.settle()
    raw = bytes(h.transport.buffer)
    assert b"transfer-encoding: chunked\r\n" in raw
    assert raw.endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")
    [response] = h.responses()
    assert response.chunks == [b"data: 1\n\n", b"data: 2\n\n"]
    assert b"content-length" not in response.headers


@async_test
async def test_head_writes_no_body() -> None:
    h = Harness(ok)
    h.feed(SIMPLE_HEAD)
    await h.settle()
    raw = h.transport.take()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 13\r\n" in raw
    assert raw.endswith(b"\r\n\r\n")
    assert b"ok /" not in raw


@async_test
async def test_client_connection_close_is_honoured() -> None:
    h = Harness(ok)
    h.feed(CONNECTION_CLOSE_GET)
    await h.settle()
    [response] = h.responses()
    assert response.headers[b"connection"] == b"close"
    assert h.transport.closed


@pytest.mark.parametrize(
    ("request_bytes", "keep_alive"),
    [(HTTP10_GET, False), (HTTP10_KEEPALIVE_GET, True)],
)
@async_test
async def test_http10_keep_alive_only_when_asked(request_bytes: bytes, keep_alive: bool) -> None:
    h = Harness(ok)
    h.feed(request_bytes)
    await h.settle()
    [response] = h.responses()
    assert response.headers[b"connection"] == (b"keep-alive" if keep_alive else b"close")
    assert h.transport.closed is not keep_alive


@async_test
async def test_malformed_request_is_400_and_closes() -> None:
    called = False

    async def handler(request: Request, responder: Responder) -> None:
        nonlocal called
        called = True

    h = Harness(handler)
    h.feed(MALFORMED)
    await h.settle()
    [response] = h.responses()
    assert response.status == 400
    assert response.headers[b"content-type"] == b"application/json"
    assert response.json()["error"]["code"] == "malformed_http"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert h.transport.closed
    assert not called
    assert [(r.status, r.code, r.method) for r in h.rejections] == [(400, "malformed_http", "GET")]


@async_test
async def test_upgrade_is_refused() -> None:
    h = Harness(ok)
    h.feed(UPGRADE)
    await h.settle()
    [response] = h.responses()
    assert response.status == 400
    assert response.json()["error"]["code"] == "upgrade_not_supported"
    assert h.transport.closed


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
async def test_expect_100_continue_is_sent_when_the_handler_reads() -> None:
    gate = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await gate.wait()
        await echo(request, responder)

    h = Harness(handler)
    h.feed(EXPECT_HEAD)
    for _ in range(3):
        await asyncio.sleep(0)
    assert h.transport.buffer == b""
    gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert h.transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.feed(b"hello")
    await h.settle()
    [response] = h.responses()
    assert response.body == b"hello"


@async_test
async def test_expect_100_continue_not_sent_when_refused_for_size() -> None:
    h = Harness(echo, max_body_bytes=4)
    h.feed(EXPECT_HEAD)
    await h.settle()
    raw = h.transport.take()
    assert b"100 Continue" not in raw
    assert parse_responses(raw)[0].status == 413


@async_test
async def test_handler_exception_is_a_generic_500(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        raise ValueError("secret detail")

    h = Harness(handler)
    with caplog.at_level(logging.ERROR, logger="phi.http"):
        h.feed(b"GET / HTTP/1.1\r\nAuthorization: Bearer radiology:abc123\r\n\r\n")
        await h.settle()
    [response] = h.responses()
    assert response.status == 500
    assert response.json() == {
        "error": {
            "message": "internal error",
            "type": "server_error",
            "code": "internal_error",
            "param": None,
        }
    }
    assert "secret detail" not in response.body.decode()
    assert "abc123" not in caplog.text
    assert "handler failed" in caplog.text
    assert not h.transport.closed


@async_test
async def test_gateway_error_becomes_its_status_and_body() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        raise RateLimited("slow down", retry_after=3)

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    await h.settle()
    [response] = h.responses()
    assert response.status == 429
    assert response.headers[b"retry-after"] == b"3"
    assert response.json()["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "code": "rate_limited",
        "param": None,
    }
    assert h.rejections == []  # the handler's own answer, not a server refusal


@async_test
async def test_handler_returning_without_a_response_is_500() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        return None

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    await h.settle()
    assert h.responses()[0].status == 500


@async_test
async def test_failure_after_start_truncates_the_stream() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        await responder.write(b"partial")
        raise GatewayError("upstream died")

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    await h.settle()
    raw = bytes(h.transport.buffer)
    assert raw.endswith(b"7\r\npartial\r\n")
    assert not raw.endswith(b"0\r\n\r\n")
    assert h.transport.closed


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
async def test_on_reject_failure_does_not_break_the_server(caplog: pytest.LogCaptureFixture) -> None:
    def explode(rejection: Rejection) -> None:
        raise RuntimeError("audit down")

    h = Harness(ok)
    h.state.on_reject = explode
    with caplog.at_level(logging.ERROR, logger="phi.http"):
        h.feed(MALFORMED)
        await h.settle()
    assert h.responses()[0].status == 400
    assert "on_reject callback failed" in caplog.text


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


@async_test
async def test_response_headers_cannot_be_split() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(200, [(b"x-evil", b"a\r\nset-cookie: b")], b"")

    h = Harness(handler)
    h.feed(SIMPLE_GET)
    await h.settle()
    raw = h.transport.take()
    assert b"set-cookie" not in raw
    assert parse_responses(raw)[0].status == 500


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


def test_request_ids_are_unique_hex_and_ordered_by_time() -> None:
    from appliance.http.protocol import new_request_id

    ids = [new_request_id() for _ in range(5000)]  # past one 4 KiB pool of random bytes
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert [i[:12] for i in ids] == sorted(
        i[:12] for i in ids
    )  # milliseconds first: the index grows at its end
