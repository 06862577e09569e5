"""The llama.cpp engine's scheduling: cancellation, the bounded priority queue, deadlines, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
import weakref
from pathlib import Path

import pytest

from appliance import errors
from local_models import batching
from local_models.engine import Generation
from local_models.generation import BUFFER_PIECES
from local_models.tiny import write_tiny_model
from tests.local_models._engine import MODEL, N_CTX, completion, drain, loaded, run, stalled, until

# --- cancellation ---------------------------------------------------------------------------------


def test_cancel_mid_stream_stops_within_a_few_tokens(tiny: Path, no_eog: dict[int, float]) -> None:
    async def main() -> tuple[Generation, int, float]:
        async with loaded(tiny) as engine:
            gen = await engine.generate(MODEL, completion(max_tokens=None, logit_bias=no_eog))
            for _ in range(5):
                await gen.__anext__()
            at_cancel = gen.completion_tokens
            started = time.monotonic()
            gen.cancel()
            await drain(gen)
            took = time.monotonic() - started
            assert engine.status()[MODEL]["active"] == 0
            return gen, at_cancel, took

    gen, at_cancel, took = run(main())
    assert gen.finish_reason == "cancelled"
    assert gen.completion_tokens - at_cancel <= 2
    assert took < 1.0


def test_cancel_during_a_long_prompt_returns_quickly(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prompts are decoded in chunks; a cancel takes effect at the next chunk, and frees the slot at once.
    monkeypatch.setattr(batching, "BATCH", 128)
    path = model_dir / "bench.gguf"
    write_tiny_model(path, size="bench", seed=0)
    words = "patient blood pressure heart rate history medication dose daily".split()

    def long_prompt(first: str) -> str:
        rng = random.Random(first)
        return first + " " + " ".join(rng.choice(words) for _ in range(1400))

    async def main() -> tuple[float, float, Generation, Generation]:
        async with loaded(path, name="local/bench") as engine:
            full = await engine.generate("local/bench", completion(long_prompt("Admitted"), max_tokens=1))
            await full.text()
            assert full.started_at is not None
            full_s = time.monotonic() - full.started_at
            assert 1000 < full.prompt_tokens < N_CTX

            gen = await engine.generate("local/bench", completion(long_prompt("Discharged"), max_tokens=1))
            after = await engine.generate("local/bench", completion("Next", max_tokens=3))
            await until(lambda: gen.started_at is not None)
            await asyncio.sleep(full_s / 4)
            cancelled_at = time.monotonic()
            gen.cancel()
            await drain(gen)
            cancel_s = time.monotonic() - cancelled_at
            await until(lambda: after.started_at is not None)
            await after.text()
            return full_s, cancel_s, gen, after

    full_s, cancel_s, gen, after = run(main())
    assert gen.finish_reason == "cancelled" and gen.completion_tokens == 0
    print(f"prompt of {gen.prompt_tokens} tokens: full {full_s:.3f} s, cancel took {cancel_s:.4f} s")
    assert cancel_s < full_s / 4, (cancel_s, full_s)  # the rest of the prompt (3/4 of it) was not processed
    assert after.finish_reason in ("length", "stop")


def test_a_cancelled_queued_request_never_starts(tiny: Path) -> None:
    async def main() -> tuple[Generation, Generation]:
        async with loaded(tiny) as engine:
            busy = await stalled(engine)
            queued = await engine.generate(MODEL, completion(max_tokens=5))
            assert engine.status()[MODEL]["queue_depth"] == 1
            queued.cancel()
            assert queued.done and engine.status()[MODEL]["queue_depth"] == 0
            assert await drain(queued) == []
            nxt = await engine.generate(MODEL, completion(max_tokens=5))
            busy.cancel()
            await nxt.text()
            return queued, nxt

    queued, nxt = run(main())
    assert queued.finish_reason == "cancelled"
    assert queued.started_at is None and queued.prompt_tokens == 0
    assert nxt.started_at is not None and nxt.finish_reason in ("length", "stop")


def test_a_reader_task_cancelled_while_waiting_cancels_the_generation(tiny: Path) -> None:
    async def main() -> Generation:
        async with loaded(tiny) as engine:
            busy = await stalled(engine)
            queued = await engine.generate(MODEL, completion(max_tokens=5))
            task = asyncio.create_task(queued.text())
            await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert queued.done
            busy.cancel()
            return queued

    queued = run(main())
    assert queued.finish_reason == "cancelled" and queued.started_at is None


# --- the queue --------------------------------------------------------------------------------------


def test_queue_full_is_rate_limited_with_retry_after(tiny: Path) -> None:
    async def main() -> errors.RateLimited:
        async with loaded(tiny, queue_size=2) as engine:
            busy = await stalled(engine)
            waiting = [await engine.generate(MODEL, completion(max_tokens=2)) for _ in range(2)]
            with pytest.raises(errors.RateLimited) as caught:
                await engine.generate(MODEL, completion(max_tokens=2))
            for gen in (busy, *waiting):
                gen.cancel()
            return caught.value

    refused = run(main())
    assert refused.code == "local_queue_full" and refused.status == 429
    assert refused.retry_after >= 1.0
    assert dict(refused.headers)[b"Retry-After"].isdigit()


def test_higher_priority_runs_first_fifo_within_a_priority(tiny: Path) -> None:
    async def main() -> list[Generation]:
        async with loaded(tiny) as engine:
            busy = await stalled(engine)
            low1 = await engine.generate(MODEL, completion(max_tokens=3, priority=5))
            low2 = await engine.generate(MODEL, completion(max_tokens=3, priority=5))
            high = await engine.generate(MODEL, completion(max_tokens=3, priority=0))
            busy.cancel()
            for gen in (low1, low2, high):
                await gen.text()
            return [low1, low2, high]

    low1, low2, high = run(main())
    assert high.started_at is not None and low1.started_at is not None and low2.started_at is not None
    assert high.started_at < low1.started_at < low2.started_at


def test_deadline_reached_in_the_queue_is_a_timeout_error(tiny: Path) -> None:
    async def main() -> tuple[Generation, errors.UpstreamTimeout, errors.UpstreamTimeout, Generation]:
        async with loaded(tiny) as engine:
            busy = await stalled(engine)
            queued = await engine.generate(MODEL, completion(max_tokens=3, deadline=time.monotonic() + 0.1))
            with pytest.raises(errors.UpstreamTimeout) as iterated:
                await drain(queued)
            # Taken from the queue after its deadline but before its timer fired: the worker refuses it too.
            worker = engine._entry(MODEL).generator
            late = Generation(
                completion(max_tokens=3, deadline=time.monotonic() - 1), asyncio.get_running_loop()
            )
            worker.submit(late)
            busy.cancel()
            with pytest.raises(errors.UpstreamTimeout) as popped:
                await late.text()
            after = await engine.generate(MODEL, completion(max_tokens=3))  # the worker carries on
            await after.text()
            return queued, iterated.value, popped.value, after

    queued, iterated, popped, after = run(main())
    assert queued.started_at is None and queued.finish_reason is None
    for error in (iterated, popped):
        assert error.status == 504 and error.code == "local_timeout"
        assert "waited in the queue for local model local/tiny" in error.message
    assert after.finish_reason in ("length", "stop")


def test_deadline_reached_while_running_ends_with_the_partial_text(
    tiny: Path, no_eog: dict[int, float]
) -> None:
    async def main() -> tuple[Generation, str, float]:
        async with loaded(tiny) as engine:
            started = time.monotonic()
            running = await engine.generate(
                MODEL, completion(max_tokens=None, logit_bias=no_eog, deadline=started + 0.05)
            )
            pieces = []
            async for piece in running:
                pieces.append(piece)
                await asyncio.sleep(0.001)  # a slow reader: the worker waits on backpressure, then times out
            return running, "".join(pieces), time.monotonic() - started

    running, text, took = run(main())
    assert running.finish_reason == "timeout"
    assert text and 0 < running.completion_tokens < N_CTX - running.prompt_tokens
    assert took < 2.0


def test_deadline_timers_do_not_keep_ended_requests_alive(tiny: Path) -> None:
    async def main() -> list[weakref.ref[Generation]]:
        refs = []
        async with loaded(tiny) as engine:
            far = time.monotonic() + 300
            for i in range(8):  # finished
                gen = await engine.generate(MODEL, completion(f"note {i}", max_tokens=2, deadline=far))
                await gen.text()
                refs.append(weakref.ref(gen))
            busy = await stalled(engine)
            queued = await engine.generate(MODEL, completion(max_tokens=2, deadline=far))
            queued.cancel()  # cancelled while queued
            refs.append(weakref.ref(queued))
            busy.cancel()
            failed = await engine.generate(MODEL, completion(grammar="root ::= nothing", deadline=far))
            with pytest.raises(errors.BadRequest):
                await failed.text()
            refs.append(weakref.ref(failed))
            del gen, queued, failed, busy
            await until(lambda: not engine.status()[MODEL]["active"])  # the worker is done with the last
            for _ in range(3):
                await asyncio.sleep(0)  # the timers are cancelled on the loop, from the end of each request
            gc.collect()
            return refs

    refs = run(main())
    assert [ref() for ref in refs] == [None] * len(refs)


def test_backpressure_the_worker_waits_for_a_slow_reader(tiny: Path, no_eog: dict[int, float]) -> None:
    async def main() -> tuple[int, Generation]:
        async with loaded(tiny) as engine:
            gen = await engine.generate(MODEL, completion(max_tokens=1000, logit_bias=no_eog))
            await asyncio.sleep(0.3)
            ahead = gen.completion_tokens
            await gen.text()
            return ahead, gen

    ahead, gen = run(main())
    assert BUFFER_PIECES <= ahead <= BUFFER_PIECES + 8
    assert gen.completion_tokens == 1000
