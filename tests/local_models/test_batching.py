"""Continuous batching in the engine: requests decoded together, slots freed at once, the prompt cache."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from local_models.engine import Generation, LocalEngine
from local_models.generation import GenerationRequest
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
