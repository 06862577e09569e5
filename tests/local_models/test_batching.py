"""Continuous batching in the engine: requests decoded together, slots freed at once, the prompt cache."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import llama_cpp
import pytest

from appliance import errors
from local_models import batching
from local_models.batching import BatchRunner
from local_models.engine import Generation, LocalEngine
from local_models.generation import GenerationRequest
from local_models.inference import LoadedModel
from local_models.registry import kv_bytes_per_token
from local_models.tiny import write_tiny_model
from tests.local_models._engine import MODEL, completion, drain, loaded, run, until

SYSTEM = (
    "You are the radiology department's assistant. Answer in short sentences, name the report section you "
    "used, and never guess a dose: say that the physician must confirm it. " * 4
)


def _chat(question: str, **fields: object) -> GenerationRequest:
    fields.setdefault("temperature", 0.0)
    fields.setdefault("max_tokens", 24)
    return GenerationRequest(
        kind="chat",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        **fields,  # type: ignore[arg-type]
    )


async def _timed(gen: Generation) -> tuple[float, float, str]:
    """(first piece at, end at, text), in time.monotonic()."""
    pieces = []
    first = 0.0
    async for piece in gen:
        if not pieces:
            first = time.monotonic()
        pieces.append(piece)
    return first, time.monotonic(), "".join(pieces)


def test_eight_requests_progress_together(tiny: Path, no_eog: dict[int, float]) -> None:
    async def main() -> tuple[list[tuple[float, float, str]], dict[str, object]]:
        async with loaded(tiny, slots=8) as engine:
            gens = [
                await engine.generate(MODEL, completion(f"Patient {i}", max_tokens=60, logit_bias=no_eog))
                for i in range(8)
            ]
            results = await asyncio.gather(*(_timed(g) for g in gens))
            return list(results), engine.status()[MODEL]

    results, status = run(main())
    firsts = [first for first, _, _ in results]
    ends = [end for _, end, _ in results]
    assert max(firsts) < min(ends), "a request's first token came after another request had finished"
    assert all(text for _, _, text in results)
    assert status["slots"] == 8 and status["active"] == 0


def test_a_cancelled_request_frees_its_slot_while_the_others_go_on(
    tiny: Path, no_eog: dict[int, float]
) -> None:
    async def main() -> None:
        async with loaded(tiny, slots=2) as engine:
            endless = completion(max_tokens=None, logit_bias=no_eog)
            a = await engine.generate(MODEL, endless)
            b = await engine.generate(MODEL, completion("Other", max_tokens=None, logit_bias=no_eog))
            c = await engine.generate(MODEL, completion("Third", max_tokens=5))
            await until(lambda: a.completion_tokens > 3 and b.completion_tokens > 3)
            assert c.started_at is None  # both slots are taken
            a.cancel()
            assert await drain(a) is not None and a.finish_reason == "cancelled"
            await c.text()  # got a slot at once and finished
            before = b.completion_tokens
            await until(lambda: b.completion_tokens > before + 3)  # b kept going all along
            assert not b.done
            b.cancel()
            await drain(b)
            await until(lambda: engine.status()[MODEL]["active"] == 0)

    run(main())


def test_a_cached_prefix_gives_the_same_greedy_output(tiny: Path) -> None:
    async def answer(engine: LocalEngine, question: str) -> str:
        return await (await engine.generate(MODEL, _chat(question))).text()

    async def main() -> tuple[str, str, int, int]:
        async with loaded(tiny, slots=2) as cold:
            uncached = await answer(cold, "What does the impression say?")
            assert cold.status()[MODEL]["cached_prompt_tokens"] == 0
        async with loaded(tiny, slots=2) as warm:
            await answer(warm, "Which section names the fracture?")  # the same system prompt, cached
            cached = await answer(warm, "What does the impression say?")
            saved = warm.status()[MODEL]["cached_prompt_tokens"]
            gen = await warm.generate(MODEL, _chat("What does the impression say?"))
            await gen.text()
            return uncached, cached, saved, gen.prompt_tokens

    uncached, cached, saved, prompt_tokens = run(main())
    assert cached == uncached
    assert saved > 100  # the system prompt's tokens were not evaluated again
    assert prompt_tokens > saved // 2  # usage still counts the whole prompt


def test_a_prefix_held_by_a_running_request_is_shared(tiny: Path, no_eog: dict[int, float]) -> None:
    async def main() -> int:
        async with loaded(tiny, slots=2) as engine:
            first = await engine.generate(MODEL, _chat("Go on.", max_tokens=None, logit_bias=no_eog))
            await until(lambda: first.completion_tokens > 2)
            second = await engine.generate(MODEL, _chat("Summarise."))
            await second.text()
            first.cancel()
            await drain(first)
            return int(engine.status()[MODEL]["cached_prompt_tokens"])

    assert run(main()) > 100


def test_cached_prompts_are_never_shared_across_scopes(tiny: Path) -> None:
    async def main() -> list[int]:
        seen = []
        async with loaded(tiny, slots=2) as engine:
            for scope in ("stmarys", "stjudes", "stjudes"):
                await (await engine.generate(MODEL, _chat("Same question.", cache_scope=scope))).text()
                seen.append(int(engine.status()[MODEL]["cached_prompt_tokens"]))
        return seen

    first, other_org, same_org = run(main())
    assert first == 0 and other_org == 0  # St Jude's never reuses what St Mary's had evaluated
    assert same_org > 100


# ---- found in review: each of these failed on the first version of the engine ----------------------


def test_each_sequence_has_the_context_the_policy_gives_not_the_whole_cache(tiny: Path) -> None:
    # With one unified cache llama.cpp sized every sequence's context as slots x n_ctx, and chose rope
    # factors from it (Phi-3's LongRoPE answered differently with 8 slots than with 1).
    model = LoadedModel(tiny, 512, slots=8, n_threads=1)
    try:
        assert llama_cpp.llama_n_ctx_seq(model.ctx) == 512
    finally:
        model.close()


def test_a_worker_with_every_slot_waiting_on_its_reader_does_not_spin(
    tiny: Path, no_eog: dict[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = []
    step = BatchRunner.step

    def counted(self: BatchRunner) -> bool:
        steps.append(1)
        return step(self)

    monkeypatch.setattr(BatchRunner, "step", counted)

    async def main() -> int:
        async with loaded(tiny, slots=1) as engine:
            unread = await engine.generate(MODEL, completion(max_tokens=None, logit_bias=no_eog))
            queued = await engine.generate(MODEL, completion("Next", max_tokens=3))
            await until(lambda: not unread.has_room())  # paused: nobody reads it
            before = len(steps)
            await asyncio.sleep(0.5)
            during = len(steps) - before
            unread.cancel()
            await drain(unread)
            await queued.text()
            return during

    assert run(main()) < 50  # a wait of 50 ms between looks, not a busy loop (tens of thousands)


def test_a_prompt_of_no_readable_tokens_is_refused_not_left_holding_its_slot(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LoadedModel(tiny, 512, slots=2, n_threads=1)
    loop = asyncio.new_event_loop()
    try:
        for tokens in ([], [-1], [1, model.n_vocab]):
            monkeypatch.setattr(model, "prompt_tokens", lambda gen, tokens=tokens: list(tokens))
            runner = BatchRunner(model)
            gen = Generation(completion(max_tokens=4), loop)
            assert runner.admit(gen) is False and not runner.busy()
            with pytest.raises(errors.BadRequest) as err:
                loop.run_until_complete(gen.text())
            assert err.value.code == "empty_prompt"
            runner.close()
    finally:
        loop.close()
        model.close()


def test_an_unexpected_failure_in_a_step_ends_its_requests_with_an_error_and_the_model_serves_on(
    tiny: Path, no_eog: dict[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = BatchRunner._sample
    failures = [RuntimeError("injected")]

    def failing(self: BatchRunner, slot: object, index: int) -> None:
        if failures:
            raise failures.pop()
        sample(self, slot, index)  # type: ignore[arg-type]

    monkeypatch.setattr(BatchRunner, "_sample", failing)

    async def main() -> str:
        async with loaded(tiny, slots=2) as engine:
            gen = await engine.generate(MODEL, completion(max_tokens=20, logit_bias=no_eog))
            with pytest.raises(errors.GatewayError) as err:
                await gen.text()
            assert err.value.code == "local_inference_failed"  # not a short answer that looks complete
            return await (await engine.generate(MODEL, completion("Again", max_tokens=5))).text()

    assert run(main())


def test_an_idle_worker_keeps_no_finished_request_alive(tiny: Path) -> None:
    async def main() -> weakref.ref[Generation]:
        async with loaded(tiny, slots=2) as engine:
            gen = await engine.generate(MODEL, completion("A prompt to forget " * 40, max_tokens=3))
            await gen.text()
            ref = weakref.ref(gen)
            del gen
            await until(lambda: engine.status()[MODEL]["active"] == 0)
            await asyncio.sleep(0.1)
            gc.collect()
            assert ref() is None, gc.get_referrers(ref())
            return ref

    run(main())


def test_a_deadline_reached_before_the_first_token_is_a_timeout_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "BATCH", 64)  # a long prompt takes many steps
    path = model_dir / "bench.gguf"
    if not path.exists():
        write_tiny_model(path, size="bench", seed=0)

    async def main() -> None:
        async with loaded(path, name="local/bench") as engine:
            prompt = "patient blood pressure heart rate history " * 150
            gen = await engine.generate(
                "local/bench", completion(prompt, max_tokens=5, deadline=time.monotonic() + 0.3)
            )
            with pytest.raises(errors.UpstreamTimeout):
                await gen.text()  # an empty 200 "length" answer before

    run(main())


def test_the_memory_budget_counts_the_cache_the_slots_hold(tiny: Path) -> None:
    # tiny: 2 layers, 2 KV heads of 16 dims, K and V in f16: 2 * 2 * (16 + 16) * 2 = 256 bytes a token.
    assert kv_bytes_per_token(tiny) == 256

    async def main() -> int:
        async with loaded(tiny, n_ctx=512, slots=4) as engine:
            return int(engine.status()[MODEL]["memory_bytes"])

    assert run(main()) == tiny.stat().st_size + 256 * 512 * 4
