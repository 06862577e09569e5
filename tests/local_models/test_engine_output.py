"""The llama.cpp engine's output: bytes to text, stop strings, exact usage, grammars, refusals, embeddings."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance import errors
from local_models.decode import CompletionText, StopScanner, Utf8Stream
from local_models.engine import Generation, GenerationRequest
from local_models.tiny import CHAT_TEMPLATE
from tests.local_models._engine import MODEL, byte_token, completion, drain, loaded, run

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
