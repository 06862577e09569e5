"""A model instance's worker thread and its bounded priority queue.

Owns: one thread per loaded model instance, which creates the instance, runs queued jobs and frees the
instance when it stops. A generation instance admits queued requests into its free sequence slots (lower
``priority`` first, first come first served within a priority) and drives ``batching.BatchRunner``: every
running request advances in each decode step. An embedding instance runs its jobs one at a time. Also:
the queue bound (``RateLimited`` with an estimated ``retry_after`` when full); dropping queued jobs that
are cancelled, expire or are unloaded before they start (one that expires in the queue fails with
``UpstreamTimeout``: it never got an answer); refusing to load a file that is not the one its caller
vouched for (``expect_identity``) or that changed during the load; and the worker's state for ``/health``.

Must never: let any other thread touch the model (it is created, used and closed on this thread only),
block the event loop (loop-side methods take the queue lock for a few list operations), or start a job
whose request was cancelled while it waited.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance import errors
from local_models.batching import BatchRunner
from local_models.embedding import EmbeddingModel
from local_models.generation import Generation
from local_models.inference import LoadedModel
from local_models.registry import file_identity

log = logging.getLogger("phi.local")

WorkerState = Literal["loading", "ready", "failed", "stopped"]


@dataclass(eq=False)
class EmbeddingJob:
    """One embeddings request; its result is set on the loop through ``future``."""

    inputs: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[list[list[float]], int]]
    priority: int = 0
    deadline: float | None = None
    """``time.monotonic()`` by which it must have started; past it, still queued, it fails."""
    cancelled: bool = field(default=False)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


Job = Generation | EmbeddingJob


def _job_priority(job: Job) -> int:
    return job.request.priority if isinstance(job, Generation) else job.priority


def queued_timeout(model: str) -> errors.UpstreamTimeout:
    """The error of a request whose deadline passed before the model got to it."""
    return errors.UpstreamTimeout(
        f"the request waited in the queue for local model {model} until its deadline passed; "
        "the model is busy, try again later",
        code="local_timeout",
    )


def _drop(job: Job, error: errors.GatewayError | None) -> None:
    """End a job that never ran (from either thread); no error: it was cancelled."""
    if isinstance(job, Generation):
        job.finish("cancelled" if error is None else None, error)
        return
    failure = error or errors.Unavailable("the embeddings request was cancelled", code="cancelled")
    try:
        job.loop.call_soon_threadsafe(_fail_future, job.future, failure)
    except RuntimeError:  # the loop is closed: nobody waits for the answer any more
        pass


def _fail_future(future: asyncio.Future[tuple[list[list[float]], int]], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class ModelWorker:
    """The thread that owns one ``Llama`` instance, and the queue in front of it."""

    def __init__(
        self,
        *,
        name: str,
        path: Path,
        n_ctx: int,
        embedding: bool,
        queue_size: int,
        n_threads: int | None,
        loop: asyncio.AbstractEventLoop,
        expect_identity: tuple[int, ...] | None = None,
        slots: int = 1,
        size_bytes: int = 0,
    ) -> None:
        """``expect_identity``: the ``file_identity`` the file must still have (the one another instance
        of the model was loaded from); None: whatever the file is when the load starts."""
        self.name = name
        self.path = path
        self.n_ctx = n_ctx
        self.embedding = embedding
        self.size_bytes = size_bytes or path.stat().st_size
        """Estimated memory (weights and cache), for the engine's budget."""
        self.queue_size = queue_size
        self.slots = 1 if embedding else slots
        self.state: WorkerState = "loading"
        self.identity: tuple[int, ...] | None = expect_identity
        """The ``file_identity`` of the file loaded (set once ready)."""
        self.last_used = time.monotonic()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.stopped: asyncio.Future[None] = loop.create_future()
        self._n_threads = n_threads
        self._loop = loop
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._running: list[Job] = []
        self._cached_tokens = 0  # prompt tokens taken from the cache (the runner's count)
        self._generated_tokens = 0  # and tokens sampled, and prompt tokens decoded (the metrics)
        self._prompt_tokens = 0
        self._poked = False
        self._closing = False
        self._seconds_per_job: float | None = None  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._main, name=f"llama {name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- loop side ----

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise errors.Unavailable(f"local model {self.name} is not loaded", code="model_not_loaded")
            if len(self._heap) >= self.queue_size:
                raise errors.RateLimited(
                    f"the queue of local model {self.name} is full",
                    retry_after=self._retry_after_locked(),
                    code="local_queue_full",
                )
            heapq.heappush(self._heap, (_job_priority(job), next(self._order), job))
            self.last_used = time.monotonic()
            self._cond.notify()
        if isinstance(job, Generation):
            job.on_room(self.poke)

    def poke(self) -> None:
        """Something a waiting worker may act on: a consumer caught up, or a request was cancelled."""
        with self._cond:
            self._poked = True  # seen even if it comes before the worker waits
            self._cond.notify()

    def withdraw(self, job: Job, error: errors.GatewayError | None = None) -> bool:
        """Drop a job that has not started yet, ending it with ``error`` (none: cancelled); False if it is
        running or done (it stops by itself)."""
        with self._cond:
            for i, entry in enumerate(self._heap):
                if entry[2] is job:
                    self._heap[i] = self._heap[-1]
                    self._heap.pop()
                    heapq.heapify(self._heap)
                    break
            else:
                self._poked = True
                self._cond.notify()  # running: the worker frees its slot at its next step
                return False
        _drop(job, error)
        return True

    def expire(self, job: Job) -> bool:
        """The job's deadline passed: if it is still queued, it fails with ``queued_timeout``."""
        return self.withdraw(job, queued_timeout(self.name))

    def stop(self, error: errors.GatewayError) -> None:
        """Stop after the running job, which is told to stop now; queued jobs end with ``error``."""
        with self._cond:
            self._closing = True
            dropped = [entry[2] for entry in self._heap]
            self._heap.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in dropped:
            _drop(job, error)
        for job in running:
            if isinstance(job, Generation):
                job.abort(error)

    def depth(self) -> int:
        with self._cond:
            return len(self._heap)

    def busy(self) -> bool:
        with self._cond:
            return bool(self._running) or bool(self._heap)

    def snapshot(self) -> dict[str, object]:
        with self._cond:
            idle = 0.0 if self._running else time.monotonic() - self.last_used
            return {
                "state": self.state,
                "queue_depth": len(self._heap),
                "active": len(self._running),
                "slots": self.slots,
                "cached_prompt_tokens": self._cached_tokens,
                "generated_tokens": self._generated_tokens,
                "prompt_tokens": self._prompt_tokens,
                "last_used": round(time.time() - idle, 3),
                "idle_s": round(idle, 3),
            }

    def _retry_after_locked(self) -> float:
        per_job = self._seconds_per_job if self._seconds_per_job is not None else 1.0
        return max(1.0, per_job * (len(self._heap) + 1) / self.slots)

    # ---- worker thread ----

    def _main(self) -> None:
        try:
            model = self._load()
        except BaseException as exc:
            self.state = "failed"
            self._to_loop(self._settle, self.ready, exc)
            self.stop(errors.Unavailable(f"local model {self.name} failed to load", code="model_load_failed"))
            self._to_loop(self._settle, self.stopped, None)
            return
        self.state = "ready"
        self._to_loop(self._settle, self.ready, None)
        try:
            self._serve(model)
        finally:
            model.close()
            self.state = "stopped"
            self._to_loop(self._settle, self.stopped, None)

    def _load(self) -> LoadedModel | EmbeddingModel:
        """Load the file, refusing it if it is not (or stops being, during the load) the expected one.

        The weights are copied into memory: once this returns, the file no longer matters."""
        changed = errors.Unavailable(
            f"local model {self.name}: its file changed after it was checked; refusing to load it",
            code="model_file_changed",
        )
        try:
            before = file_identity(os.stat(self.path))
        except OSError as exc:
            raise errors.Unavailable(
                f"local model {self.name}: its file cannot be read", code="model_load_failed"
            ) from exc
        if self.identity is not None and before != self.identity:
            raise changed
        model: LoadedModel | EmbeddingModel
        if self.embedding:
            model = EmbeddingModel(self.path, self.n_ctx, n_threads=self._n_threads)
        else:
            model = LoadedModel(self.path, self.n_ctx, slots=self.slots, n_threads=self._n_threads)
        try:
            after = file_identity(os.stat(self.path))
        except OSError:
            after = None
        if after != before:
            model.close()
            raise changed
        self.identity = before
        return model

    def _serve(self, model: LoadedModel | EmbeddingModel) -> None:
        if isinstance(model, EmbeddingModel):
            self._serve_embeddings(model)
        else:
            self._serve_generations(model)

    def _serve_generations(self, model: LoadedModel) -> None:
        """Admit queued requests into free slots between decode steps; step while any runs."""
        runner = BatchRunner(model)
        started: dict[Generation, float] = {}
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._heap and not runner.busy():
                        self._cond.wait()
                    if self._closing:
                        return
                    self._poked = False
                    count = min(runner.free_slots(), len(self._heap))
                    admit = [heapq.heappop(self._heap)[2] for _ in range(count)]
                    self._running = [*runner.generations(), *admit]
                self._admit(runner, admit, started)
                del admit  # an idle worker must not keep its last requests (and their prompts) alive
                stepped = self._step(runner, model)
                self._settle_step(runner, started, stepped)
        finally:
            runner.close()
            with self._cond:
                self._running = []

    def _step(self, runner: BatchRunner, model: LoadedModel) -> bool:
        """One decode step. An unexpected failure ends the requests running now, with an error (never a
        truncated answer that looks complete), clears the cache, and the model goes on serving."""
        if not runner.busy():
            return False
        try:
            return runner.step()
        except Exception:
            log.error(
                "local model %s: a decode step failed; its requests end with an error",
                self.name,
                exc_info=True,
            )
            runner.fail_all(errors.GatewayError("local inference failed", code="local_inference_failed"))
            return True

    def _settle_step(self, runner: BatchRunner, started: dict[Generation, float], stepped: bool) -> None:
        running = runner.generations()
        now = time.monotonic()
        with self._cond:
            for ended in [g for g in started if g.done]:
                self._job_took(now - started.pop(ended))
            self._running = list[Job](running)
            self._cached_tokens = runner.cached_tokens
            self._generated_tokens = runner.generated_tokens
            self._prompt_tokens = runner.prompt_tokens
            self.last_used = now
            idle = not stepped and runner.busy() and (not self._heap or runner.free_slots() == 0)
            if idle and not self._closing and not self._poked:
                # Every running request waits for its consumer, and none queued can start: until one
                # catches up, leaves, or a slot frees.
                self._cond.wait(0.05)

    def _admit(self, runner: BatchRunner, jobs: list[Job], started: dict[Generation, float]) -> None:
        for job in jobs:
            assert isinstance(job, Generation)
            if job.expired():  # taken after its deadline, before the timer could drop it
                _drop(job, queued_timeout(self.name))
                continue
            job.started_at = time.monotonic()
            if runner.admit(job):
                started[job] = job.started_at

    def _job_took(self, took: float) -> None:
        previous = self._seconds_per_job
        self._seconds_per_job = took if previous is None else 0.8 * previous + 0.2 * took

    def _serve_embeddings(self, model: EmbeddingModel) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = heapq.heappop(self._heap)[2]
                self._running = [job]
            started = time.monotonic()
            try:
                self._embed(model, job)
            finally:
                del job  # an idle worker must not keep its last request (and its inputs) alive
                ended = time.monotonic()
                with self._cond:
                    self._running = []
                    self.last_used = ended
                    self._job_took(ended - started)

    def _embed(self, model: EmbeddingModel, job: Job) -> None:
        assert isinstance(job, EmbeddingJob)
        if job.expired():  # taken from the queue after its deadline, before the timer could drop it
            _drop(job, queued_timeout(self.name))
            return
        try:
            result = model.embed(job.inputs)
        except errors.GatewayError as exc:
            self._to_loop(self._settle, job.future, exc)
        except Exception as exc:
            failure = errors.GatewayError("local embeddings failed", code="local_inference_failed")
            failure.__cause__ = exc
            self._to_loop(self._settle, job.future, failure)
        else:
            self._to_loop(self._settle_value, job.future, result)

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody waits for the answer any more
            pass

    @staticmethod
    def _settle(future: asyncio.Future[Any], error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    @staticmethod
    def _settle_value(future: asyncio.Future[Any], value: object) -> None:
        if not future.done():
            future.set_result(value)
