"""A fake of the cloud providers (OpenAI chat completions, Anthropic Messages) for tests and benchmarks.

Owns: an HTTP/1.1 server on httptools serving ``POST /v1/chat/completions`` and ``POST /v1/messages`` in
the providers' shapes (JSON and SSE), failure behaviours chosen by the model name, a record of what it
received, and a ``fast`` mode for benchmarks (nothing recorded, answers cached by request bytes). The
answers themselves (bodies, SSE events, error responses) are built in ``fake_answers``.

It stands in for the cloud providers only: it must never be used as the gateway's local model, and never
listens anywhere but 127.0.0.1 unless told to.

Models: ``fail-<status>`` answers that status with a provider-shaped JSON error (``fail-401`` echoes a
fragment of the key it received, ``fail-429`` sends ``Retry-After: 7``), ``fail-400-text`` a non-JSON 400,
``fail-400-big`` a JSON 400 of about 1 MiB, ``fail-reset`` closes the socket without answering,
``fail-timeout`` never answers, ``fail-midstream`` streams two chunks and closes the socket,
``fail-nodone`` streams one event and ends the body cleanly without the last event (``[DONE]`` /
``message_stop``), ``slow-stream`` sends chunks 50 ms apart, ``big-stream`` sends 2000 content chunks,
``big-json`` answers about 1 MiB of content. Every other model answers "Hello from <model>" (usage: prompt
tokens = words in the messages, 4 completion tokens).

Run standalone: ``python -m tests.support.fake_upstream --port 9100 [--fast]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import ssl
import struct
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import httptools

from tests.support.fake_answers import (
    _CREATED,
    _LAST_CHUNK,
    BIG_JSON_CONTENT,
    BIG_STREAM_CHUNKS,
    _chunk,
    _dumps,
    _error_body,
    _failure,
    _head,
    _json_response,
    _pieces,
    _words,
    anthropic_answer,
    openai_answer,
)

# The answer shapes are re-exported: tests import them from here, with the server.
__all__ = [
    "BIG_JSON_CONTENT",
    "BIG_STREAM_CHUNKS",
    "SLOW_CHUNK_DELAY_S",
    "FakeUpstream",
    "ReceivedRequest",
    "anthropic_answer",
    "main",
    "openai_answer",
]

SLOW_CHUNK_DELAY_S = 0.05
_CACHE_LIMIT = 4096


class ReceivedRequest(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Connection(asyncio.Protocol):
    """One client connection to the fake; requests on it are answered in order."""

    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.pending: deque[tuple[bytes, bytes, dict[str, str], bytes, bool]] = deque()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.server.accepts += 1
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.closed_connections += 1
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (
            self.parser.get_method(),
            self.url,
            self.headers,
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.task is not None:
            self.pending.append(request)
        else:
            self.server.dispatch(self, *request)

    def write(self, data: bytes, *, keep_alive: bool = True) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if not keep_alive:
                self.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def run(self, work: Any) -> None:
        self.task = asyncio.get_running_loop().create_task(work)
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.server.tasks.discard(task)
        self.task = None
        if self.pending and self.transport is not None and not self.transport.is_closing():
            self.server.dispatch(self, *self.pending.popleft())


class _FastConnection(_Connection):
    on_header = None  # type: ignore[assignment]  # headers are not recorded in fast mode


class FakeUpstream:
    """The fake provider server. Use ``async with`` / ``start()`` on the caller's loop, or
    ``start_in_thread()`` to run it on its own loop in a background thread (for sync SDK tests)."""

    def __init__(
        self, *, fast: bool = False, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.fast = fast
        self.tls = tls
        self.host = host
        self.port = port
        self.requests: list[ReceivedRequest] = []
        self.accepts = 0
        self.closed_connections = 0
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._cache: dict[tuple[bytes, bytes, bool], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        factory = _FastConnection if self.fast else _Connection
        self._server = await loop.create_server(lambda: factory(self), self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        for _ in range(3):  # let connection_lost callbacks run so no transport outlives the loop
            if not self.connections:
                break
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def close_connections(self) -> None:
        """Close every client connection from the server side (as a provider does with idle keep-alives)."""
        for conn in list(self.connections):
            conn.close()

    # --- background thread ---

    def start_in_thread(self) -> str:
        """Serve from a background thread with its own event loop; returns the base URL."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)

    def stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[str]:
        base_url = self.start_in_thread()
        try:
            yield base_url
        finally:
            self.stop_thread()

    # --- answering ---

    def dispatch(
        self,
        conn: _Connection,
        method: bytes,
        url: bytes,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        path = url.split(b"?", 1)[0]
        if self.fast:
            cached = self._cache.get((path, body, keep_alive))
            if cached is not None:
                conn.write(cached, keep_alive=keep_alive)
                return
        else:
            self.requests.append(ReceivedRequest(method.decode(), path.decode(), headers, body))
        close = not keep_alive
        if method == b"POST" and (path.endswith(b"/v1/embeddings") or path.endswith(b"/v1/completions")):
            self._legacy(conn, path, body, keep_alive)
            return
        if method != b"POST" or not (path.endswith(b"/chat/completions") or path.endswith(b"/messages")):
            conn.write(
                _json_response(404, _error_body("openai", 404, "not found"), close=close),
                keep_alive=keep_alive,
            )
            return
        kind = "openai" if path.endswith(b"/chat/completions") else "anthropic"
        try:
            req = json.loads(body)
            model = str(req.get("model", ""))
        except (ValueError, AttributeError):
            conn.write(
                _json_response(400, _error_body(kind, 400, "body is not JSON"), close=close),
                keep_alive=keep_alive,
            )
            return
        if model.startswith("fail-"):
            self._fail(conn, kind, model, headers, keep_alive)
            return
        answer, events = openai_answer(req) if kind == "openai" else anthropic_answer(req)
        if req.get("stream") is not True:
            response = _json_response(200, answer, close=close)
        elif model == "slow-stream":
            conn.run(self._slow(conn, events, keep_alive))
            return
        else:
            head = _head(200, b"text/event-stream", length=None, close=close)
            response = head + b"".join(_chunk(event) for event in events) + _LAST_CHUNK
        if self.fast and len(self._cache) < _CACHE_LIMIT:
            self._cache[(path, body, keep_alive)] = response
        conn.write(response, keep_alive=keep_alive)

    def _legacy(self, conn: _Connection, path: bytes, body: bytes, keep_alive: bool) -> None:
        """``/v1/embeddings`` and ``/v1/completions``: enough of OpenAI's shapes for the SDK to parse."""
        req = json.loads(body)
        model = str(req.get("model", ""))
        close = not keep_alive
        if path.endswith(b"/embeddings"):
            inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
            vector = [0.25, -0.5, 0.125]
            if req.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack("<3f", *vector)).decode()
            else:
                encoded = vector
            words = sum(_words(text) for text in inputs)
            data = [{"object": "embedding", "index": i, "embedding": encoded} for i in range(len(inputs))]
            answer = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
            conn.write(_json_response(200, _dumps(answer), close=close), keep_alive=keep_alive)
            return
        pieces = _pieces(model)
        usage = {"prompt_tokens": _words(req.get("prompt")), "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base = {"id": "cmpl-fake01", "object": "text_completion", "created": _CREATED, "model": model}
        if req.get("stream") is not True:
            choice = {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}
            conn.write(
                _json_response(200, _dumps(dict(base, choices=[choice], usage=usage)), close=close),
                keep_alive=keep_alive,
            )
            return
        events = [
            b"data: "
            + _dumps(dict(base, choices=[{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]))
            + b"\n\n"
            for p in pieces
        ]
        events.append(b"data: " + _dumps(dict(base, choices=[], usage=usage)) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        head = _head(200, b"text/event-stream", length=None, close=close)
        conn.write(head + b"".join(_chunk(event) for event in events) + _LAST_CHUNK, keep_alive=keep_alive)

    def _fail(
        self, conn: _Connection, kind: str, model: str, headers: dict[str, str], keep_alive: bool
    ) -> None:
        if model == "fail-reset":
            conn.close()
        elif model == "fail-timeout":
            conn.run(asyncio.sleep(3600))
        elif model in ("fail-midstream", "fail-nodone"):
            head = _head(200, b"text/event-stream", length=None, close=not keep_alive)
            _, events = (
                openai_answer({"model": model}) if kind == "openai" else anthropic_answer({"model": model})
            )
            if model == "fail-nodone":
                conn.write(head + _chunk(events[0]) + _LAST_CHUNK, keep_alive=keep_alive)
            else:
                conn.write(head + _chunk(events[0]) + _chunk(events[1]))
                conn.close()
        else:
            response = _failure(kind, model, headers, close=not keep_alive)
            if response is None:
                conn.write(
                    _json_response(404, _error_body(kind, 404, "unknown fake failure"), close=True),
                    keep_alive=False,
                )
            else:
                conn.write(response, keep_alive=keep_alive)

    async def _slow(self, conn: _Connection, events: list[bytes], keep_alive: bool) -> None:
        conn.write(_head(200, b"text/event-stream", length=None, close=not keep_alive))
        for event in events:
            conn.write(_chunk(event))
            await asyncio.sleep(SLOW_CHUNK_DELAY_S)
        conn.write(_LAST_CHUNK, keep_alive=keep_alive)


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone until SIGINT/SIGTERM (the benchmark starts it in its own process)."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="record nothing, cache answers (benchmarks)")
    args = parser.parse_args(argv)

    async def serve() -> None:
        fake = FakeUpstream(fast=args.fast, host=args.host, port=args.port)
        await fake.start()
        print(f"fake upstream listening on {fake.base_url}", flush=True)
        stop = asyncio.Event()
        if sys.platform != "win32":
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await fake.stop()

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve())


if __name__ == "__main__":
    main()
