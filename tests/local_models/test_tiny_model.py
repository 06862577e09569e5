"""The generated tiny GGUF: deterministic, loadable by llama-cpp-python, and a complete enough model to
exercise completions, chat (with the template from the file), streaming, embeddings and byte tokens."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jinja2
import numpy as np
import numpy.typing as npt
import pytest
from gguf import GGUFReader
from llama_cpp import Llama, LogitsProcessorList, llama_model_n_params
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

from local_models.tiny import CHAT_TEMPLATE, CONTROL_TOKENS, SIZES, main, write_tiny_model

TINY = SIZES["tiny"]
BYTE_OFFSET = 3


@pytest.fixture(scope="module")
def llm(tiny: Path) -> Iterator[Llama]:
    model = Llama(model_path=str(tiny), n_ctx=512, verbose=False)
    yield model
    model.close()


def _eog_bias(llm: Llama) -> dict[int, float]:
    """Forbid end-of-generation tokens so a run produces exactly max_tokens."""
    end = llm.tokenize(b"<|end|>", add_bos=False, special=True)
    assert len(end) == 1
    return {llm.token_eos(): -100.0, end[0]: -100.0}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the file --------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(model_dir: Path, tiny: Path) -> None:
    again = model_dir / "again.gguf"
    other = model_dir / "other.gguf"
    digest = write_tiny_model(again, seed=0)
    assert digest == _sha256(again) == _sha256(tiny)
    assert write_tiny_model(other, seed=1) != digest
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]


def test_unknown_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        write_tiny_model(tmp_path / "x.gguf", size="huge")
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_sha256(
    model_dir: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = model_dir / "cli.gguf"
    monkeypatch.setattr(sys, "argv", ["tiny", str(out), "--size", "tiny", "--seed", "0"])
    main()
    assert capsys.readouterr().out.strip() == _sha256(out) == _sha256(tiny)


def test_metadata_and_tensors(tiny: Path) -> None:
    reader = GGUFReader(tiny)
    fields = reader.fields
    for key in (
        "general.architecture",
        "general.file_type",
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.dimension_count",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ):
        assert key in fields, key
    names = {t.name for t in reader.tensors}
    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up")
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(TINY.n_layer) for t in (*per_block, "ffn_down")
    }
    assert names == expected
    assert sum(int(t.n_elements) for t in reader.tensors) == TINY.n_params


def test_bench_size_writes_fast_and_loads(model_dir: Path) -> None:
    spec = SIZES["bench"]
    assert 25_000_000 < spec.n_params < 40_000_000
    path = model_dir / "bench.gguf"
    started = time.perf_counter()
    write_tiny_model(path, size="bench")
    assert time.perf_counter() - started < 10
    model = Llama(model_path=str(path), n_ctx=128, verbose=False)
    try:
        assert (model.n_embd(), model.n_vocab(), llama_model_n_params(model.model)) == (
            spec.n_embd,
            spec.n_vocab,
            spec.n_params,
        )
    finally:
        model.close()


# --- the model in llama-cpp-python ----------------------------------------------------------------


def test_completion(llm: Llama) -> None:
    out = llm.create_completion("The patient", max_tokens=8, logit_bias=_eog_bias(llm), seed=1)
    assert isinstance(out, dict)
    assert out["usage"]["completion_tokens"] == 8
    assert out["choices"][0]["finish_reason"] == "length"
    assert isinstance(out["choices"][0]["text"], str)


def test_completion_stream(llm: Llama) -> None:
    stream = llm.create_completion("The patient", max_tokens=8, stream=True, logit_bias=_eog_bias(llm))
    assert not isinstance(stream, dict)
    chunks = list(stream)
    assert chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_uses_the_template_from_the_file(llm: Llama) -> None:
    assert llm.chat_format == "chat_template.default"
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    messages: list[ChatCompletionRequestMessage] = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ]
    expected = "<s><|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    rendered = Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")(
        messages=messages
    )
    assert rendered.prompt == expected
    # Same text in a plain environment (no trim_blocks), as other template engines would render it.
    plain = jinja2.Environment(autoescape=False).from_string(CHAT_TEMPLATE)
    assert plain.render(messages=messages, bos_token="<s>", add_generation_prompt=True) == expected

    prompt_ids = llm.tokenize(expected.encode(), add_bos=False, special=True)
    control_ids = [llm.tokenize(t.encode(), add_bos=False, special=True)[0] for t in CONTROL_TOKENS]
    assert set(control_ids) <= set(prompt_ids)
    out = llm.create_chat_completion(messages=messages, max_tokens=8, logit_bias=_eog_bias(llm))
    assert isinstance(out, dict)
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)
    assert out["usage"]["completion_tokens"] == 8
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_chat_stream(llm: Llama) -> None:
    stream = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True, logit_bias=_eog_bias(llm)
    )
    assert not isinstance(stream, dict)
    chunks = list(stream)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_have_n_embd_dims(tiny: Path) -> None:
    model = Llama(model_path=str(tiny), n_ctx=512, verbose=False, embedding=True)
    try:
        out = model.create_embedding(["hello world", "blood pressure"])
    finally:
        model.close()
    assert [len(d["embedding"]) for d in out["data"]] == [TINY.n_embd, TINY.n_embd]
    assert all(isinstance(x, float) for x in out["data"][0]["embedding"])


# --- the tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "The patient's blood pressure was 120/80 mmHg.",
        "café",
        "中文",
        "🙂 ok",
        " two  spaces\n\ttab",
    ],
)
def test_tokenizer_round_trip(llm: Llama, text: str) -> None:
    assert llm.detokenize(llm.tokenize(text.encode())).decode() == text


def test_word_pieces_are_single_tokens(llm: Llama) -> None:
    assert len(llm.tokenize(b"the", add_bos=False)) == 1
    assert llm.detokenize(llm.tokenize(b" patient", add_bos=False)[-1:]) == b" patient"


def test_byte_tokens_can_be_generated_and_are_raw_bytes(llm: Llama) -> None:
    e4, b8, ad = (BYTE_OFFSET + b for b in b"\xe4\xb8\xad")
    assert llm.detokenize([e4]) == b"\xe4"
    assert llm.tokenize("中".encode(), add_bos=False)[-3:] == [e4, b8, ad]

    forced = iter([e4, b8])

    def force_next(_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        target = next(forced)
        scores[:] = -np.inf
        scores[target] = 0.0
        return scores

    prompt = llm.tokenize(b"The patient")
    generated = []
    for token in llm.generate(prompt, temp=0.0, logits_processor=LogitsProcessorList([force_next])):
        generated.append(token)
        if len(generated) == 2:
            break
    assert generated == [e4, b8]
    raw = llm.detokenize(generated)
    assert raw == b"\xe4\xb8"
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
