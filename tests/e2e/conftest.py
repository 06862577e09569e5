"""Fixtures shared by the end-to-end tests of local models."""

from __future__ import annotations

from pathlib import Path

import pytest

from local_models.tiny import write_tiny_model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("models")
    return {
        name: (folder / f"{name}.gguf", write_tiny_model(folder / f"{name}.gguf", seed=seed))
        for name, seed in (("tiny", 0), ("tiny2", 1))
    }
