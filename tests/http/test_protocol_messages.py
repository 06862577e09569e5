"""The HTTP protocol on a mock transport: parsing, framing, keep-alive, pipelining, handler failures."""

from __future__ import annotations

import asyncio
import logging

import pytest

from appliance.errors import GatewayError, RateLimited
from appliance.http import Rejection, Request, Responder
from tests.http._harness import (
    CHUNKED_POST,
    CONNECTION_CLOSE_GET,
    EXPECT_HEAD,
    HTTP10_GET,
    HTTP10_KEEPALIVE_GET,
    MALFORMED,
    SIMPLE_GET,
    SIMPLE_HEAD,
    SIMPLE_POST,
    UPGRADE,
    Harness,
    async_test,
    echo,
    ok,
    parse_responses,
)


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
async def test_on_reject_failure_does_not_break_the_server(caplog: pytest.LogCaptureFixture) -> None:
    def explode(rejection: Rejection) -> None:
        raise RuntimeError("audit down")

    h = Harness(ok)
    h.state.admission.on_reject = explode
    with caplog.at_level(logging.ERROR, logger="phi.http"):
        h.feed(MALFORMED)
        await h.settle()
    assert h.responses()[0].status == 400
    assert "on_reject callback failed" in caplog.text


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


def test_request_ids_are_unique_hex_and_ordered_by_time() -> None:
    from appliance.http.protocol import new_request_id

    ids = [new_request_id() for _ in range(5000)]  # past one 4 KiB pool of random bytes
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert [i[:12] for i in ids] == sorted(
        i[:12] for i in ids
    )  # milliseconds first: the index grows at its end
