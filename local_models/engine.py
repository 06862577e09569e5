"""The in-process llama.cpp engine: which local models are loaded, and the way requests reach them.

Owns: ``LocalEngine`` — loading and unloading models (a ``ModelWorker`` thread per model instance: one for
generation with ``slots`` sequences decoded together, and a second, embedding-mode instance started on the
first embeddings request), the memory budget across loaded instances (the file size plus the KV cache of its
slots; the least recently used idle model is unloaded to make room), the idle unload check, per-request
deadlines while queued (a timer per request, cancelled when the request ends so that no finished request is
kept alive by it), and the ``status`` for ``/health``. The embedding instance is loaded only from the very
file the generation instance was loaded from (same ``file_identity``). The gateway codes against
``GenerationRequest``, ``Generation`` and this class only.

Must never: touch a llama.cpp object itself (workers own them), block the event loop (loading, inference
and freeing happen on the workers' threads), unload a model that has a request running or queued to make
room for another, or fork the process (llama.cpp's threads and memory do not survive it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import errors
from local_models.generation import Generation, GenerationRequest
from local_models.registry import default_slots, kv_bytes_per_token
from local_models.worker import EmbeddingJob, ModelWorker

__all__ = ["Generation", "GenerationRequest", "LocalEngine"]


@dataclass(eq=False)
class _Model:
    """One loaded model: its generation worker and, once embeddings were asked for, its embedding worker."""

    name: str
    path: Path
    n_ctx: int
    generator: ModelWorker
    embedder: ModelWorker | None = None

    def workers(self) -> list[ModelWorker]:
        return [w for w in (self.generator, self.embedder) if w is not None]

    def size_bytes(self) -> int:
        return sum(w.size_bytes for w in self.workers())

    def busy(self) -> bool:
        return any(w.busy() for w in self.workers())

    def last_used(self) -> float:
        return max(w.last_used for w in self.workers())

    def ready(self) -> bool:
        return all(w.state == "ready" for w in self.workers())


class LocalEngine:
    """Local models served in this process; see the module docstring for the rules it keeps."""

    def __init__(
        self,
        *,
        queue_size: int = 16,
        idle_unload_s: float = 600.0,
        memory_budget_bytes: int | None = None,
        n_threads: int | None = None,
        slots: int | None = None,
    ) -> None:
        """``idle_unload_s`` of 0, less or ``math.inf`` disables idle unloading; ``memory_budget_bytes``
        None means no budget; ``slots``: for a model loaded without its own (None: ``default_slots``)."""
        self.queue_size = queue_size
        self.idle_unload_s = idle_unload_s
        self.memory_budget_bytes = memory_budget_bytes
        self.n_threads = n_threads
        self.slots = slots
        self._models: dict[str, _Model] = {}
        self._placement = asyncio.Lock()  # budget decisions and registrations happen one at a time
        self._idle_task: asyncio.Task[None] | None = None
        self._closed = False

    # ---- loading ----

    async def load(
        self,
        model: str,
        path: Path,
        n_ctx: int,
        *,
        identity: tuple[int, ...] | None = None,
        slots: int | None = None,
    ) -> None:
        """Load ``model`` from ``path`` on a new worker thread; a loaded (or loading) model is left alone.

        ``slots``: requests decoded together, each with up to ``n_ctx`` tokens (None: ``default_slots``).

        ``identity``: the ``registry.file_identity`` the file had when it was verified; the load is refused
        (``model_file_changed``) if the file is not that file any more, before or during the load."""
        loop = asyncio.get_running_loop()
        async with self._placement:
            if self._closed:
                raise errors.Unavailable("the local engine is shut down", code="model_not_loaded")
            entry = self._models.get(model)
            if entry is None:
                slots = slots or self.slots or default_slots(n_ctx)
                size = await self._footprint(model, path, n_ctx * slots)
                await self._make_room(size, keep=model)
                worker = self._worker(
                    model,
                    path,
                    n_ctx,
                    embedding=False,
                    loop=loop,
                    expect_identity=identity or None,
                    slots=slots,
                    size_bytes=size,
                )
                entry = self._models[model] = _Model(model, path, n_ctx, worker)
                worker.start()
                self._watch_idle()
        await self._await_ready(model, entry, entry.generator)

    async def unload(self, model: str) -> None:
        """Free the model's instances; a running request ends with ``Unavailable``, queued ones too."""
        entry = self._models.pop(model, None)
        if entry is not None:
            await self._stop(entry)

    async def close(self) -> None:
        self._closed = True
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None
        entries = list(self._models.values())
        self._models.clear()
        await asyncio.gather(*(self._stop(entry) for entry in entries))

    # ---- requests ----

    async def generate(self, model: str, request: GenerationRequest) -> Generation:
        """Queue a request; iterate the returned handle for its text. Raises ``RateLimited`` when the
        model's queue is full and ``Unavailable`` when the model is not loaded."""
        worker = self._entry(model).generator
        loop = asyncio.get_running_loop()
        gen = Generation(request, loop)
        worker.submit(gen)
        gen.on_cancel(worker.withdraw)
        if request.deadline is not None:
            # A request still queued at its deadline fails then, not when the worker reaches it. The timer
            # holds the request (and its prompt): it goes as soon as the request ends.
            delay = max(0.0, request.deadline - time.monotonic())
            timer = loop.call_later(delay, worker.expire, gen)
            gen.when_done(timer.cancel)
        return gen

    async def embed(
        self, model: str, inputs: list[str], *, priority: int = 0, deadline: float | None = None
    ) -> tuple[list[list[float]], int]:
        """Embed each input with the model's embedding-mode instance (started on first use).

        ``priority`` orders the embedding queue like ``GenerationRequest.priority``; past ``deadline``
        (``time.monotonic()``) the call raises ``UpstreamTimeout`` (code ``local_timeout``), whether the
        request is still queued (it is dropped) or running (its result is discarded)."""
        entry = self._entry(model)
        loop = asyncio.get_running_loop()
        worker = entry.embedder
        if worker is None:
            async with self._placement:
                entry = self._entry(model)
                worker = entry.embedder
                if worker is None:
                    size = await self._footprint(model, entry.path, entry.n_ctx)
                    await self._make_room(size, keep=model)
                    worker = entry.embedder = self._worker(
                        model,
                        entry.path,
                        entry.n_ctx,
                        embedding=True,
                        loop=loop,
                        size_bytes=size,
                        expect_identity=entry.generator.identity,
                    )
                    worker.start()
        await self._await_ready(model, entry, worker)
        job = EmbeddingJob(inputs, loop, loop.create_future(), priority=priority, deadline=deadline)
        worker.submit(job)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            job.cancelled = True
            if worker.expire(job):
                return await job.future  # already failed with the queued timeout
            raise errors.UpstreamTimeout(
                f"embeddings with local model {model} ran past the request deadline", code="local_timeout"
            ) from None
        except asyncio.CancelledError:
            job.cancelled = True
            worker.withdraw(job)
            raise

    def is_loaded(self, model: str) -> bool:
        """True while the model is loading or ready (requests for it are accepted)."""
        entry = self._models.get(model)
        return entry is not None and entry.generator.state in ("loading", "ready")

    def status(self) -> dict[str, Any]:
        """Per model: ``state`` (loading | ready | failed), queue depth, requests running (``active``) and
        ``slots``, idle seconds, estimated memory, and the same for the embedding instance once it exists."""
        out: dict[str, Any] = {}
        for name, entry in self._models.items():
            row: dict[str, Any] = dict(entry.generator.snapshot())
            row["n_ctx"] = entry.n_ctx
            row["memory_bytes"] = entry.size_bytes()
            row["embedding"] = entry.embedder.snapshot() if entry.embedder is not None else None
            out[name] = row
        return out

    # ---- internals ----

    def _entry(self, model: str) -> _Model:
        entry = self._models.get(model)
        if entry is None or entry.generator.state in ("failed", "stopped"):
            raise errors.Unavailable(f"local model {model} is not loaded", code="model_not_loaded")
        return entry

    def _worker(
        self,
        model: str,
        path: Path,
        n_ctx: int,
        *,
        embedding: bool,
        loop: asyncio.AbstractEventLoop,
        expect_identity: tuple[int, ...] | None = None,
        slots: int = 1,
        size_bytes: int = 0,
    ) -> ModelWorker:
        return ModelWorker(
            name=model,
            path=path,
            n_ctx=n_ctx,
            embedding=embedding,
            queue_size=self.queue_size,
            n_threads=self.n_threads,
            loop=loop,
            expect_identity=expect_identity,
            slots=slots,
            size_bytes=size_bytes,
        )

    @staticmethod
    async def _footprint(model: str, path: Path, cache_tokens: int) -> int:
        """Estimated memory of an instance: the weights (the file) and its KV cache of ``cache_tokens``."""

        def measure() -> int:
            try:
                weights = path.stat().st_size
            except OSError as exc:
                raise errors.Unavailable(
                    f"local model {model}: its file cannot be read", code="model_load_failed"
                ) from exc
            return weights + cache_tokens * kv_bytes_per_token(path)

        return await asyncio.to_thread(measure)

    async def _await_ready(self, model: str, entry: _Model, worker: ModelWorker) -> None:
        try:
            await asyncio.shield(worker.ready)
        except errors.GatewayError:
            self._forget(model, entry, worker)
            raise
        except Exception as exc:
            self._forget(model, entry, worker)
            raise errors.Unavailable(f"local model {model} failed to load", code="model_load_failed") from exc

    def _forget(self, model: str, entry: _Model, worker: ModelWorker) -> None:
        if worker is entry.embedder:
            entry.embedder = None
        elif self._models.get(model) is entry:
            del self._models[model]

    async def _make_room(self, size: int, *, keep: str) -> None:
        """Unload least recently used idle models until ``size`` more bytes fit the budget, or refuse."""
        budget = self.memory_budget_bytes
        if budget is None:
            return
        used = sum(entry.size_bytes() for entry in self._models.values())
        if used + size <= budget:
            return
        evict: list[_Model] = []
        idle = sorted(
            (e for name, e in self._models.items() if name != keep and e.ready() and not e.busy()),
            key=_Model.last_used,
        )
        for entry in idle:
            evict.append(entry)
            used -= entry.size_bytes()
            if used + size <= budget:
                break
        if used + size > budget:
            raise errors.Unavailable(
                f"loading {keep} needs {size} bytes; the local model memory budget of {budget} bytes "
                "is taken by models in use",
                code="memory_budget",
            )
        for entry in evict:
            del self._models[entry.name]
        await asyncio.gather(*(self._stop(entry) for entry in evict))

    async def _stop(self, entry: _Model) -> None:
        unloaded = errors.Unavailable(f"local model {entry.name} was unloaded", code="model_unloaded")
        workers = entry.workers()
        for worker in workers:
            worker.stop(unloaded)
        await asyncio.gather(*(asyncio.shield(worker.stopped) for worker in workers))

    def _watch_idle(self) -> None:
        if self._idle_task is None and 0 < self.idle_unload_s < math.inf:
            self._idle_task = asyncio.get_running_loop().create_task(
                self._unload_idle(), name="local model idle unload"
            )

    async def _unload_idle(self) -> None:
        period = min(max(self.idle_unload_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for name, entry in list(self._models.items()):
                if entry.ready() and not entry.busy() and now - entry.last_used() >= self.idle_unload_s:
                    async with self._placement:
                        if self._models.get(name) is entry and not entry.busy():
                            del self._models[name]
                        else:
                            continue
                    await self._stop(entry)
