"""The llama.cpp engine's models: two at once, unloading, idle unload, the memory budget, file changes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import errors
from local_models.engine import LocalEngine
from local_models.registry import default_slots, file_identity, kv_bytes_per_token
from tests.local_models._engine import MODEL, N_CTX, NO_EOG, completion, drain, loaded, run, stalled, until

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
    size = tiny.stat().st_size + kv_bytes_per_token(tiny) * 512 * default_slots(512)  # weights + cache
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
