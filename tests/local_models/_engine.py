"""Helpers for the engine tests: a loaded engine, requests, and waiting on generations."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from local_models.engine import Generation, GenerationRequest, LocalEngine
from local_models.tiny import BYTE_OFFSET, CONTROL_TOKENS, END_OF_TURN

T = TypeVar("T")
MODEL = "local/tiny"
N_CTX = 2048
# Forbids the end-of-generation tokens (</s>, <|end|>) so that a run lasts as long as the test needs.
NO_EOG = {2: -100.0, BYTE_OFFSET + 256 + CONTROL_TOKENS.index(END_OF_TURN): -100.0}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def byte_token(value: int) -> int:
    return BYTE_OFFSET + value


@contextlib.asynccontextmanager
async def loaded(
    path: Path,
    *,
    name: str = MODEL,
    n_ctx: int = N_CTX,
    identity: tuple[int, ...] | None = None,
    **options: Any,
) -> AsyncIterator[LocalEngine]:
    options.setdefault("slots", 1)  # one request at a time unless a test asks for more
    engine = LocalEngine(n_threads=1, **options)
    try:
        await engine.load(name, path, n_ctx, identity=identity)
        yield engine
    finally:
        await engine.close()


def completion(prompt: str = "The patient", **fields: Any) -> GenerationRequest:
    fields.setdefault("seed", 7)
    return GenerationRequest(kind="completion", prompt=prompt, **fields)


async def until(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def drain(gen: Generation) -> list[str]:
    return [piece async for piece in gen]


async def stalled(engine: LocalEngine, model: str = MODEL) -> Generation:
    """A request nobody reads: its worker is busy (held by backpressure) until it is cancelled."""
    gen = await engine.generate(model, completion(max_tokens=None, logit_bias=NO_EOG))
    await until(lambda: gen.started_at is not None and gen.completion_tokens > 0)
    return gen
