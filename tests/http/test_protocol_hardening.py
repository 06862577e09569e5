"""Hardening: lingering close, head bytes per request, the body deadline, connection and address caps,
requests exempt from the concurrency caps, and one shape for every refusal the server answers itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from appliance.http import Rejection, Request, Responder
from tests.http._harness import (
    MALFORMED,
    UPGRADE,
    Harness,
    MockTransport,
    async_test,
    ok,
    parse_responses,
)
from tests.http._sockets import (
    Client,
    Response,
    Runner,
    raw_connect,
    read_until_closed,
    second_address,
    serving,
    until,
)

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
HALF_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\n"
BIG_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 200_000 + b"\r\n\r\n"


def parse_one(data: bytes) -> Response:
    """The single response in ``data``."""
    [response] = parse_responses(data)
    return response


async def gated(request: Request, responder: Responder, gate: asyncio.Event) -> None:
    if request.path == "/slow":
        await gate.wait()
    await responder.send(200, [], request.path.encode())


# ---- 1. lingering close ---------------------------------------------------------------------------


def test_an_oversized_head_is_answered_in_full_not_reset(run: Runner) -> None:
    async def main() -> None:
        async with serving(ok) as server:
            sock = await raw_connect(server.port)
            try:
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(sock, BIG_HEAD)  # a reset here or below fails the test
                response = parse_one(await read_until_closed(sock))
            finally:
                sock.close()
            assert response.status == 431
            assert json.loads(response.body)["error"]["code"] == "request_header_fields_too_large"
            assert response.headers[b"connection"] == b"close"

    run(main())


@async_test
async def test_lingering_close_reads_and_drops_input_up_to_its_byte_cap() -> None:
    h = Harness(ok, half_close=True, lingering_bytes=1000, max_body_bytes=1000)
    h.feed(b"POST /x HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 100)
    await h.settle()
    [response] = h.responses()
    assert response.status == 413
    assert h.transport.eof_written and not h.transport.closed
    assert not h.transport.read_paused  # reading on, so the peer's unread bytes never turn into a reset
    h.feed(b"a" * 900)
    assert not h.transport.closed
    h.feed(b"a" * 200)
    assert h.transport.closed
    assert h.transport.take() == b""


@async_test
async def test_lingering_close_ends_at_its_timeout_or_at_the_clients_eof() -> None:
    h = Harness(ok, half_close=True, lingering_timeout_s=0.05)
    h.feed(MALFORMED)
    await h.settle()
    assert h.transport.eof_written and not h.transport.closed
    await asyncio.sleep(0.1)
    assert h.transport.closed
    other, _ = h.open(half_close=True)
    other.data_received(MALFORMED)
    await h.settle()
    assert other.eof_received() is False  # False: asyncio closes the transport now


# ---- 2. head bytes counted per request -------------------------------------------------------------


@async_test
async def test_pipelined_requests_in_one_segment_are_not_one_big_head() -> None:
    h = Harness(ok, max_pipelined=10_000)
    many = GET * 2000  # 54 KB of heads, more than the head cap of one request
    h.feed(GET[:8])
    h.feed(GET[8:] + many + GET[:8])  # starts and ends in the middle of a head
    h.feed(GET[8:])
    while h.protocol.active is not None:
        await h.settle()
    statuses = [r.status for r in h.responses()]
    assert statuses == [200] * 2002
    assert h.rejections == []


# ---- 3. the body deadline --------------------------------------------------------------------------


def test_a_dribbled_body_meets_the_total_deadline(run: Runner) -> None:
    async def echo(request: Request, responder: Responder) -> None:
        await responder.send(200, [], await request.body())

    async def main() -> None:
        async with serving(echo, body_timeout_s=5.0, body_deadline_s=0.3) as server:
            client = await Client.connect(server.port)
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")

            async def dribble() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(60):  # one byte every 50 ms: never a gap of body_timeout_s
                        await client.send(b"a")
                        await asyncio.sleep(0.05)

            dribbler = asyncio.create_task(dribble())
            try:
                response = await client.response(wait_s=3.0)
            finally:
                dribbler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dribbler
            assert response.status == 408
            assert response.headers[b"connection"] == b"close"
            assert await client.closed_by_server()
            await client.close()

    run(main())


# ---- 4. connection and address caps ----------------------------------------------------------------


def test_connections_over_the_global_cap_are_turned_away_with_503(run: Runner) -> None:
    async def main() -> None:
        rejections: list[Rejection] = []
        async with serving(ok, rejections=rejections, max_connections=2) as server:
            first, second = await Client.connect(server.port), await Client.connect(server.port)
            assert (await first.request(GET)).status == (await second.request(GET)).status == 200
            sock = await raw_connect(server.port)
            try:
                response = parse_one(await read_until_closed(sock))
            finally:
                sock.close()
            assert response.status == 503
            assert json.loads(response.body)["error"]["code"] == "too_many_connections"
            assert [(r.status, r.code, r.path) for r in rejections] == [(503, "too_many_connections", None)]
            await first.close()
            await until(lambda: len(server._state.connections) <= 1)
            third = await Client.connect(server.port)
            assert (await third.request(GET)).status == 200
            await second.close()
            await third.close()

    run(main())


def test_one_address_flooding_half_sent_heads_does_not_lock_out_another(run: Runner) -> None:
    other = second_address()
    if other is None:
        pytest.skip("no second loopback address")

    async def main() -> None:
        limits: dict[str, Any] = {"max_connections": 8, "max_connections_per_address": 4}
        async with serving(ok, header_timeout_s=0.5, **limits) as server:
            loop = asyncio.get_running_loop()
            flood = [await raw_connect(server.port) for _ in range(12)]  # more than max_connections
            try:

                async def answer(sock: socket.socket) -> bytes | None:
                    try:
                        return await asyncio.wait_for(loop.sock_recv(sock, 65536), 0.3)
                    except TimeoutError:
                        return None

                answers = await asyncio.gather(*(answer(sock) for sock in flood))
                admitted = [sock for sock, data in zip(flood, answers, strict=True) if data is None]
                turned_away = [parse_one(data) for data in answers if data]
                assert len(admitted) == 4
                assert [r.status for r in turned_away] == [429] * 8
                assert json.loads(turned_away[0].body)["error"]["code"] == "too_many_connections_from_address"
                for sock in admitted:
                    await loop.sock_sendall(sock, HALF_HEAD)

                neighbour = await Client.connect(server.port, source=other)
                assert (await neighbour.request(GET)).status == 200
                await neighbour.close()

                for sock in admitted:  # the header timeout frees the flooder's slots
                    assert parse_one(await read_until_closed(sock)).status == 408
                    sock.close()  # the end of the server's lingering close
                await until(lambda: not server._state.connections)
                again = await Client.connect(server.port)
                assert (await again.request(GET)).status == 200
                await again.close()
            finally:
                for sock in flood:
                    sock.close()

    run(main())


def test_requests_over_the_per_address_concurrency_cap_are_429(run: Runner) -> None:
    other = second_address()
    if other is None:
        pytest.skip("no second loopback address")

    async def main() -> None:
        gate = asyncio.Event()
        rejections: list[Rejection] = []

        async def handler(request: Request, responder: Responder) -> None:
            await gated(request, responder, gate)

        async with serving(handler, rejections=rejections, max_concurrency_per_address=1) as server:
            slow = await Client.connect(server.port)
            await slow.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await until(lambda: server.in_flight >= 1)
            same = await Client.connect(server.port)
            refused = await same.request(b"GET /more HTTP/1.1\r\nHost: t\r\n\r\n")
            assert refused.status == 429
            assert json.loads(refused.body)["error"]["code"] == "too_many_requests_from_address"
            assert b"retry-after" in refused.headers
            assert [(r.status, r.code, r.path) for r in rejections] == [
                (429, "too_many_requests_from_address", "/more")
            ]
            neighbour = await Client.connect(server.port, source=other)
            assert (await neighbour.request(b"GET /fine HTTP/1.1\r\nHost: t\r\n\r\n")).status == 200
            gate.set()
            assert (await slow.response()).status == 200
            assert (await same.request(b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n")).status == 200
            for client in (slow, same, neighbour):
                await client.close()

    run(main())


# ---- 5. requests exempt from the concurrency caps --------------------------------------------------


def test_exempt_requests_bypass_the_concurrency_caps(run: Runner) -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def handler(request: Request, responder: Responder) -> None:
            await gated(request, responder, gate)

        async with serving(
            handler,
            exempt=lambda request: request.path == "/health",
            max_concurrency=1,
            max_concurrency_per_address=1,
        ) as server:
            slow = await Client.connect(server.port)
            await slow.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            await until(lambda: server.in_flight >= 1)
            client = await Client.connect(server.port)
            assert (await client.request(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")).status in (429, 503)
            health = await client.request(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert health.status == 200
            assert bytes(health.body) == b"/health"
            gate.set()
            assert (await slow.response()).status == 200
            assert server.in_flight == 0
            await slow.close()
            await client.close()

    run(main())


# ---- 6. one shape for every refusal ----------------------------------------------------------------

Scenario = Callable[[Harness, asyncio.Event], Awaitable[MockTransport]]


async def _feed(h: Harness, data: bytes) -> MockTransport:
    h.feed(data)
    await asyncio.sleep(0)
    return h.transport


async def _behind_slow(h: Harness, gate: asyncio.Event, data: bytes, wait_s: float = 0.0) -> MockTransport:
    """``data`` pipelined behind a request whose handler waits, so the server, not a handler, refuses it."""
    h.feed(b"GET /slow HTTP/1.1\r\n\r\n" + data)
    await asyncio.sleep(wait_s)
    gate.set()
    return h.transport


async def _second_connection(h: Harness, gate: asyncio.Event, peer: str = "127.0.0.1") -> MockTransport:
    h.feed(b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0)
    other, transport = h.open((peer, 40000))
    other.data_received(b"GET /refused HTTP/1.1\r\n\r\n")
    gate.set()
    return transport


async def _connection_turned_away(h: Harness, gate: asyncio.Event) -> MockTransport:
    return h.open(("127.0.0.1", 40000))[1]


CHUNKED_HEAD = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"

REFUSALS: list[tuple[str, dict[str, Any], Scenario, int, str]] = [
    ("malformed", {}, lambda h, g: _feed(h, MALFORMED), 400, "malformed_http"),
    ("upgrade", {}, lambda h, g: _feed(h, UPGRADE), 400, "upgrade_not_supported"),
    (
        "head-timeout",
        {"header_timeout_s": 0.05},
        lambda h, g: _behind_slow(h, g, HALF_HEAD, 0.1),
        408,
        "request_timeout",
    ),
    (
        "body-deadline",
        {"body_deadline_s": 0.05},
        lambda h, g: _behind_slow(h, g, b"POST /b HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc", 0.1),
        408,
        "request_timeout",
    ),
    (
        "content-length",
        {"max_body_bytes": 10},
        lambda h, g: _feed(h, b"POST /b HTTP/1.1\r\nContent-Length: 11\r\n\r\n"),
        413,
        "payload_too_large",
    ),
    (
        "chunked-body",
        {"max_body_bytes": 4},
        lambda h, g: _behind_slow(h, g, CHUNKED_HEAD + b"9\r\ntoo large\r\n"),
        413,
        "payload_too_large",
    ),
    (
        "url",
        {},
        lambda h, g: _feed(h, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"),
        431,
        "request_header_fields_too_large",
    ),
    (
        "header",
        {},
        lambda h, g: _feed(h, b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n"),
        431,
        "request_header_fields_too_large",
    ),
    (
        "trailers",
        {},
        lambda h, g: _behind_slow(h, g, CHUNKED_HEAD + b"2\r\n{}\r\n0\r\nX-T: " + b"v" * 40000 + b"\r\n\r\n"),
        431,
        "request_header_fields_too_large",
    ),
    ("concurrency", {"max_concurrency": 1}, _second_connection, 503, "overloaded"),
    (
        "address-concurrency",
        {"max_concurrency_per_address": 1},
        _second_connection,
        429,
        "too_many_requests_from_address",
    ),
    ("connections", {"max_connections": 1}, _connection_turned_away, 503, "too_many_connections"),
    (
        "address-connections",
        {"max_connections_per_address": 1},
        _connection_turned_away,
        429,
        "too_many_connections_from_address",
    ),
]


@pytest.mark.parametrize(
    ("limits", "scenario", "status", "code"), [row[1:] for row in REFUSALS], ids=[row[0] for row in REFUSALS]
)
@async_test
async def test_every_refusal_is_json_with_a_request_id_and_is_reported(
    limits: dict[str, Any], scenario: Scenario, status: int, code: str
) -> None:
    gate = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await gated(request, responder, gate)

    h = Harness(handler, **limits)
    transport = await scenario(h, gate)
    await h.settle()
    [refused] = [r for r in parse_responses(transport.take()) if r.status >= 400]
    assert refused.status == status
    assert refused.headers[b"content-type"] == b"application/json"
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    request_id = refused.headers[b"x-request-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    [rejection] = h.rejections
    assert (rejection.status, rejection.code, rejection.request_id) == (status, code, request_id)
    assert rejection.client is not None
