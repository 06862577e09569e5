"""The listening server: binds, accepts connections, and shuts down gracefully.

Owns the listening sockets (TLS on them when ``start`` is given a server context: the handshake bounded by
``header_timeout_s``), the shared ``ServerState``, signal handling, the choice of event loop
(uvloop where importable) and the shutdown order: stop listening, let connections finish their
current response, wait for in-flight handlers up to ``drain_timeout_s``, then cancel and close.
It must never parse HTTP or answer a request itself; connections do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

from appliance.http.admission import Rejection
from appliance.http.cycle import Handler, Request
from appliance.http.limits import HttpLimits
from appliance.http.protocol import HttpProtocol, ServerState

__all__ = ["HttpServer", "Rejection", "install_event_loop_policy"]

logger = logging.getLogger("phi.http")

_TLS_SHUTDOWN_TIMEOUT_S = 5.0
"""How long a closing TLS connection waits for the client's close_notify before it is dropped."""


class HttpServer:
    """An HTTP/1.1 server running one handler under the given limits."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits | None = None,
        *,
        on_reject: Callable[[Rejection], None] | None = None,
        exempt: Callable[[Request], bool] | None = None,
    ) -> None:
        """``on_reject`` hears of every request the server refuses itself; ``exempt`` picks requests
        that bypass the concurrency caps, global and per address (a readiness probe: a node that is
        busy is still ready). ``exempt`` runs on the event loop for every request: quick, no raising."""
        self.limits = limits if limits is not None else HttpLimits()
        self._state = ServerState(handler, self.limits, on_reject, exempt)
        self._server: asyncio.Server | None = None

    @property
    def in_flight(self) -> int:
        """Requests whose handler is running now."""
        return self._state.in_flight

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(
        self,
        host: str = "0.0.0.0",  # noqa: S104
        port: int = 8080,
        *,
        sock: socket.socket | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        """Start listening on ``host:port``, or on an already bound ``sock``; with ``ssl``, every connection
        speaks TLS first. A handshake must complete within ``header_timeout_s`` (a client that connects
        and says nothing is dropped as a slow head would be); one that fails is closed quietly (scanners
        and clients speaking plain HTTP to the port are no news worth an error line)."""
        loop, factory = self._listener()
        options: dict[str, Any] = {"backlog": 2048}
        if ssl is not None:
            options.update(
                ssl=ssl,
                ssl_handshake_timeout=self.limits.header_timeout_s,
                ssl_shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT_S,
            )
        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, **options)
        else:
            self._server = await loop.create_server(factory, host, port, reuse_address=True, **options)

    def _listener(self) -> tuple[asyncio.AbstractEventLoop, Callable[[], HttpProtocol]]:
        if self._server is not None:
            raise RuntimeError("server already started")
        state = self._state
        return asyncio.get_running_loop(), lambda: HttpProtocol(state)

    async def start_unix(self, path: str) -> None:
        """Start listening on a unix socket at ``path`` (replacing a stale one), mode 0600."""
        loop, factory = self._listener()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)  # created 0600: only the appliance's own user may connect
        try:
            self._server = await loop.create_unix_server(factory, path=path, backlog=64)
        finally:
            os.umask(old_umask)

    async def shutdown(self) -> None:
        """Stop listening, finish current responses, wait for handlers, then cancel the stragglers."""
        server = self._server
        state = self._state
        if server is None or state.draining:
            return
        state.draining = True
        server.close()
        for conn in list(state.connections):
            conn.shutdown()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.drain_timeout_s
        while state.tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(list(state.tasks), timeout=remaining)
        if state.tasks:
            stuck = list(state.tasks)
            logger.warning("drain timeout: cancelling %d in-flight request(s)", len(stuck))
            for task in stuck:
                task.cancel()
            await asyncio.wait(stuck, timeout=5.0)

        # Connections whose handler was cancelled will never finish their response: drop them. The
        # rest are closing on their own after their last response; give them a moment to flush.
        closing = []
        for conn in list(state.connections):
            if conn.active is not None:
                conn.abort()
            else:
                closing.append(conn.closed())
        if closing:
            await asyncio.wait(closing, timeout=max(deadline - loop.time(), 1.0))
        for conn in list(state.connections):
            conn.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await server.wait_closed()

    async def serve_until_signalled(self) -> None:
        """Wait for SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed: list[signal.Signals] = []
        previous: dict[signal.Signals, object] = {}
        # Windows: SIGBREAK is the CTRL_BREAK_EVENT the service host sends (image/windows/phi_service.py).
        sigbreak = getattr(signal, "SIGBREAK", None)
        for sig in (signal.SIGTERM, signal.SIGINT, *([sigbreak] if sigbreak else [])):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                # Windows event loops have no add_signal_handler: fall back to signal.signal.
                with contextlib.suppress(ValueError, OSError):
                    previous[sig] = signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        try:
            await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
        logger.info("signal received: draining")
        await self.shutdown()


def install_event_loop_policy() -> str:
    """Make new event loops uvloop loops where uvloop is importable; returns ``"uvloop"`` or ``"asyncio"``."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
