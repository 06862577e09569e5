"""Fixtures for the engine tests: random-weight tiny models, written once a module, and llama.cpp on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_cpp import Llama

from local_models.cpu_backend import CpuBackend, ensure_cpu_backend
from local_models.tiny import write_tiny_model
from tests.local_models._engine import NO_EOG


@pytest.fixture(scope="session", autouse=True)
def cpu_backend() -> None:
    """Plain ``llama_cpp.Llama`` yardsticks need llama.cpp's CPU code loaded first, as the gateway does."""
    ensure_cpu_backend()


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    """The variant loaded here; the tests that check it are for the portable build only."""
    loaded = ensure_cpu_backend()
    assert loaded.variant != "builtin", (
        f"the installed llama_cpp has its CPU backend linked in ({loaded.path}): it is not the portable "
        "build. Rebuild the environment with ./dev (image/build-llama)"
    )
    return loaded


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
