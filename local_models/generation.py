"""One generation request and its handle: the bridge between a model's worker thread and the event loop.

Owns: ``GenerationRequest`` (what to generate), ``Generation`` (the caller's handle: async text pieces,
exact usage, finish reason, cancel) and the bounded hand-over between the two threads. The worker appends
pieces under a lock and wakes the loop with ``loop.call_soon_threadsafe`` only when the consumer is
waiting. The worker never waits on one consumer (it decodes many sequences in one batch): once
``BUFFER_PIECES`` pieces are unread, ``has_room`` is false and the worker leaves that sequence out of its
batches until the consumer catches up, which pokes the worker (``on_room``).

Must never: touch a llama.cpp object (only the worker thread does), block the event loop (the lock is
held for a few list operations only), block the worker, or let a slow consumer make the worker run ahead
without bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

BUFFER_PIECES = 64
"""Unread pieces a worker may run ahead of its consumer before it waits."""

FinishReason = Literal["stop", "length", "cancelled", "timeout"]


@dataclass
class GenerationRequest:
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    """chat: ``{"role", "content"}`` messages; a role from ``prompt.CHAT_ROLES``, content a string (or a
    list of text parts). The worker checks them again (``prompt.chat_turns``); other keys are dropped."""
    prompt: str | None = None
    """completion: the prompt text."""
    max_tokens: int | None = None
    """None: until the context window is full."""
    temperature: float = 0.8
    """0 (or less) samples greedily."""
    top_p: float = 0.95
    seed: int | None = None
    """None: a random seed per request."""
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    """GBNF text (``response_format`` and tool calls are converted to it elsewhere)."""
    grammar_triggers: list[str] = field(default_factory=list)
    """Non-empty: the grammar is lazy. Generation is free until one of these words appears, and the
    grammar constrains the text from the start of that word on (its root begins with the word)."""
    tools: list[dict[str, Any]] | None = None
    """chat: validated OpenAI tool definitions, given to the chat template as ``tools``."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated (-2 to 2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated (-2 to 2)."""
    logit_bias: dict[int, float] | None = None
    """OpenAI ``logit_bias``: token id -> bias added to its logit (-100 bans, +100 all but forces)."""
    cache_scope: str = ""
    """Whose cached prompts this request may reuse (the caller's organization): cached prefixes are never
    shared across scopes, so one organization cannot time another's prompts."""
    priority: int = 0
    """Lower runs sooner (from the role's policy); FIFO within one priority."""
    deadline: float | None = None
    """``time.monotonic()`` by which generation must end. Reached while running: the stream ends with
    ``"timeout"`` (the text so far is a partial answer). Reached while still queued: the iteration raises
    ``UpstreamTimeout`` (code ``local_timeout``), as no answer was started."""


class Generation:
    """The handle of one request: iterate it for text pieces, or await ``text()``.

    ``prompt_tokens`` is known once the worker has tokenized the prompt; ``completion_tokens`` and
    ``finish_reason`` are final once iteration has ended. Errors found on the worker (a bad grammar, a
    prompt longer than the context) are raised by the iteration, before any piece. If the task consuming
    the stream is cancelled while it waits, the generation is cancelled too: nobody else can read it.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.started_at: float | None = None
        """``time.monotonic()`` when a worker took it from the queue (None while queued)."""
        self.cancelled = False
        """Read by the worker between tokens and from the abort callback during prompt processing."""
        self._loop = loop
        self._lock = threading.Lock()
        self._on_room: Callable[[], object] | None = None
        self._pieces: deque[str] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wake_pending = False
        self._on_cancel: Callable[[Generation], object] | None = None
        self._on_done: list[Callable[[], object]] = []
        self._abort_error: BaseException | None = None

    # ---- consumer side (event loop) ----

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        while True:
            with self._lock:
                if self._pieces:
                    piece = self._pieces.popleft()
                    roomed = len(self._pieces) == BUFFER_PIECES - 1
                elif self._ended:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                else:
                    waiter = self._waiter = self._loop.create_future()
                    piece = None
            if piece is not None:
                if roomed and self._on_room is not None:
                    self._on_room()
                return piece
            try:
                await waiter
            except asyncio.CancelledError:
                self.cancel()
                raise

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def cancel(self) -> None:
        """The client is gone: a queued request is dropped; a running one stops at the worker's next
        decode step, which frees its slot and its cache cells. Idempotent."""
        if self.cancelled or self._ended:
            return
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    def abort(self, error: BaseException) -> None:
        """Stop like ``cancel``, but the consumer gets ``error`` (e.g. the model is being unloaded)."""
        self._abort_error = error
        self.cancel()

    def on_cancel(self, callback: Callable[[Generation], object]) -> None:
        """Called (on the loop) by the first ``cancel``: the queue drops the request if it has not started,
        and a running one's worker is woken to free its slot."""
        self._on_cancel = callback

    def on_room(self, callback: Callable[[], object]) -> None:
        """Called (on the loop) when a full buffer gets room again: the worker resumes the sequence."""
        self._on_room = callback

    def when_done(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on the loop once the stream has ended (finished, cancelled or failed); at once
        (on the loop's next turn) if it already has. The engine cancels the deadline timer with it."""
        with self._lock:
            if not self._ended:
                self._on_done.append(callback)
                return
        self._loop.call_soon(callback)

    @property
    def done(self) -> bool:
        return self._ended

    # ---- producer side (worker thread; ``finish`` also from the loop for a request that never ran) ----

    def expired(self) -> bool:
        deadline = self.request.deadline
        return deadline is not None and time.monotonic() >= deadline

    def should_stop(self) -> bool:
        return self.cancelled or self.expired()

    def put(self, piece: str) -> None:
        """Hand one piece to the consumer; never waits (see ``has_room``)."""
        with self._lock:
            self._pieces.append(piece)
            self._wake_locked()

    def has_room(self) -> bool:
        """False while ``BUFFER_PIECES`` pieces are unread: the worker generates no more for now."""
        return len(self._pieces) < BUFFER_PIECES

    def finish(self, reason: FinishReason | None, error: BaseException | None = None) -> None:
        """The end of the stream; usage and reason are final. Only the first call counts."""
        with self._lock:
            if self._ended:
                return
            if reason == "cancelled" and self._abort_error is not None:
                reason, error = None, self._abort_error
            self.finish_reason = reason
            self._error = error
            self._ended = True
            on_done, self._on_done = self._on_done, []
            self._wake_locked()
        for callback in on_done:
            try:
                self._loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop is closed: its timers are gone with it
                break

    def _wake_locked(self) -> None:
        if self._waiter is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is left to read, so stop generating
                self.cancelled = True

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
