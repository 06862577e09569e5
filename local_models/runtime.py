"""Local models inside a running gateway: which files the policy pins, and which are loaded.

Owns: the ``ModelRegistry`` of the policy in force (replaced when a policy is imported), the process-wide
``LocalEngine``, loading on first use or at start (``preload``), and the per-model lock that makes two
first requests share one load. A model is loaded only after its file's SHA-256 matches the policy.
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
from local_models.engine import LocalEngine
from local_models.registry import LocalModelSpecLike, ModelRegistry

log = logging.getLogger("phi.local")


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
        self._loaded: dict[str, str] = {}  # model -> sha256 it was loaded with
        self._locks: dict[str, asyncio.Lock] = {}

    def use_policy(self, specs: dict[str, LocalModelSpecLike]) -> None:
        """A new policy: its pins apply from now on (a model loaded under an old pin is reloaded on use)."""
        self.registry = ModelRegistry(self._models_dir, specs)

    async def ensure_loaded(self, model: str) -> str:
        """Load ``local/<name>`` if needed (verifying its pin first); returns the engine's model key."""
        entry = self.registry.get(model)
        key = entry.model
        if self._loaded.get(key) == entry.sha256 and self.engine.is_loaded(key):
            return key
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if self._loaded.get(key) == entry.sha256 and self.engine.is_loaded(key):
                return key
            started = time.monotonic()
            verified = await asyncio.to_thread(self.registry.verify, key)
            if key in self._loaded:  # loaded under another pin: replace it
                await self.engine.unload(key)
            await self.engine.load(key, verified.path, verified.n_ctx)
            self._loaded[key] = verified.sha256
            log.info("loaded %s (%s) in %.2f s", key, verified.path.name, time.monotonic() - started)
        return key

    async def unload(self, model: str) -> None:
        entry = self.registry.get(model)
        key = entry.model
        if key not in self._loaded and not self.engine.is_loaded(key):
            raise NotFound(f"{key} is not loaded", code="model_not_loaded")
        await self.engine.unload(key)
        self._loaded.pop(key, None)

    async def preload(self) -> None:
        for model in self.settings.preload:
            try:
                await self.ensure_loaded(model)
            except Exception as exc:  # a bad pin must not stop the gateway: requests for it get the error
                log.error("preloading %s failed: %s", model, exc)

    def status(self) -> dict[str, Any]:
        engine = self.engine.status()
        return {model: engine.get(model, {"state": "not loaded"}) for model in self.registry.names()}

    async def close(self) -> None:
        await self.engine.close()
