"""The HTTP server end to end: real sockets on 127.0.0.1, under both the asyncio and the uvloop loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys

import pytest

from appliance.errors import ClientDisconnected
from appliance.http import (
    HttpLimits,
    HttpServer,
    Request,
    Responder,
    install_event_loop_policy,
)
from tests.http._sockets import Client, Runner, serving


async def hello(request: Request, responder: Responder) -> None:
    await responder.send(200, [(b"content-type", b"text/plain")], f"hello {request.client}".encode())


GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def test_keep_alive_reuses_the_connection(run: Runner) -> None:
    async def main() -> None:
        async with serving(hello) as server:
            client = await Client.connect(server.port)
            first = await client.request(GET)
            second = await client.request(GET)
            assert first.status == second.status == 200
            assert first.body == second.body  # same client address: same connection
            assert len(server._state.connections) == 1
            await client.close()

    run(main())


def test_pipelined_requests_over_one_socket(run: Runner) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await asyncio.sleep(0.03 if request.path == "/1" else 0)
        await responder.send(200, [], request.path.encode())

    async def main() -> None:
        async with serving(handler) as server:
            client = await Client.connect(server.port)
            await client.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(1, 6)))
            bodies = [bytes((await client.response()).body) for _ in range(5)]
            assert bodies == [b"/1", b"/2", b"/3", b"/4", b"/5"]
            await client.close()

    run(main())


def test_slowloris_head_gets_408(run: Runner) -> None:
    async def main() -> None:
        async with serving(hello, header_timeout_s=0.2) as server:
            client = await Client.connect(server.port)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for piece in (b"GET / HTTP/1.1\r\n", b"Host: t\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n"):
                with contextlib.suppress(ConnectionError):
                    await client.send(piece)
                await asyncio.sleep(0.08)
            response = await client.response()
            assert response.status == 408
            assert response.headers[b"content-type"] == b"application/json"
            assert await client.closed_by_server()
            assert loop.time() - started < 2.0
            await client.close()

    run(main())


def test_idle_keep_alive_connection_is_closed(run: Runner) -> None:
    async def main() -> None:
        async with serving(hello, keepalive_timeout_s=0.2) as server:
            client = await Client.connect(server.port)
            assert (await client.request(GET)).status == 200
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await client.closed_by_server(wait_s=2.0)
            assert 0.15 < loop.time() - started < 2.0
            await client.close()

    run(main())


def test_graceful_shutdown_finishes_the_stream_and_refuses_new_connections(run: Runner) -> None:
    async def streamer(request: Request, responder: Responder) -> None:
        await responder.start(200, [(b"content-type", b"text/event-stream")])
        for i in range(6):
            await responder.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.05)
        await responder.end()

    async def main() -> None:
        server = HttpServer(streamer, HttpLimits(drain_timeout_s=5))
        await server.start("127.0.0.1", 0)
        port = server.port
        client = await Client.connect(port)
        idle = await Client.connect(port)
        await client.send(GET)
        await client.read_some()  # the head and the first chunk are out
        assert server.in_flight == 1
        shutdown = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0.02)
        with pytest.raises(OSError):
            refused = await Client.connect(port)
            await refused.close()
        assert await idle.closed_by_server()
        response = await client.response()
        assert response.status == 200
        assert bytes(response.body) == b"".join(b"data: %d\n\n" % i for i in range(6))
        assert await client.closed_by_server()
        await asyncio.wait_for(shutdown, 5)
        assert server.in_flight == 0
        await client.close()
        await idle.close()

    run(main())


def test_drain_timeout_cancels_a_stuck_handler(run: Runner) -> None:
    cancelled: list[bool] = []
    entered: list[asyncio.Event] = []

    async def stuck(request: Request, responder: Responder) -> None:
        entered[0].set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        entered.append(asyncio.Event())
        server = HttpServer(stuck, HttpLimits(drain_timeout_s=0.2))
        await server.start("127.0.0.1", 0)
        client = await Client.connect(server.port)
        await client.send(GET)
        await asyncio.wait_for(entered[0].wait(), 5)
        assert server.in_flight == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.shutdown()
        assert 0.15 < loop.time() - started < 3.0
        assert cancelled == [True]
        assert server.in_flight == 0
        assert await client.closed_by_server()
        await client.close()

    run(main())


def test_client_disconnect_mid_stream_reaches_the_handler(run: Runner) -> None:
    seen: dict[str, bool] = {}

    async def main() -> None:
        done = asyncio.Event()

        async def streamer(request: Request, responder: Responder) -> None:
            watcher = asyncio.create_task(responder.wait_disconnected())
            await responder.start(200, [])
            try:
                while True:
                    await responder.write(b"token ")
                    await asyncio.sleep(0.01)
            except ClientDisconnected:
                seen["write raised"] = True
            await asyncio.wait_for(watcher, 2)
            seen["wait_disconnected returned"] = responder.disconnected
            done.set()

        async with serving(streamer) as server:
            client = await Client.connect(server.port)
            await client.send(GET)
            await client.read_some()
            await client.close()
            await asyncio.wait_for(done.wait(), 5)
        assert seen == {"write raised": True, "wait_disconnected returned": True}

    run(main())


def test_large_stream_to_a_slow_reader_is_backpressured(run: Runner) -> None:
    total = 10 * 1024 * 1024
    piece = b"x" * 65536
    written = [0]
    finished = [False]

    async def big(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        while written[0] < total:
            await responder.write(piece)
            written[0] += len(piece)
        await responder.end()
        finished[0] = True

    async def main() -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # inherited by accepted sockets
        listener.bind(("127.0.0.1", 0))
        async with serving(big, sock=listener) as server:
            client = await Client.connect(server.port, rcvbuf=65536)
            await client.send(GET)
            await asyncio.sleep(0.3)  # the client reads nothing
            assert not finished[0]
            assert written[0] < total // 2
            [conn] = server._state.connections
            assert conn.transport.get_write_buffer_size() < 512 * 1024
            response = await client.response(wait_s=10)
            assert len(response.body) == total
            assert finished[0]
            await client.close()

    run(main())


def test_limits_refusals_over_real_sockets(run: Runner) -> None:
    async def main() -> None:
        async with serving(hello, max_body_bytes=10) as server:
            client = await Client.connect(server.port)
            response = await client.request(b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
            assert response.status == 413
            assert await client.closed_by_server()
            await client.close()
            client = await Client.connect(server.port)
            response = await client.request(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n")
            assert response.status == 431
            await client.close()

    run(main())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_serve_until_signalled_drains_on_sigterm(run: Runner) -> None:
    async def main() -> None:
        server = HttpServer(hello)
        await server.start("127.0.0.1", 0)
        port = server.port
        waiting = asyncio.create_task(server.serve_until_signalled())
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(waiting, 5)
        with pytest.raises(OSError):
            await Client.connect(port)

    run(main())


def test_install_event_loop_policy_names_the_loop() -> None:
    try:
        name = install_event_loop_policy()
        assert name in {"uvloop", "asyncio"}
        if name == "uvloop":
            assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)


def test_a_client_closing_its_side_is_gone_and_its_handler_is_told(run: Runner) -> None:
    told = asyncio.Event()

    async def slow(request: Request, responder: Responder) -> None:
        await responder.wait_disconnected()
        told.set()

    async def main() -> None:
        async with serving(slow) as server:
            client = await Client.connect(server.port)
            await client.send(GET)
            client.writer.write_eof()
            await asyncio.wait_for(told.wait(), 2)
            await client.close()

    run(main())


async def unauthorized(request: Request, responder: Responder) -> None:
    if "authorization" in request.headers:
        await request.body()
        await responder.send(200, [], b"authenticated")
        return
    await responder.send(401, [], b"no token")


def test_chunked_trailer_cannot_authenticate(run: Runner) -> None:
    async def main() -> None:
        async with serving(unauthorized) as server:
            client = await Client.connect(server.port)
            response = await client.request(
                b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\nAuthorization: Bearer secret\r\n\r\n"
            )
            assert response.status == 401
            await client.close()

    run(main())


def test_early_answer_without_the_body_is_closed(run: Runner) -> None:
    async def main() -> None:
        async with serving(unauthorized, keepalive_timeout_s=0.2) as server:
            client = await Client.connect(server.port)
            response = await client.request(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
            assert response.status == 401
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await client.closed_by_server(wait_s=2.0)
            assert loop.time() - started < 2.0
            assert not server._state.connections
            await client.close()

    run(main())
