"""Continuous batching over one model's sequence slots, with a prompt cache: what llama-server's loop does.

Owns: ``BatchRunner`` — the slots of one ``LoadedModel`` (a sequence id each, with the tokens its KV cells
hold), admitting a request into a slot (the slot, or another slot's cells, that already hold the longest
prefix of its prompt is reused: ``cache_prompt``), and the decode step: one ``llama_decode`` call with the
next token of every running sequence plus prompt chunks of newly admitted ones (chunked prefill: a long
prompt does not stall the running streams), then one sampled token per sequence that produced logits, its
text handed to the request's ``Generation``. A sequence whose consumer has fallen behind is left out of
the batch until it catches up; one cancelled leaves at the next step and its cells are freed at once; one
that ends normally keeps its cells for the next prompt that starts the same way.

The cache is bounded by construction: each slot has its own stream of ``n_ctx`` cells (``slots x n_ctx``
in all); it belongs to one model instance (one pin), never to another, and a prefix is reused only within
one ``cache_scope``.

Must never: be used from any thread but the model's worker; hand a sequence another sequence's cells
beyond the prefix they share; or let one request's error end another's stream.
"""

from __future__ import annotations

import logging
import time

import llama_cpp

from appliance import errors
from local_models.decode import CompletionText
from local_models.generation import FinishReason, Generation
from local_models.inference import BATCH, LoadedModel

log = logging.getLogger("phi.local")

PREFILL_WHILE_DECODING = 256
"""Prompt tokens per step while other sequences are generating: bounds the gap between their tokens."""


class _Slot:
    """One sequence id: the tokens its cache cells hold, and the request it serves (None: idle)."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cached: list[int] = []
        """Token ids whose cells hold this sequence at positions 0..len-1."""
        self.scope = ""
        """The ``cache_scope`` of the request whose tokens those are."""
        self.gen: Generation | None = None
        self.prompt: list[int] = []
        self.sampler: llama_cpp.llama_sampler_p | None = None
        self.text: CompletionText | None = None
        self.limit = 0
        self.produced = 0
        self.pending: int | None = None
        """The token sampled last, to be decoded in the next step."""
        self.admitted = 0
        self.last_used = 0.0

    def prefilling(self) -> bool:
        return len(self.cached) < len(self.prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchRunner:
    """The slots of one model and the decode step; see the module docstring."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._slots = [_Slot(i) for i in range(model.slots)]
        self._batch: llama_cpp.llama_batch | None = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self._order = 0
        self.cached_tokens = 0
        self.generated_tokens = 0  # sampled tokens and prompt tokens decoded, since load (the metrics)
        self.prompt_tokens = 0
        """Prompt tokens taken from the cache instead of evaluated, since the runner started."""
        self.decode_calls = 0

    def fail_all(self, error: errors.GatewayError) -> None:
        """End every running request with ``error`` and empty the cache (after an unexpected failure,
        what the cells hold is not known)."""
        for slot in self._slots:
            if slot.gen is not None:
                self._end(slot, None, error)
            slot.cached = []
        llama_cpp.llama_memory_clear(self.model.memory, True)

    def close(self, error: errors.GatewayError | None = None) -> None:
        """End every running request (cancelled, or ``error``) and free the batch."""
        for slot in self._slots:
            if slot.gen is not None:
                self._end(slot, None if error is not None else "cancelled", error)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # ---- slots ----

    def free_slots(self) -> int:
        return sum(1 for slot in self._slots if slot.gen is None)

    def busy(self) -> bool:
        return any(slot.gen is not None for slot in self._slots)

    def generations(self) -> list[Generation]:
        return [slot.gen for slot in self._slots if slot.gen is not None]

    def admit(self, gen: Generation) -> bool:
        """Start ``gen`` in a free slot; False if it ended at once (an error, or it was stopped)."""
        try:
            return self._admit(gen)
        except errors.GatewayError as exc:
            gen.finish(None, exc)
        except Exception as exc:
            # The traceback names code, never the request's text: the operator can find the cause.
            log.error("local model %s: a request failed to start", self.model.name, exc_info=True)
            failure = errors.GatewayError("local inference failed", code="local_inference_failed")
            failure.__cause__ = exc
            gen.finish(None, failure)
        return False

    def _admit(self, gen: Generation) -> bool:
        model = self.model
        if gen.should_stop():
            gen.finish("cancelled" if gen.cancelled else "timeout")
            return False
        prompt = model.prompt_tokens(gen)
        if prompt is None:
            gen.finish("cancelled" if gen.cancelled else "timeout")
            return False
        gen.prompt_tokens = len(prompt)
        if not prompt or any(not 0 <= token < model.n_vocab for token in prompt):
            # A template that renders nothing, or a vocabulary without the token it asked for (no bos):
            # never decoded, as it would fail the whole batch it joined.
            raise errors.BadRequest(
                "the prompt renders to no tokens this model can read",
                code="empty_prompt",
                param="messages" if gen.request.kind == "chat" else "prompt",
            )
        room = model.n_ctx - len(prompt)
        if room <= 0:
            size = len(prompt) if len(prompt) <= model.n_ctx else f"more than {model.n_ctx}"  # cut short
            raise errors.BadRequest(
                f"the prompt is {size} tokens; this model's context is {model.n_ctx}",
                code="context_length_exceeded",
                param="messages" if gen.request.kind == "chat" else "prompt",
            )
        request = gen.request
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        sampler = model.sampler(request)  # before a slot is touched: a bad grammar changes nothing
        slot = self._place(prompt, request.cache_scope)
        slot.gen, slot.prompt, slot.sampler = gen, prompt, sampler
        slot.text = CompletionText(request.stop)
        slot.limit, slot.produced, slot.pending = limit, 0, None
        self._order += 1
        slot.admitted = self._order
        return True

    def _place(self, prompt: list[int], scope: str) -> _Slot:
        """A free slot for ``prompt``, its cells cut to the longest prefix cached for the same ``scope``
        (one token at least is left to evaluate, for fresh logits)."""
        memory = self.model.memory
        free = [slot for slot in self._slots if slot.gen is None]
        reuse = self.model.reuse_prefix
        most = len(prompt) - 1

        keeps = {
            slot.seq_id: min(_common_prefix(slot.cached, prompt), most)
            if reuse and slot.scope == scope
            else 0
            for slot in self._slots
        }
        chosen = max(free, key=lambda slot: (keeps[slot.seq_id], -slot.last_used))
        keep = keeps[chosen.seq_id]
        donor = None
        for other in self._slots:
            if other is not chosen and keeps[other.seq_id] > keep:
                donor, keep = other, keeps[other.seq_id]
        if donor is not None:  # another slot holds more of it: copy its stream (no compute), keep the prefix
            llama_cpp.llama_memory_seq_rm(memory, chosen.seq_id, -1, -1)
            # Each sequence has its own stream: llama.cpp copies whole streams only (a partial range
            # aborts the process), so the copy is cut back to the shared prefix after.
            llama_cpp.llama_memory_seq_cp(memory, donor.seq_id, chosen.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_rm(memory, chosen.seq_id, keep, -1)
        elif keep == 0 or not llama_cpp.llama_memory_seq_rm(memory, chosen.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(memory, chosen.seq_id, -1, -1)
            keep = 0
        chosen.cached = prompt[:keep]
        chosen.scope = scope
        self.cached_tokens += keep
        return chosen

    # ---- the step ----

    def step(self) -> bool:
        """Drop stopped requests, then one decode call and one token per sequence with logits; False if
        nothing could run (every running request is waiting for its consumer)."""
        for slot in self._slots:
            gen = slot.gen
            if gen is None:
                continue
            if gen.cancelled:
                self._end(slot, "cancelled", drop_cells=True)
            elif gen.expired() and slot.produced == 0:  # no answer was started: an error, not an answer
                self._end(
                    slot,
                    None,
                    errors.UpstreamTimeout(
                        "the request reached its deadline before the local model wrote its first token",
                        code="local_timeout",
                    ),
                )
            elif gen.expired():
                self._end(slot, "timeout")
        outputs, advance = self._fill()
        if not advance:
            return False
        assert self._batch is not None
        rc = llama_cpp.llama_decode(self.model.ctx, self._batch)
        self.decode_calls += 1
        if rc != 0:
            self._failed(rc, advance)
            return True
        for slot, tokens in advance:
            if slot.prefilling():
                self.prompt_tokens += len(tokens)
            slot.cached.extend(tokens)
        for slot, index in outputs:
            self._sample(slot, index)
        return True

    def _fill(self) -> tuple[list[tuple[_Slot, int]], list[tuple[_Slot, list[int]]]]:
        """Put this step's tokens in the batch; returns (slot, batch index) of each logits row, and the
        tokens each slot's cells will hold once the batch is decoded."""
        batch = self._batch
        assert batch is not None, "the runner is closed"
        n = 0
        outputs: list[tuple[_Slot, int]] = []
        advance: list[tuple[_Slot, list[int]]] = []

        def add(slot: _Slot, token: int, pos: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos  # type: ignore[call-overload]  # llama-cpp-python types it wrongly
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            n += 1

        running = [s for s in self._slots if s.gen is not None]
        for slot in running:
            assert slot.gen is not None
            if slot.pending is not None and slot.gen.has_room():
                outputs.append((slot, n))
                add(slot, slot.pending, len(slot.cached), True)
                advance.append((slot, [slot.pending]))
        budget = BATCH - n
        if outputs:
            budget = min(budget, PREFILL_WHILE_DECODING)
        for slot in sorted((s for s in running if s.prefilling()), key=lambda s: s.admitted):
            if budget <= 0:
                break
            start = len(slot.cached)
            chunk = slot.prompt[start : start + budget]
            last = start + len(chunk) == len(slot.prompt)
            for j, token in enumerate(chunk):
                add(slot, token, start + j, last and j == len(chunk) - 1)
            if last:
                outputs.append((slot, n - 1))
            advance.append((slot, chunk))
            budget -= len(chunk)
        batch.n_tokens = n
        return outputs, advance

    def _failed(self, rc: int, advance: list[tuple[_Slot, list[int]]]) -> None:
        """The decode call failed: every request in this batch ends with an error; others go on."""
        failure = errors.Unavailable(
            "the local model could not process the request"
            + (": its context cache is full" if rc == 1 else ""),
            code="local_inference_failed",
        )
        for slot, _ in advance:
            if slot.gen is not None:
                self._end(slot, None, failure, drop_cells=True)

    def _sample(self, slot: _Slot, index: int) -> None:
        gen, model = slot.gen, self.model
        assert gen is not None and slot.sampler is not None and slot.text is not None
        slot.pending = None
        token = llama_cpp.llama_sampler_sample(slot.sampler, model.ctx, index)
        if model.is_eog(token):
            self._end(slot, "stop")
            return
        slot.produced += 1
        self.generated_tokens += 1
        gen.completion_tokens = slot.produced
        piece = slot.text.feed(model.piece(token))
        if piece:
            gen.put(piece)
        if slot.text.stopped:
            self._end(slot, "stop")
        elif slot.produced >= slot.limit:
            self._end(slot, "length")
        else:
            slot.pending = token

    def _end(
        self,
        slot: _Slot,
        reason: FinishReason | None,
        error: errors.GatewayError | None = None,
        *,
        drop_cells: bool = False,
    ) -> None:
        gen = slot.gen
        assert gen is not None
        if reason in ("stop", "length", "timeout") and slot.text is not None:
            tail = slot.text.finish()
            if tail:
                gen.put(tail)
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
        slot.gen, slot.sampler, slot.text, slot.pending, slot.prompt = None, None, None, None, []
        slot.last_used = time.monotonic()
        if drop_cells:
            llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
            slot.cached = []
        gen.finish(reason, error)


def run_alone(model: LoadedModel, gen: Generation) -> None:
    """Run one request to its end on this thread (tests and tools); ``gen.finish`` is always called."""
    runner = BatchRunner(model)
    try:
        if runner.admit(gen):
            while runner.busy():
                runner.step()
    finally:
        runner.close()
