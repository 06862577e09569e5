"""What a route hands back to the pipeline: the answer in the caller's wire format, and its usage.

Owns: ``Usage`` and ``RouteResult``. It must never hold anything but the caller-facing answer: no provider
key, no upstream request, no upstream response headers outside the adapters' allow-list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


@dataclass(slots=True)
class Usage:
    """Tokens the upstream reported; ``reported`` stays False when it gave no usage at all."""

    tokens_in: int = 0
    tokens_out: int = 0
    reported: bool = False


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
    stream: AsyncIterator[bytes] | None
    usage: Usage
    upstream_model: str
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    closer: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    async def aclose(self) -> None:
        """Stop the upstream work (the caller went away or the stream ended) and release the connection."""
        closer, self.closer = self.closer, None
        if closer is not None:
            await closer()
