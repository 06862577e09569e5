"""The in-process llama.cpp engine: text that streams whatever bytes the model makes, exact usage, stop
strings, cancellation (queued, mid-stream, mid-prompt), the bounded priority queue, deadlines, idle
unload, the memory budget, grammars and embeddings — on generated random-weight models, offline."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance import errors
from local_models import inference
from local_models.decode import CompletionText, StopScanner, Utf8Stream
from local_models.engine import Generation, GenerationRequest, LocalEngine
from local_models.generation import BUFFER_PIECES
from local_models.registry import file_identity
from local_models.tiny import BYTE_OFFSET, CHAT_TEMPLATE, CONTROL_TOKENS, END_OF_TURN, write_tiny_model

T = TypeVar("T")
MODEL = "local/tiny"
N_CTX = 2048
# Forbids the end-of-generation tokens (</s>, <|end|>) so that a run lasts as long as the test needs.
NO_EOG = {2: -100.0, BYTE_OFFSET + 256 + CONTROL_TOKENS.index(END_OF_TURN): -100.0}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def byte_token(value: int) -> int:
    return BYTE_OFFSET + value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-models")


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> Path:
    path = model_dir / "tiny.gguf"
    write_tiny_model(path, size="tiny", seed=0)
    return path


@pytest.fixture(scope="module")
def tiny_others(model_dir: Path) -> list[Path]:
    paths = [model_dir / f"tiny-{seed}.gguf" for seed in (1, 2)]
    for seed, path in enumerate(paths, start=1):
        write_tiny_model(path, size="tiny", seed=seed)
    return paths


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Iterator[Llama]:
    """Plain llama-cpp-python on the same file: the yardstick for tokens and greedy output."""
    llm = Llama(model_path=str(tiny), n_ctx=512, n_threads=1, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def no_eog(reference: Llama) -> dict[int, float]:
    end = reference.tokenize(b"<|end|>", add_bos=False, special=True)
    assert {reference.token_eos(): -100.0, end[0]: -100.0} == NO_EOG
    return NO_EOG


@contextlib.asynccontextmanager
async def loaded(
    path: Path,
    *,
    name: str = MODEL,
    n_ctx: int = N_CTX,
    identity: tuple[int, ...] | None = None,
    **options: Any,
) -> AsyncIterator[LocalEngine]:
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


# --- bytes to text, no model --------------------------------------------------------------------------


def feed_bytes(data: bytes) -> list[str]:
    stream = Utf8Stream()
    return [stream.decode(bytes([b])) for b in data] + [stream.flush()]


def test_utf8_emits_each_character_when_its_last_byte_arrives() -> None:
    assert feed_bytes("中a".encode()) == ["", "", "中", "a", ""]
    assert feed_bytes("😀".encode()) == ["", "", "", "😀", ""]


def test_utf8_invalid_bytes_leave_at_once_as_replacement() -> None:
    # A valid lead and continuation, then a byte that cannot continue: both leave with the new byte.
    assert feed_bytes(b"\xe4\xb8a") == ["", "", "\ufffda", ""]
    assert feed_bytes(b"\xe4\xe4a") == ["", "\ufffd", "\ufffda", ""]
    assert feed_bytes(b"\xf5") == ["\ufffd", ""]  # never a lead byte
    assert feed_bytes(b"\x80") == ["\ufffd", ""]  # a stray continuation
    assert feed_bytes(b"\xe0\x80") == ["", "\ufffd\ufffd", ""]  # overlong, known at the second byte
    assert feed_bytes(b"\xed\xa0") == ["", "\ufffd\ufffd", ""]  # a surrogate, ditto (stdlib waits here)
    assert feed_bytes(b"\xf4\x90") == ["", "\ufffd\ufffd", ""]  # above U+10FFFF
    assert feed_bytes(b"\xe4\xb8") == ["", "", "\ufffd"]  # unfinished at the end


def test_utf8_random_bytes_match_a_whole_decode_and_hold_at_most_three() -> None:
    rng = random.Random(3)
    for _ in range(300):
        data = bytes(
            rng.choice(b"a\x80\xbf\xc3\xe0\xe4\xb8\xad\xed\xf0\x9f\x98\x80\xf4\xf5") for _ in range(40)
        )
        stream = Utf8Stream()
        out = []
        for i in range(len(data)):
            out.append(stream.decode(data[i : i + 1]))
            held = len(data[: i + 1]) - len("".join(out).encode("utf-8", errors="surrogatepass"))
            assert held <= 3 or "\ufffd" in "".join(out)
        out.append(stream.flush())
        assert "".join(out) == data.decode("utf-8", errors="replace")


def test_stop_string_across_pieces_holds_back_only_a_possible_start() -> None:
    scanner = StopScanner(["STOP"])
    assert scanner.feed("abcS") == ("abc", False)
    assert scanner.feed("T") == ("", False)
    assert scanner.feed("x") == ("STx", False)  # not a stop after all: released at once
    assert scanner.feed("yST") == ("y", False)
    assert scanner.feed("OP and more") == ("", True)


def test_stop_strings_earliest_wins_and_overlaps_are_found() -> None:
    scanner = StopScanner(["cd", "abcde"])
    assert scanner.feed("xab") == ("x", False)
    assert scanner.feed("c") == ("", False)
    assert scanner.feed("d") == ("ab", True)  # "cd" ends first
    plain = StopScanner([])
    assert plain.feed("anything") == ("anything", False)
    assert plain.flush() == ""
    tail = StopScanner(["###"])
    assert tail.feed("ok#") == ("ok", False)
    assert tail.flush() == "#"


def test_completion_text_stop_inside_multibyte_and_flush() -> None:
    text = CompletionText(["中文"])
    pieces = [text.feed(bytes([b])) for b in "x中文y".encode()]
    assert "".join(pieces) == "x"
    assert text.stopped
    assert text.finish() == ""
    open_end = CompletionText(["zz"])
    assert open_end.feed(b"az") == "a"  # "z" could start "zz"
    assert open_end.feed(b"\xe4") == ""  # an unfinished character: nothing decodable yet
    assert open_end.finish() == "z\ufffd"


# --- generation: text and usage ------------------------------------------------------------------------


def reference_greedy(llm: Llama, prompt: str, n: int) -> tuple[int, int, str]:
    """Prompt tokens, completion tokens and greedy text from plain llama-cpp-python (decoded at the end)."""
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    out: list[int] = []
    llm.reset()
    for token in llm.generate(tokens, temp=0.0):
        if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token):
            break
        out.append(token)
        if len(out) == n:
            break
    return len(tokens), len(out), llm.detokenize(out, prev_tokens=tokens).decode("utf-8", errors="replace")


def test_completion_greedy_matches_llama_cpp_with_exact_usage(tiny: Path, reference: Llama) -> None:
    prompt = "The patient reports chest pain"
    n_prompt, n_completion, expected = reference_greedy(reference, prompt, 40)

    async def main() -> tuple[Generation, str, Generation, list[str]]:
        async with loaded(tiny) as engine:
            whole = await engine.generate(MODEL, completion(prompt, max_tokens=40, temperature=0.0))
            text = await whole.text()
            streamed = await engine.generate(MODEL, completion(prompt, max_tokens=40, temperature=0.0))
            return whole, text, streamed, await drain(streamed)

    whole, text, streamed, pieces = run(main())
    assert text == expected
    assert (whole.prompt_tokens, whole.completion_tokens) == (n_prompt, n_completion)
    assert whole.finish_reason == ("length" if n_completion == 40 else "stop")
    assert "".join(pieces) == text and len(pieces) > 1
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (
        whole.prompt_tokens,
        whole.completion_tokens,
    )


def test_chat_uses_the_models_template_stream_and_not(
    tiny: Path, reference: Llama, no_eog: dict[int, float]
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How is the patient?"},
    ]
    formatter = Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    rendered = formatter(messages=messages)  # type: ignore[arg-type]
    n_prompt = len(reference.tokenize(rendered.prompt.encode(), add_bos=False, special=True))

    async def main() -> tuple[Generation, str, Generation, list[str]]:
        async with loaded(tiny) as engine:
            request = GenerationRequest(
                kind="chat", messages=messages, max_tokens=25, seed=11, logit_bias=no_eog
            )
            whole = await engine.generate(MODEL, request)
            text = await whole.text()
            streamed = await engine.generate(MODEL, request)
            return whole, text, streamed, await drain(streamed)

    whole, text, streamed, pieces = run(main())
    assert text and "".join(pieces) == text  # same seed, same text
    for gen in (whole, streamed):
        assert (gen.prompt_tokens, gen.completion_tokens, gen.finish_reason) == (n_prompt, 25, "length")


def test_max_tokens_none_runs_to_the_end_of_the_context(tiny: Path, no_eog: dict[int, float]) -> None:
    async def main() -> Generation:
        async with loaded(tiny, n_ctx=64) as engine:
            gen = await engine.generate(MODEL, completion(max_tokens=None, logit_bias=no_eog))
            await gen.text()
            return gen

    gen = run(main())
    assert gen.finish_reason == "length"
    assert gen.prompt_tokens + gen.completion_tokens == 64


def test_stop_string_spanning_tokens_ends_the_text_before_it(tiny: Path, no_eog: dict[int, float]) -> None:
    async def main() -> tuple[list[str], Generation, str]:
        async with loaded(tiny) as engine:
            free = await engine.generate(MODEL, completion(max_tokens=40, temperature=0.0, logit_bias=no_eog))
            pieces = await drain(free)
            # Two characters either side of the boundary between the 5th and 6th pieces.
            cut = len("".join(pieces[:5]))
            full = "".join(pieces)
            stop = full[cut - 2 : cut + 2]
            stopped = await engine.generate(
                MODEL, completion(max_tokens=40, temperature=0.0, logit_bias=no_eog, stop=["never", stop])
            )
            return pieces, stopped, await stopped.text()

    pieces, stopped, text = run(main())
    full = "".join(pieces)
    cut = len("".join(pieces[:5]))
    assert len(full) >= cut + 2
    assert text == full[: full.index(full[cut - 2 : cut + 2])]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < 40


def test_invalid_byte_tokens_never_stall_the_stream(tiny: Path, no_eog: dict[int, float]) -> None:
    # Only "<0xE4>" (a lead byte never completed here) and "<0x61>" ("a") can be sampled.
    bias = {**no_eog, byte_token(0xE4): 100.0, byte_token(0x61): 100.0}

    async def main() -> tuple[Generation, list[str]]:
        async with loaded(tiny) as engine:
            gen = await engine.generate(
                MODEL, completion(max_tokens=200, temperature=1.0, seed=5, logit_bias=bias)
            )
            return gen, await drain(gen)

    gen, seen = run(main())
    text = "".join(seen)
    assert gen.completion_tokens == 200 and gen.finish_reason == "length"
    assert set(text) == {"\ufffd", "a"}
    assert len(text) == 200  # every token became exactly one character: no byte was held for good
    assert len(seen) >= 100  # pieces kept coming while tokens were generated, not in one lump at the end


def test_invalid_then_valid_bytes_stream_promptly(tiny: Path, no_eog: dict[int, float]) -> None:
    # "<0xE4>" "<0xB8>" can start a character; "<0xAD>" completes it ("中"), "a" breaks it.
    bias = {**no_eog, **{byte_token(b): 100.0 for b in (0xE4, 0xB8, 0xAD, 0x61)}}

    async def main() -> tuple[Generation, list[str]]:
        async with loaded(tiny) as engine:
            gen = await engine.generate(
                MODEL, completion(max_tokens=300, temperature=1.5, seed=9, logit_bias=bias)
            )
            return gen, await drain(gen)

    gen, pieces = run(main())
    text = "".join(pieces)
    assert gen.completion_tokens == 300
    made = {bytes([0xE4, x, y]).decode() for x in (0xB8, 0xAD) for y in (0xB8, 0xAD)}
    assert set(text) <= {"\ufffd", "a", *made}  # only what those bytes can make
    assert "\ufffd" in text and "a" in text
    assert len(pieces) >= 300 // 4  # at most three bytes are ever held


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
            assert engine.status()[MODEL]["active"] is False
            return gen, at_cancel, took

    gen, at_cancel, took = run(main())
    assert gen.finish_reason == "cancelled"
    assert gen.completion_tokens - at_cancel <= 2
    assert took < 1.0


def test_cancel_during_a_long_prompt_returns_quickly(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One decode call for the whole prompt, so only llama.cpp's abort callback can stop it early.
    monkeypatch.setattr(inference, "PROMPT_BATCH", N_CTX)
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


# --- models ---------------------------------------------------------------------------------------


def test_two_models_generate_at_the_same_time(tiny: Path, tiny_others: list[Path]) -> None:
    async def main() -> tuple[dict[str, Any], list[str], list[str]]:
        engine = LocalEngine(n_threads=1)
        try:
            await asyncio.gather(
                engine.load("local/a", tiny, 512), engine.load("local/b", tiny_others[0], 512)
            )
            a = await stalled(engine, "local/a")
            b = await stalled(engine, "local/b")
            both = engine.status()  # each worker is busy with its own request at this moment
            text_a, text_b = await asyncio.gather(drain(a), drain(b))
            return both, text_a, text_b
        finally:
            await engine.close()

    both, text_a, text_b = run(main())
    assert both["local/a"]["active"] and both["local/b"]["active"]
    assert text_a and text_b and text_a != text_b


def test_not_loaded_and_unloaded_models_are_unavailable(tiny: Path) -> None:
    async def main() -> tuple[errors.Unavailable, errors.Unavailable, errors.Unavailable]:
        async with loaded(tiny) as engine:
            with pytest.raises(errors.Unavailable) as missing:
                await engine.generate("local/nope", completion())
            running = await engine.generate(MODEL, completion(max_tokens=None, logit_bias=NO_EOG))
            await running.__anext__()
            await engine.load(MODEL, tiny, N_CTX)  # a no-op
            await engine.unload(MODEL)
            with pytest.raises(errors.Unavailable) as mid_stream:
                await drain(running)
            with pytest.raises(errors.Unavailable) as after:
                await engine.generate(MODEL, completion())
            assert engine.status() == {} and not engine.is_loaded(MODEL)
            return missing.value, mid_stream.value, after.value

    missing, mid_stream, after = run(main())
    assert missing.code == after.code == "model_not_loaded"
    assert mid_stream.code == "model_unloaded"


def test_idle_models_are_unloaded_busy_ones_kept(tiny: Path) -> None:
    async def main() -> None:
        async with loaded(tiny, idle_unload_s=0.2) as engine:
            busy = await stalled(engine)
            await asyncio.sleep(0.6)
            assert engine.is_loaded(MODEL)
            busy.cancel()
            await until(lambda: not engine.is_loaded(MODEL), within=3.0)
            assert engine.status() == {}
            with pytest.raises(errors.Unavailable):
                await engine.generate(MODEL, completion())

    run(main())


def test_memory_budget_evicts_the_least_recently_used_idle_model_or_refuses(
    tiny: Path, tiny_others: list[Path]
) -> None:
    size = tiny.stat().st_size
    b_path, c_path = tiny_others

    async def main() -> tuple[errors.Unavailable, errors.Unavailable]:
        engine = LocalEngine(n_threads=1, memory_budget_bytes=int(size * 2.5))
        try:
            await engine.load("local/a", tiny, 512)
            await engine.load("local/b", b_path, 512)
            await (await engine.generate("local/a", completion(max_tokens=2))).text()  # b is now least recent
            await engine.load("local/c", c_path, 512)
            assert sorted(engine.status()) == ["local/a", "local/c"]
            busy = [await stalled(engine, "local/a"), await stalled(engine, "local/c")]
            with pytest.raises(errors.Unavailable) as in_use:
                await engine.load("local/b", b_path, 512)
            for gen in busy:
                gen.cancel()
        finally:
            await engine.close()
        small = LocalEngine(n_threads=1, memory_budget_bytes=size // 2)
        try:
            with pytest.raises(errors.Unavailable) as too_big:
                await small.load("local/a", tiny, 512)
        finally:
            await small.close()
        return in_use.value, too_big.value

    in_use, too_big = run(main())
    assert in_use.code == too_big.code == "memory_budget"


# --- grammar, errors, embeddings -------------------------------------------------------------------

OBJECT_GRAMMAR = r"""
root   ::= "{" ws "\"name\":" ws string "," ws "\"age\":" ws number ws "}"
string ::= "\"" [a-z]{1,12} "\""
number ::= [1-9] [0-9]{0,2}
ws     ::= [ ]?
"""


def test_grammar_output_parses_as_the_json_object(tiny: Path) -> None:
    async def main() -> list[tuple[str, Generation]]:
        async with loaded(tiny) as engine:
            out = []
            for seed in (1, 2, 3):
                gen = await engine.generate(
                    MODEL, completion("{", max_tokens=100, seed=seed, grammar=OBJECT_GRAMMAR)
                )
                out.append((await gen.text(), gen))
            return out

    for text, gen in run(main()):
        value = json.loads(text)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)
        assert gen.finish_reason == "stop"


def test_bad_requests_fail_on_the_stream_before_any_text(tiny: Path) -> None:
    async def main() -> list[str]:
        codes = []
        async with loaded(tiny, n_ctx=64) as engine:
            for request in (
                completion(grammar="root ::= nothing-defined"),
                completion("word " * 100),
                completion(logit_bias={10**7: 1.0}),
                GenerationRequest(kind="chat", messages=[{"role": "user", "content": "x " * 100}]),
            ):
                gen = await engine.generate(MODEL, request)
                with pytest.raises(errors.BadRequest) as caught:
                    await gen.__anext__()
                codes.append(caught.value.code)
            ok = await engine.generate(MODEL, completion(max_tokens=3))  # the worker carries on
            assert await ok.text() is not None
        return codes

    assert run(main()) == [
        "invalid_grammar",
        "context_length_exceeded",
        "invalid_logit_bias",
        "context_length_exceeded",
    ]


def test_embeddings_one_unit_vector_per_input_with_token_count(tiny: Path, reference: Llama) -> None:
    inputs = ["blood pressure", "heart rate history", "blood pressure"]
    expected_tokens = sum(len(reference.tokenize(text.encode())) for text in inputs)

    async def main() -> tuple[list[list[float]], int, dict[str, Any]]:
        async with loaded(tiny) as engine:
            vectors, count = await engine.embed(MODEL, inputs)
            return vectors, count, engine.status()

    vectors, count, status = run(main())
    assert count == expected_tokens
    assert len(vectors) == 3 and {len(v) for v in vectors} == {64}
    for vector in vectors:
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-4
    assert vectors[0] == pytest.approx(vectors[2]) and vectors[0] != pytest.approx(vectors[1])
    assert status[MODEL]["embedding"]["state"] == "ready"


def test_embed_takes_a_priority_and_a_deadline(tiny: Path) -> None:
    async def main() -> tuple[int, errors.UpstreamTimeout]:
        async with loaded(tiny) as engine:
            _, count = await engine.embed(MODEL, ["heart rate"], priority=3, deadline=time.monotonic() + 30)
            with pytest.raises(errors.UpstreamTimeout) as late:
                await engine.embed(MODEL, ["heart rate"], deadline=time.monotonic() - 1)
            return count, late.value

    count, late = run(main())
    assert count > 0
    assert late.status == 504 and late.code == "local_timeout"


# --- the file under a loaded model ---------------------------------------------------------------

_FILE_PROBE = """
import asyncio, json, os, sys
from pathlib import Path
from local_models.engine import GenerationRequest, LocalEngine

async def main() -> None:
    path, other = Path(sys.argv[1]), Path(sys.argv[2])
    engine = LocalEngine(n_threads=1)
    await engine.load("local/tiny", path, 256)
    async def ask() -> str:
        request = GenerationRequest(kind="completion", prompt="The patient", max_tokens=12, temperature=0)
        return await (await engine.generate("local/tiny", request)).text()
    texts = [await ask()]
    with open(path, "r+b") as f:  # overwritten in place, as cp does to an existing file
        f.write(other.read_bytes())
    texts.append(await ask())
    os.truncate(path, 1000)
    texts.append(await ask())
    await engine.close()
    print(json.dumps(texts))

asyncio.run(main())
"""


def test_a_loaded_model_ignores_later_changes_to_its_file(
    tiny: Path, tiny_others: list[Path], tmp_path: Path
) -> None:
    # In a child process: with the file mapped, the truncation kills the process with SIGBUS.
    path = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny, path)
    assert path.stat().st_size == tiny_others[0].stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", _FILE_PROBE, str(path), str(tiny_others[0])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    before, overwritten, truncated = json.loads(done.stdout)
    assert before and overwritten == before and truncated == before


def test_instances_load_only_the_file_vouched_for(
    tiny: Path, tiny_others: list[Path], tmp_path: Path
) -> None:
    path = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny, path)
    identity = file_identity(path.stat())

    async def main() -> tuple[errors.Unavailable, errors.Unavailable]:
        async with loaded(path, identity=identity) as engine:  # the file as verified: loads
            shutil.copyfile(tiny_others[0], tmp_path / "swap.gguf")
            os.replace(tmp_path / "swap.gguf", path)  # swapped after the generation instance loaded
            with pytest.raises(errors.Unavailable) as embedder:
                await engine.embed(MODEL, ["heart rate"])
            assert engine.is_loaded(MODEL)  # the generation instance is unaffected
        engine = LocalEngine(n_threads=1)
        try:
            with pytest.raises(errors.Unavailable) as stale:
                await engine.load(MODEL, path, N_CTX, identity=identity)
            assert not engine.is_loaded(MODEL)
        finally:
            await engine.close()
        return embedder.value, stale.value

    embedder, stale = run(main())
    assert embedder.code == stale.code == "model_file_changed"
