"""Resource bounds of the server, in process: memory per idle connection, descriptors after aborted ones.

Bounds, not speed targets: each figure is generous, so only a leak or a per-connection buffer gone
wrong fails it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys

import pytest

from tests.http._harness import ok
from tests.http._sockets import Runner, abort, raw_connect, serving, until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def idle_after_one_request(port: int, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections, each answered once and then left idle."""
    loop = asyncio.get_running_loop()

    async def one() -> socket.socket:
        sock = await raw_connect(port)
        try:
            await loop.sock_sendall(sock, GET)
            answer = b""
            while not answer.endswith(b"ok /"):
                data = await loop.sock_recv(sock, 4096)
                assert data, "closed before answering"
                answer += data
                assert answer.startswith(b"HTTP/1.1 200"[: len(answer)]), answer[:200]
        except BaseException:
            sock.close()
            raise
        return sock

    socks: list[socket.socket] = []
    for start in range(0, count, 100):
        socks += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return socks


def test_memory_per_idle_connection_is_bounded(run: Runner) -> None:
    per_connection_limit = 64 * 1024
    count = 500

    async def main() -> None:
        limits = {
            "keepalive_timeout_s": 60.0,
            "max_connections_per_address": 4 * count,
            "max_concurrency_per_address": 4 * count,
        }
        async with serving(ok, **limits) as server:
            warm = await idle_after_one_request(server.port, 50)  # first-use allocations out of the figure
            idle: list[socket.socket] = []
            try:
                gc.collect()
                before = rss_bytes()
                idle = await idle_after_one_request(server.port, count)
                assert len(server._state.connections) == 50 + count
                gc.collect()
                grown = rss_bytes() - before
                assert grown / count < per_connection_limit, f"{grown / count:.0f} bytes per idle connection"
            finally:
                for sock in warm + idle:
                    sock.close()

    run(main())


def test_descriptors_return_to_baseline_after_ten_thousand_aborted_connections(run: Runner) -> None:
    partial = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Le"

    async def main() -> None:
        async with serving(ok) as server:
            loop = asyncio.get_running_loop()
            baseline = open_descriptors()

            async def aborted() -> None:
                sock = await raw_connect(server.port)
                try:
                    await loop.sock_sendall(sock, partial)
                finally:
                    abort(sock)

            for _ in range(100):  # batches stay under max_connections_per_address
                await asyncio.gather(*(aborted() for _ in range(100)))
            await until(lambda: not server._state.connections)
            await until(lambda: open_descriptors() <= baseline)
            assert server._state.admission.connections == 0
            assert not server._state.admission._connections_of

    run(main())
