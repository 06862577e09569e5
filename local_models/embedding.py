"""One embedding-mode model instance, on llama.cpp's low-level API.

Owns: ``EmbeddingModel`` — loading the GGUF for embeddings (a context with ``embeddings`` on; each input
is one batch), tokenizing inputs as plain text (never control tokens), and turning each input into a
unit-length vector (the model's pooling, else the mean of its token vectors) with the exact count of
tokens read.

Must never: be used from any thread but the one that created it; map the GGUF file (the file was hashed
before the load, see ``inference``); or go through ``llama_cpp.Llama``, whose quiet mode redirects the
whole process's stdout and stderr to /dev/null while it loads (audit lines written by other threads at
that moment would be lost).
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from appliance import errors
from local_models.cpu_backend import ensure_cpu_backend
from local_models.inference import free_model, load_weights, new_context


class EmbeddingModel:
    def __init__(self, path: Path, n_ctx: int, *, n_threads: int | None) -> None:
        ensure_cpu_backend()
        self.model: llama_cpp.llama_model_p | None = load_weights(path)
        self.ctx = None
        self.n_ctx = n_ctx
        try:
            fields = {
                "n_ctx": n_ctx,
                "n_batch": n_ctx,
                "n_ubatch": n_ctx,
                "embeddings": True,
                "no_perf": True,
            }
            self.ctx = new_context(self.model, path, f"{n_ctx} tokens for embeddings", n_threads, **fields)
            self._memory = llama_cpp.llama_get_memory(self.ctx)
            self._vocab = llama_cpp.llama_model_get_vocab(self.model)
            self._n_embd = llama_cpp.llama_model_n_embd(self.model)
            self._pooled = llama_cpp.llama_pooling_type(self.ctx) != llama_cpp.LLAMA_POOLING_TYPE_NONE
            self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            self._tokens = (llama_cpp.llama_token * (n_ctx + 8))()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        free_model(self.model, self.ctx)
        self.model, self.ctx = None, None

    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """One unit-length vector per input (the model's pooling, else the mean) and the tokens read."""
        vectors = []
        count = 0
        for text in inputs:
            tokens = self._tokenize(text)
            count += len(tokens)
            vectors.append(_unit(self._vector(tokens)))
        return vectors, count

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = self._tokens
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, len(buf), True, False)
        if n < 0 or n > self.n_ctx:  # n < 0: it needs -n tokens, more than the buffer (the context + 8)
            raise errors.BadRequest(
                f"an input is longer than this model's context of {self.n_ctx} tokens",
                code="context_length_exceeded",
                param="input",
            )
        return list(buf[:n])

    def _vector(self, tokens: list[int]) -> np.ndarray:
        llama_cpp.llama_memory_clear(self._memory, True)
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(tokens)
        if not tokens:
            return np.zeros(self._n_embd)
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise errors.GatewayError("local embeddings failed", code="local_inference_failed")
        if self._pooled:
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, 0)
            return np.ctypeslib.as_array(pointer, shape=(self._n_embd,)).astype(np.float64)
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(self.ctx, i), shape=(self._n_embd,))
            for i in range(len(tokens))
        ]
        return np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def _unit(vector: np.ndarray) -> list[float]:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).tolist()


__all__ = ["EmbeddingModel"]
