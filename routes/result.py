"""What a route hands back to the pipeline: the answer in the caller's wire format, and its usage.

Owns: ``Usage`` and ``RouteResult``. It must never hold anything but the caller-facing answer: no provider
key, no upstream request, no upstream response headers outside the adapters' allow-list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


class ByteStream(Protocol):
    """An answer's bytes as they arrive; ``aclose()`` stops the work behind them and may be called again."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def __anext__(self) -> Awaitable[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class Usage:
    """Tokens the upstream reported; ``reported`` stays False when it gave no usage at all."""

    tokens_in: int = 0
    tokens_out: int = 0
    reported: bool = False


class UsageView(Protocol):
    """What the pipeline reads of a result's usage (a ``Usage``, or a local generation's live counters)."""

    @property
    def tokens_in(self) -> int: ...

    @property
    def tokens_out(self) -> int: ...

    @property
    def reported(self) -> bool: ...


@dataclass(slots=True)
class RouteResult:
    """One answer from a route.

    Exactly one of ``body`` (complete, non-stream) and ``stream`` (SSE bytes, yielded as they arrive) is set.
    ``usage`` is final for a body; for a stream it is updated while the stream is iterated and final once it
    ends. Whoever receives a result with a stream must ``aclose()`` it, finished or not.
    """

    status: int
    content_type: bytes
    body: bytes | None
    stream: ByteStream | None
    usage: UsageView
    upstream_model: str
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def aclose(self) -> None:
        """Stop the upstream work (the caller went away or the stream ended) and release the connection."""
        if self.stream is not None:
            await self.stream.aclose()


@dataclass(frozen=True)
class Hints:
    """What the caller's role and organization ask of a route: ``priority`` orders a local model's queue
    (lower first); ``scope`` (the organization) bounds which cached prompts a local model may reuse.
    Upstream routes ignore both."""

    priority: int = 0
    scope: str = ""


NO_HINTS = Hints()
