"""A model instance's worker thread and its bounded priority queue.

Owns: one thread per loaded ``Llama`` instance, which creates the instance, runs queued jobs one at a time
(lower ``priority`` first, first come first served within a priority), and frees the instance when it
stops; the queue bound (``RateLimited`` with an estimated ``retry_after`` when full); dropping queued jobs
that are cancelled, expire or are unloaded before they start (one that expires in the queue fails with
``UpstreamTimeout``: it never got an answer); refusing to load a file that is not the one its caller
vouched for (``expect_identity``) or that changed during the load; and the worker's load state for
``/health``.

Must never: let any other thread touch the ``Llama`` (it is created, used and closed on this thread only),
block the event loop (loop-side methods take the queue lock for a few list operations), or run a job
whose request was cancelled while it waited.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance import errors
from local_models.generation import Generation
from local_models.inference import LoadedModel
from local_models.registry import file_identity

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
    ) -> None:
        """``expect_identity``: the ``file_identity`` the file must still have (the one another instance
        of the model was loaded from); None: whatever the file is when the load starts."""
        self.name = name
        self.path = path
        self.n_ctx = n_ctx
        self.embedding = embedding
        self.size_bytes = path.stat().st_size
        self.queue_size = queue_size
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
        self._active: Job | None = None
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
            active = self._active
            self._cond.notify_all()
        for job in dropped:
            _drop(job, error)
        if isinstance(active, Generation):
            active.abort(error)

    def depth(self) -> int:
        with self._cond:
            return len(self._heap)

    def busy(self) -> bool:
        with self._cond:
            return self._active is not None or bool(self._heap)

    def snapshot(self) -> dict[str, object]:
        with self._cond:
            idle = 0.0 if self._active is not None else time.monotonic() - self.last_used
            return {
                "state": self.state,
                "queue_depth": len(self._heap),
                "active": self._active is not None,
                "last_used": round(time.time() - idle, 3),
                "idle_s": round(idle, 3),
            }

    def _retry_after_locked(self) -> float:
        per_job = self._seconds_per_job if self._seconds_per_job is not None else 1.0
        return max(1.0, per_job * (len(self._heap) + 1))

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

    def _load(self) -> LoadedModel:
        """Load the file, refusing it if it is not (or stops being, during the load) the expected one.

        ``LoadedModel`` copies the weights into memory: once this returns, the file no longer matters."""
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
        model = LoadedModel(self.path, self.n_ctx, embedding=self.embedding, n_threads=self._n_threads)
        try:
            after = file_identity(os.stat(self.path))
        except OSError:
            after = None
        if after != before:
            model.close()
            raise changed
        self.identity = before
        return model

    def _serve(self, model: LoadedModel) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = heapq.heappop(self._heap)[2]
                self._active = job
            started = time.monotonic()
            try:
                self._run(model, job)
            finally:
                del job  # an idle worker must not keep its last request (and its prompt) alive
                ended = time.monotonic()
                with self._cond:
                    self._active = None
                    self.last_used = ended
                    took = ended - started
                    previous = self._seconds_per_job
                    self._seconds_per_job = took if previous is None else 0.8 * previous + 0.2 * took

    def _run(self, model: LoadedModel, job: Job) -> None:
        if job.expired():  # taken from the queue after its deadline, before the timer could drop it
            _drop(job, queued_timeout(self.name))
            return
        if isinstance(job, Generation):
            job.started_at = time.monotonic()
            model.generate(job)
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
