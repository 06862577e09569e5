"""A fake of the cloud providers (OpenAI chat completions, Anthropic Messages) for tests and benchmarks.

Owns: an HTTP/1.1 server on httptools serving ``POST /v1/chat/completions`` and ``POST /v1/messages`` in
the providers' shapes (JSON and SSE), failure behaviours chosen by the model name, a record of what it
received, and a ``fast`` mode for benchmarks (nothing recorded, answers cached by request bytes).

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
from http import HTTPStatus
from typing import Any, NamedTuple, cast

import httptools

SLOW_CHUNK_DELAY_S = 0.05
BIG_STREAM_CHUNKS = 2000
BIG_JSON_CONTENT = "tok " * (256 * 1024)  # 1 MiB, in one piece
_CACHE_LIMIT = 4096
_CREATED = 1_764_000_000


class ReceivedRequest(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Status"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _head(
    status: int,
    content_type: bytes,
    *,
    length: int | None,
    close: bool,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _reason(status)),
        b"content-type: " + content_type,
        b"x-request-id: req_fake",
    ]
    lines.append(b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length)
    if close:
        lines.append(b"connection: close")
    lines.extend(name + b": " + value for name, value in extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _json_response(
    status: int, payload: bytes, *, close: bool, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    return _head(status, b"application/json", length=len(payload), close=close, extra=extra) + payload


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n\r\n"


def _words(content: object) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                for key in ("text", "content"):
                    total += _words(part.get(key))
        return total
    return 0


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _pieces(model: str) -> list[str]:
    if model == "big-stream":
        return ["tok "] * BIG_STREAM_CHUNKS
    if model == "big-json":
        return [BIG_JSON_CONTENT]
    return ["Hello", " from", " ", model]


# --- OpenAI chat completions --------------------------------------------------------------------------------


def openai_answer(req: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    """(JSON body, SSE events) for a chat completions request."""
    model = str(req.get("model", ""))
    messages = req.get("messages") or []
    prompt = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
    pieces = _pieces(model)
    usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}
    body = _dumps(
        {
            "id": "chatcmpl-fake01",
            "object": "chat.completion",
            "created": _CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )
    options = req.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    base: dict[str, Any] = {
        "id": "chatcmpl-fake01",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
    }
    if include_usage:
        base["usage"] = None  # as OpenAI does: every chunk carries "usage": null

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return b"data: " + _dumps(obj) + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events.extend(chunk({"content": piece}) for piece in pieces)
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(b"data: " + _dumps(dict(base, choices=[], usage=usage)) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return body, events


# --- Anthropic Messages ------------------------------------------------------------------------------------


def _event(kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, **fields}) + b"\n\n"


def anthropic_answer(req: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    """(JSON body, SSE events) for a Messages request; a tool_use when asked to "use tool" with tools."""
    model = str(req.get("model", ""))
    messages = req.get("messages") or []
    prompt = _words(req.get("system")) + sum(
        _words(m.get("content")) for m in messages if isinstance(m, dict)
    )
    pieces = _pieces(model)
    tools = req.get("tools") or []
    use_tool = bool(tools) and "use tool" in _last_user_text(messages)
    tool = {"type": "tool_use", "id": "toolu_fake01", "name": tools[0].get("name") if tools else None}
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(pieces)}]
    if use_tool:
        content.append({**tool, "input": {"query": "fake"}})
    stop = "tool_use" if use_tool else "end_turn"
    message = {"id": "msg_fake01", "type": "message", "role": "assistant", "model": model}
    body = _dumps({**message, "content": content, "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": prompt, "output_tokens": len(pieces)}})  # fmt: skip
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": prompt, "output_tokens": 1}}  # fmt: skip
    events = [
        _event("message_start", message=start),
        _event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        _event("ping"),
    ]
    for piece in pieces:
        events.append(_event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece}))
    events.append(_event("content_block_stop", index=0))
    if use_tool:
        events.append(_event("content_block_start", index=1, content_block={**tool, "input": {}}))
        for part in ('{"query": ', '"fake"}'):
            delta = {"type": "input_json_delta", "partial_json": part}
            events.append(_event("content_block_delta", index=1, delta=delta))
        events.append(_event("content_block_stop", index=1))
    delta = {"stop_reason": stop, "stop_sequence": None}
    events.append(_event("message_delta", delta=delta, usage={"output_tokens": len(pieces)}))
    events.append(_event("message_stop"))
    return body, events


def _error_body(kind: str, status: int, message: str) -> bytes:
    if kind == "anthropic":
        return _dumps({"type": "error", "error": {"type": "api_error", "message": message}})
    return _dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def _failure(kind: str, model: str, headers: dict[str, str], close: bool) -> bytes | None:
    """The response for a ``fail-<status>`` model, or None when the model is not one."""
    code = model[5:]
    if code == "400-text":
        return _head(400, b"text/plain", length=11, close=close) + b"bad request"
    if code == "400-big":
        return _json_response(400, _error_body(kind, 400, BIG_JSON_CONTENT), close=close)
    if not code.isdigit():
        return None
    status = int(code)
    extra: tuple[tuple[bytes, bytes], ...] = ()
    message = f"fake failure {status}"
    if status == 401:
        key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        message = f"Incorrect API key provided: {key[:6]}...{key[-4:]}"
    elif status == 429:
        extra = ((b"retry-after", b"7"),)
    return _json_response(status, _error_body(kind, status, message), close=close, extra=extra)


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
