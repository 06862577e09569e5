"""Quantized tiny models (Q8_0, Q4_0, Q6_K): the files (deterministic, typed as llama-quantize --pure would
type them) and llama.cpp running them through local_models on the CPU backend variant chosen here."""

from __future__ import annotations

import ctypes
import hashlib
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.quants import dequantize
from llama_cpp import Llama

from local_models import tiny as tiny_module
from local_models.cpu_backend import CpuBackend
from local_models.generation import GenerationRequest
from local_models.tiny import QUANTS, SIZES, main, write_tiny_model
from tests.local_models._engine import NO_EOG, completion, drain, loaded, run

T = GGMLQuantizationType
# (size, quant) -> the 2-D weights' type, and the type of those whose rows do not divide into its blocks.
CASES: dict[tuple[str, str], tuple[GGMLQuantizationType, GGMLQuantizationType, LlamaFileType]] = {
    ("tiny", "q8_0"): (T.Q8_0, T.F16, LlamaFileType.MOSTLY_Q8_0),  # ffn_down rows: n_ff = 176
    ("tiny", "q4_0"): (T.Q4_0, T.F16, LlamaFileType.MOSTLY_Q4_0),
    ("bench", "q6_k"): (T.Q6_K, T.Q8_0, LlamaFileType.MOSTLY_Q6_K),  # ffn_down rows: n_ff = 1408
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def quantized(model_dir: Path) -> dict[tuple[str, str], tuple[Path, str]]:
    models = {}
    for size, quant in CASES:
        path = model_dir / f"{size}-{quant}.gguf"
        models[size, quant] = path, write_tiny_model(path, size=size, quant=quant)
    return models


# --- the files --------------------------------------------------------------------------------------


def test_same_quant_same_bytes(model_dir: Path, quantized: dict[tuple[str, str], tuple[Path, str]]) -> None:
    digests = set()
    for (size, quant), (path, digest) in quantized.items():
        again = model_dir / f"again-{size}-{quant}.gguf"
        assert write_tiny_model(again, size=size, quant=quant) == digest == _sha256(path) == _sha256(again)
        digests.add(digest)
    assert len(digests) == len(quantized)


def test_the_default_quant_is_the_sizes_own(model_dir: Path, tiny: Path) -> None:
    assert write_tiny_model(model_dir / "f32.gguf", quant="f32") == _sha256(tiny)
    assert write_tiny_model(model_dir / "f16.gguf", quant="f16") != _sha256(tiny)


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(c))
def test_tensor_types_and_file_type(
    case: tuple[str, str], quantized: dict[tuple[str, str], tuple[Path, str]]
) -> None:
    main_type, fallback, file_type = CASES[case]
    reader = GGUFReader(quantized[case][0])
    assert int(reader.fields["general.file_type"].parts[-1][0]) == file_type
    assert str(bytes(reader.fields["general.name"].parts[-1]), "utf-8").endswith(f"-{case[1]}")
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name, kind in types.items():
        if name.endswith("_norm.weight"):
            assert kind == T.F32, name
        elif name.endswith("ffn_down.weight"):
            assert kind == fallback, name
        else:
            assert kind == main_type, name  # token_embd and output included, as llama-quantize --pure
    assert len(types) == 3 + 9 * SIZES[case[0]].n_layer


def test_quantized_weights_are_the_f32_weights_within_the_types_error(
    quantized: dict[tuple[str, str], tuple[Path, str]],
) -> None:
    # Q6_K blocks are packed by tiny.py itself: gguf's dequantizer reading them back is the check.
    limits = {T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q4_0: 0.12, T.F16: 0.001}
    for (size, _), (path, _) in quantized.items():
        weights = dict(tiny_module._random_weights(SIZES[size], seed=0))
        for tensor in GGUFReader(path).tensors:
            if tensor.tensor_type == T.F32:
                continue
            want = weights[tensor.name]
            got = dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
            error = float(np.sqrt(np.mean((got - want) ** 2)) / want.std())
            assert error < limits[tensor.tensor_type], (tensor.name, tensor.tensor_type.name, error)


def test_k_quants_need_rows_of_256(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"q6_k quantizes rows in blocks of 256 .* use size 'bench'"):
        write_tiny_model(tmp_path / "x.gguf", size="tiny", quant="q6_k")
    with pytest.raises(ValueError, match="unknown quant"):
        write_tiny_model(tmp_path / "x.gguf", quant="q3_k_m")
    assert list(tmp_path.iterdir()) == []
    assert set(QUANTS) == {"f32", "f16", "q8_0", "q4_0", "q6_k"}


def test_cli_quant(
    model_dir: Path,
    quantized: dict[tuple[str, str], tuple[Path, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = model_dir / "cli-q4.gguf"
    monkeypatch.setattr(sys, "argv", ["tiny", str(out), "--quant", "q4_0"])
    main()
    assert capsys.readouterr().out.strip() == _sha256(out) == quantized["tiny", "q4_0"][1]
    monkeypatch.setattr(sys, "argv", ["tiny", str(out), "--quant", "q6_k"])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2 and "blocks of 256" in capsys.readouterr().err


# --- llama.cpp on them ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(c))
def test_llama_cpp_reads_the_type(
    case: tuple[str, str], backend: CpuBackend, quantized: dict[tuple[str, str], tuple[Path, str]]
) -> None:
    llm = Llama(str(quantized[case][0]), n_ctx=64, n_threads=2, verbose=False)
    try:
        desc = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(llm.model, desc, len(desc))
        assert desc.value.decode().endswith(f" {case[1].upper()}"), desc.value  # e.g. "llama ?B Q8_0"
        assert llm.metadata["general.file_type"] == str(int(CASES[case][2]))
    finally:
        llm.close()


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(c))
def test_generates_greedily_and_deterministically(
    case: tuple[str, str], backend: CpuBackend, quantized: dict[tuple[str, str], tuple[Path, str]]
) -> None:
    path = quantized[case][0]

    async def generate_twice() -> list[tuple[str, Any, int]]:
        answers = []
        for _ in range(2):
            async with loaded(path, n_ctx=256) as engine:
                gen = await engine.generate(
                    "local/tiny", completion("The patient", temperature=0.0, max_tokens=24, logit_bias=NO_EOG)
                )
                text = "".join(await drain(gen))
                answers.append((text, gen.finish_reason, gen.completion_tokens))
        return answers

    first, second = run(generate_twice())
    assert first == second
    assert first[0] and first[1] == "length" and first[2] == 24


def test_chat_and_embeddings_on_q4_0(
    backend: CpuBackend, quantized: dict[tuple[str, str], tuple[Path, str]]
) -> None:
    async def both() -> tuple[str, list[list[float]]]:
        async with loaded(quantized["tiny", "q4_0"][0], n_ctx=256) as engine:
            chat = GenerationRequest(
                kind="chat",
                messages=[{"role": "user", "content": "Summarise the note."}],
                temperature=0.0,
                max_tokens=8,
                logit_bias=NO_EOG,
            )
            text = "".join(await drain(await engine.generate("local/tiny", chat)))
            vectors, _ = await engine.embed("local/tiny", ["heart rate", "blood pressure"])
            return text, vectors

    text, vectors = run(both())
    assert text
    assert len(vectors) == 2 and len(vectors[0]) == SIZES["tiny"].n_embd and vectors[0] != vectors[1]
    assert all(np.isfinite(vectors[0]))
