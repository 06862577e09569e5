"""Local models inside a running gateway: which files the policy pins, and which are loaded.

Owns: the ``ModelRegistry`` of the policy in force (replaced when a policy is imported), the process-wide
``LocalEngine``, loading on first use, at start (``preload``) or on command, and retiring instances the
policy no longer pins. An engine instance is keyed by model *and* pin (``local/x@<sha256 prefix>``): a new
pin loads a new instance beside the old one, and the old one is unloaded only once it is idle, so requests
in flight finish on the model they started with.
A model is loaded only after its file's SHA-256 matches the policy, and only if the file is still the one
that was hashed once it has been read into memory (weights are not memory-mapped: a file changed later
cannot reach a loaded model).
Never: loads a file the policy does not pin, or whose hash differs; touches a ``Llama`` object (the
engine's worker threads own them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from appliance.config import LocalSettings
from appliance.errors import NotFound
from local_models.cpu_backend import loaded_cpu_backend
from local_models.engine import LocalEngine
from local_models.registry import LocalModelSpecLike, ModelRegistry

log = logging.getLogger("phi.local")

_RETIRE_POLL_S = 0.5


def instance_key(model: str, sha256: str) -> str:
    return f"{model}@{sha256[:16]}"


class LocalRuntime:
    def __init__(self, models_dir: Path, settings: LocalSettings) -> None:
        self.settings = settings
        self._models_dir = models_dir
        self.registry = ModelRegistry(models_dir, {})
        budget = settings.memory_budget_mb
        self.engine = LocalEngine(
            queue_size=settings.queue_size,
            idle_unload_s=settings.idle_unload_s,
            memory_budget_bytes=budget * 1024 * 1024 if budget else None,
            n_threads=settings.n_threads,
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: dict[str, asyncio.Task[None]] = {}

    def use_policy(self, specs: dict[str, LocalModelSpecLike]) -> None:
        """A new policy: its pins apply from now on; instances it no longer pins retire once idle."""
        self.registry = ModelRegistry(self._models_dir, specs)
        wanted = {instance_key(model, spec.sha256) for model, spec in specs.items()}
        for key in self.engine.status():
            if key not in wanted:
                self._retire(key)

    async def ensure_loaded(self, model: str) -> str:
        """Load the pinned instance of ``model`` if needed; returns the engine's key for it."""
        entry = self.registry.get(model)
        key = instance_key(entry.model, entry.sha256)
        if self.engine.is_loaded(key):
            return key
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if self.engine.is_loaded(key):
                return key
            started = time.monotonic()
            verified = await asyncio.to_thread(self.registry.verify, entry.model)
            # The engine refuses the file if it is no longer the one hashed, or changes while it is read.
            await self.engine.load(
                key, verified.path, verified.n_ctx, identity=verified.identity, slots=verified.slots
            )
            log.info("loaded %s (%s) in %.2f s", entry.model, verified.path.name, time.monotonic() - started)
        return key

    async def unload(self, model: str) -> None:
        """Unload every instance of ``model`` (it loads again on its next request)."""
        entry = self.registry.get(model)
        keys = [key for key in self.engine.status() if key.split("@", 1)[0] == entry.model]
        if not keys:
            raise NotFound(f"{entry.model} is not loaded", code="model_not_loaded")
        for key in keys:
            await self.engine.unload(key)

    async def preload(self) -> None:
        for model in self.settings.preload:
            try:
                await self.ensure_loaded(model)
            except Exception as exc:  # a bad pin must not stop the gateway: requests for it get the error
                log.error("preloading %s failed: %s", model, exc)

    def status(self) -> dict[str, Any]:
        """Each pinned model's current instance (or "not loaded"), and instances still retiring."""
        engine = self.engine.status()
        out: dict[str, Any] = {}
        for model in self.registry.names():
            entry = self.registry.get(model)
            out[model] = engine.get(instance_key(entry.model, entry.sha256), {"state": "not loaded"})
        for key in self._retiring:
            if key in engine:
                out[key] = {**engine[key], "state": "retiring"}
        return out

    @staticmethod
    def cpu_backend() -> dict[str, object] | None:
        """The llama.cpp CPU variant in use (None until the first model loads)."""
        backend = loaded_cpu_backend()
        return backend.describe() if backend is not None else None

    async def close(self) -> None:
        for task in self._retiring.values():
            task.cancel()
        await self.engine.close()

    def _retire(self, key: str) -> None:
        if key not in self._retiring:
            self._retiring[key] = asyncio.get_running_loop().create_task(self._retire_when_idle(key))

    async def _retire_when_idle(self, key: str) -> None:
        try:
            while (row := self.engine.status().get(key)) is not None:
                if not row.get("active") and not row.get("queue_depth"):
                    await self.engine.unload(key)
                    log.info("retired %s: the policy no longer pins it", key)
                    break
                await asyncio.sleep(_RETIRE_POLL_S)
        finally:
            self._retiring.pop(key, None)
