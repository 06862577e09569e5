"""A small closed-loop HTTP/1.1 load generator for the benchmarks (loopback only, bounded in time).

Each of N connections sends one prepared request, waits for the whole response, records the latency, and
sends the next, until the duration is over. Responses are parsed with httptools, so chunked (streaming)
and Content-Length bodies both work; time to first body byte is recorded too.

    python bench/loadgen.py --port 8080 --connections 16 --seconds 5 \
        --header 'Authorization: Bearer …'

Prints one JSON object: requests, errors, req_per_s, p50_ms, p99_ms, ttfb_p50_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httptools


class _Conn(asyncio.Protocol):
    def __init__(
        self, request: bytes, stop_at: float, stats: dict[str, list[float]], done: asyncio.Future[None]
    ) -> None:
        self.request = request
        self.stop_at = stop_at
        self.stats = stats
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.first_byte = 0.0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.first_byte = 0.0
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.stats["errors"].append(1.0)
            self._finish()

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.perf_counter()

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        if self.status == 200:
            self.stats["latency"].append(now - self.sent_at)
            if self.first_byte:
                self.stats["ttfb"].append(self.first_byte - self.sent_at)
        else:
            self.stats["errors"].append(1.0)
        if now >= self.stop_at:
            self._finish()
        else:
            asyncio.get_running_loop().call_soon(self._send)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def run(host: str, port: int, request: bytes, connections: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    stats: dict[str, list[float]] = {"latency": [], "ttfb": [], "errors": []}
    started = time.perf_counter()
    stop_at = started + seconds
    waiters = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda d=done: _Conn(request, stop_at, stats, d), host, port)
        waiters.append(done)
    await asyncio.wait_for(asyncio.gather(*waiters), seconds + 30)
    elapsed = time.perf_counter() - started
    lat = sorted(stats["latency"])
    ttfb = sorted(stats["ttfb"])
    return {
        "connections": connections,
        "requests": len(lat),
        "errors": len(stats["errors"]),
        "req_per_s": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "ttfb_p50_ms": _pct(ttfb, 50),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
    }


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return values[index] * 1000


def build_request(path: str, body: bytes, headers: list[str]) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: bench",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    head += headers
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def arguments(prog: str) -> argparse.ArgumentParser:
    """The options every load generator here takes (``tls_loadgen`` adds its own)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--body", default='{"model":"openai/gpt-4o","messages":[{"role":"user","content":"hi"}]}')
    ap.add_argument("--header", action="append", default=[])
    return ap


def prepare(args: argparse.Namespace, prog: str) -> None:
    """Refuse a target off loopback; run on uvloop where it is installed."""
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"{prog}: loopback targets only")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def main() -> None:
    args = arguments("loadgen").parse_args()
    prepare(args, "loadgen")
    request = build_request(args.path, args.body.encode(), args.header)
    print(json.dumps(asyncio.run(run(args.host, args.port, request, args.connections, args.seconds))))


if __name__ == "__main__":
    main()
