"""The load generator of ``bench/loadgen.py`` over TLS, and with a new connection per request (what one
handshake costs). Loopback only, bounded in time.

    python -m bench.tls_loadgen --port 8443 --cafile cert.pem --connections 16 --seconds 5 --header '…'
    python -m bench.tls_loadgen --port 8443 --cafile cert.pem --new-connection …   # one handshake a request
    python -m bench.tls_loadgen --port 8080 --new-connection …                     # plain TCP, to compare

Keep-alive mode drives ``loadgen``'s own connection protocol over TLS. New-connection mode opens a
connection (TCP, then the TLS handshake, verified against ``--cafile``, never resumed), sends one request
with ``Connection: close``, reads the whole answer, and starts again; ``connect_p50_ms`` is the time from
the connect call to a connection ready for the request (TCP alone without ``--cafile``).

Prints one JSON object: requests, errors, req_per_s, p50_ms, p99_ms, connect_p50_ms, connect_p99_ms.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time

import httptools

from bench.loadgen import _Conn, _pct, arguments, build_request, prepare


class _Once(asyncio.Protocol):
    """One request on a fresh connection; the future completes with its status (0: none came)."""

    def __init__(self, request: bytes, done: asyncio.Future[int]) -> None:
        self.request = request
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(0)

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self._finish(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(0)

    def _finish(self, status: int) -> None:
        if not self.done.done():
            self.done.set_result(status)


async def keep_alive(
    host: str, port: int, request: bytes, connections: int, seconds: float, context: ssl.SSLContext | None
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    stats: dict[str, list[float]] = {"latency": [], "ttfb": [], "errors": []}
    started = time.perf_counter()
    stop_at = started + seconds
    waiters = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda d=done: _Conn(request, stop_at, stats, d),  # type: ignore[misc]
            host,
            port,
            ssl=context,
            server_hostname=host if context else None,
        )
        waiters.append(done)
    await asyncio.wait_for(asyncio.gather(*waiters), seconds + 30)
    elapsed = time.perf_counter() - started
    latency = sorted(stats["latency"])
    return {
        "connections": connections,
        "requests": len(latency),
        "errors": len(stats["errors"]),
        "req_per_s": len(latency) / elapsed,
        "p50_ms": _pct(latency, 50),
        "p99_ms": _pct(latency, 99),
        "connect_p50_ms": float("nan"),
        "connect_p99_ms": float("nan"),
    }


async def new_connection_each(
    host: str, port: int, request: bytes, connections: int, seconds: float, context: ssl.SSLContext | None
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    stop_at = started + seconds
    latency: list[float] = []
    connect: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            done: asyncio.Future[int] = loop.create_future()
            begun = time.perf_counter()
            try:
                transport, _ = await loop.create_connection(
                    functools.partial(_Once, request, done),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                )
            except (OSError, ssl.SSLError):
                errors += 1
                continue
            ready = time.perf_counter()
            status = await asyncio.wait_for(done, 30)
            transport.close()
            if status == 200:
                latency.append(time.perf_counter() - begun)
                connect.append(ready - begun)
            else:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latency.sort()
    connect.sort()
    return {
        "connections": connections,
        "requests": len(latency),
        "errors": errors,
        "req_per_s": len(latency) / elapsed,
        "p50_ms": _pct(latency, 50),
        "p99_ms": _pct(latency, 99),
        "connect_p50_ms": _pct(connect, 50),
        "connect_p99_ms": _pct(connect, 99),
    }


def main() -> None:
    ap = arguments("tls_loadgen")
    ap.add_argument("--cafile", default=None, help="speak TLS, verifying the server against this PEM file")
    ap.add_argument("--new-connection", action="store_true", help="one connection (and handshake) a request")
    args = ap.parse_args()
    prepare(args, "tls_loadgen")
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    headers = [*args.header, "Connection: close"] if args.new_connection else args.header
    request = build_request(args.path, args.body.encode(), headers)
    mode = new_connection_each if args.new_connection else keep_alive
    result = asyncio.run(mode(args.host, args.port, request, args.connections, args.seconds, context))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
