"""A hostile fake upstream for the fault drill: an OpenAI-shaped HTTP/1.1 server that misbehaves on purpose.

Owns: one misbehaviour per model name (``HostileUpstream``'s docstring lists them), served from a thread of
its own on 127.0.0.1, and the lazily generated 2 GiB bodies (64 KiB at a time, after each drain, so it
never holds more than a socket buffer's worth).
Never: listens anywhere but 127.0.0.1; stands in for a well-behaved provider (that is
``tests/support/fake_upstream``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from typing import Any

HUGE_BYTES = 2 * 1024**3


class HostileUpstream:
    """An HTTP/1.1 server that reads one request per connection and misbehaves as the model name says:
    ``ok`` (a proper JSON or SSE answer), ``slow`` (SSE, 12 events 50 ms apart), ``reset`` (half an answer,
    then RST), ``stall`` (never a byte), ``midstream`` (two SSE events, then the socket closes),
    ``not-http`` (an SSH banner), ``bad-json`` (200 with a body that is not JSON), ``bad-sse`` (200 SSE
    whose events are not JSON), ``huge-json`` (a 2 GiB Content-Length body), ``huge-sse`` (one SSE event
    2 GiB long). Huge bodies are generated as they are sent, 64 KiB at a time, after each drain."""

    def __init__(self) -> None:
        self.port = 0
        self.huge_sent = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile-upstream", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                model = str(body.get("model", "ok"))
                if not await self._answer(model, body.get("stream") is True, writer):
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except (
            asyncio.CancelledError
        ):  # the drill is over: end quietly (stream handlers log a cancelled task)
            pass
        finally:
            writer.close()

    async def _answer(self, model: str, stream: bool, w: asyncio.StreamWriter) -> bool:
        """Write the answer ``model`` asks for; False when the connection must end."""
        if model == "stall":
            await asyncio.sleep(3600)
        elif model == "reset":
            w.write(_head("application/json", 400) + b'{"id":"chatcmpl-hostile","choices":[')
            await w.drain()
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            w.transport.abort()
        elif model == "not-http":
            w.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n\x00\x00\x01\x0c\x0a\x14garbage\xff\xfe\r\n\r\n")
            await w.drain()
        elif model == "bad-json":
            w.write(_json(b'{"id": "chatcmpl-hostile", "choices": [{"message": {"content": "unterminated'))
            await w.drain()
            return True
        elif model == "bad-sse":
            w.write(_head("text/event-stream", None))
            for event in (
                b"data: {not json at all\n\n",
                b"data: \xff\xfe\x00binary\n\n",
                b"data: [DONE]\n\n",
            ):
                w.write(_chunk(event))
            w.write(b"0\r\n\r\n")
            await w.drain()
            return True
        elif model == "midstream":
            w.write(_head("text/event-stream", None) + _chunk(_event("Hello")) + _chunk(_event(" from")))
            await w.drain()
        elif model == "huge-json":
            w.write(_head("application/json", HUGE_BYTES) + b'{"id":"chatcmpl-hostile","pad":"')
            await self._pour(w, HUGE_BYTES, chunked=False)
        elif model == "huge-sse":
            w.write(_head("text/event-stream", None) + _chunk(b'data: {"pad":"'))
            await self._pour(w, HUGE_BYTES, chunked=True)
        elif model == "slow":
            w.write(_head("text/event-stream", None))
            for i in range(12):
                w.write(_chunk(_event(f"word{i} ")))
                await w.drain()
                await asyncio.sleep(0.05)
            w.write(_chunk(_event(None)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await w.drain()
            return True
        elif stream:
            w.write(_head("text/event-stream", None) + _chunk(_event("Hello")) + _chunk(_event(None)))
            w.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await w.drain()
            return True
        else:
            w.write(_json(json.dumps(_completion()).encode()))
            await w.drain()
            return True
        return False

    async def _pour(self, w: asyncio.StreamWriter, total: int, *, chunked: bool) -> None:
        block = b"x" * 65536
        piece = _chunk(block) if chunked else block
        self.huge_sent = 0
        while self.huge_sent < total:
            w.write(piece)
            self.huge_sent += len(block)
            await w.drain()  # the gateway reads as it needs: never more than a socket buffer ahead


def _head(content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def _json(body: bytes) -> bytes:
    return _head("application/json", len(body)) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "ok",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def _event(content: str | None) -> bytes:
    delta = {"content": content} if content is not None else {}
    doc = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 1764000000,
        "model": "ok",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None if content is not None else "stop"}],
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"
