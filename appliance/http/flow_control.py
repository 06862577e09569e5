"""Read and write flow control for one connection.

Owns the two pause flags and the event that write waiters block on. It must never decide *when*
to pause: the protocol and the request cycle call it. It never closes the transport.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    """Pause/resume reading on the transport; let writers wait while the write buffer drains."""

    __slots__ = ("_transport", "_writable", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark (or the peer left)."""
        await self._writable.wait()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            if not self._transport.is_closing():
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def pause_writing(self) -> None:
        """Called (through the protocol) when the transport's buffer passes its high-water mark."""
        if not self.write_paused:
            self.write_paused = True
            self._writable.clear()

    def resume_writing(self) -> None:
        """Called when the buffer drains, and on connection loss so no writer waits forever."""
        if self.write_paused:
            self.write_paused = False
            self._writable.set()
