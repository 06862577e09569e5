"""What a worker thread does with its one ``Llama`` instance: prompts, sampling, the token loop, embeddings.

Owns: ``LoadedModel`` — loading the GGUF into a ``Llama``, rendering chat prompts with the model's own
template (``tokenizer.chat_template`` from the GGUF metadata), tokenizing (through ``prompt``: caller
text never becomes a control token), building the sampler chain
(logit bias, grammar, top-k/top-p/min-p, temperature, seed), generating token ids one at a time, turning
each token into bytes and the bytes into text (``decode.CompletionText``), counting usage exactly, and the
llama.cpp abort callback that stops prompt processing when a request is cancelled or out of time.

Must never: be used from any thread but the one that created it (a ``Llama`` is not thread-safe); use
llama-cpp-python's high-level streaming (it holds back all text after an invalid UTF-8 token); fork; or
leave the abort callback installed while tokens are generated (it runs on every graph node, and between
tokens the loop checks for itself); or map the GGUF file (``use_mmap``): the file was hashed before the
load, and a mapped file overwritten in place would change the running weights, truncated would SIGBUS
the process. The weights are copied into memory once, at load.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance import errors
from local_models.decode import CompletionText
from local_models.generation import FinishReason, Generation, GenerationRequest
from local_models.prompt import PromptTokenizer, chat_segments, chat_turns, check_fits, plain_text

PROMPT_BATCH = 512
"""Tokens per llama_decode call while the prompt is processed."""

# llama-cpp-python's create_completion defaults; OpenAI requests only set temperature and top_p.
TOP_K = 40
MIN_P = 0.05


class LoadedModel:
    """One ``Llama`` instance and what is derived from it; every method runs on its worker thread."""

    def __init__(self, path: Path, n_ctx: int, *, embedding: bool, n_threads: int | None) -> None:
        batch = n_ctx if embedding else min(n_ctx, PROMPT_BATCH)  # an embedding input is one batch
        try:
            self.llama = Llama(
                str(path),
                n_ctx=n_ctx,
                n_batch=batch,
                n_ubatch=batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                embedding=embedding,
                use_mmap=False,  # see the module docstring: the file may change after the check
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise errors.Unavailable(
                f"local model file {path.name} could not be loaded", code="model_load_failed"
            ) from exc
        # llama.cpp may round the context up; the policy's n_ctx is the limit requests are held to.
        self.n_ctx = min(n_ctx, self.llama.n_ctx())
        self._vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self._n_vocab = self.llama.n_vocab()
        self._reuse_prefix = not (
            llama_cpp.llama_model_is_recurrent(self.llama.model)
            or llama_cpp.llama_model_is_hybrid(self.llama.model)
        )
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(64)
        self._chat = None if embedding else self._chat_formatter()
        # Reads the whole vocabulary once (control tokens, longest piece): generation instances only.
        self._tokenizer = None if embedding else PromptTokenizer(self._vocab, self._n_vocab)
        # The callback object must stay referenced as long as llama.cpp may call it.
        self._abort_target: Generation | None = None
        self._abort_callback = llama_cpp.ggml_abort_callback(self._should_abort)
        self._no_abort_callback = llama_cpp.ggml_abort_callback()

    def close(self) -> None:
        self.llama.close()

    # ---- generation ----

    def generate(self, gen: Generation) -> None:
        """Run one request to its end; ``gen.finish`` is always called (with an error if one occurs)."""
        try:
            reason = self._generate(gen)
        except errors.GatewayError as exc:
            gen.finish(None, exc)
        except Exception as exc:
            failure = errors.GatewayError("local inference failed", code="local_inference_failed")
            failure.__cause__ = exc
            gen.finish(None, failure)
        else:
            gen.finish(reason)

    def _generate(self, gen: Generation) -> FinishReason:
        request = gen.request
        if gen.should_stop():
            return "cancelled" if gen.cancelled else "timeout"
        tokens = self._prompt_tokens(gen)
        if tokens is None:
            return "cancelled" if gen.cancelled else "timeout"
        gen.prompt_tokens = len(tokens)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            size = len(tokens) if len(tokens) <= self.n_ctx else f"more than {self.n_ctx}"  # cut short
            raise errors.BadRequest(
                f"the prompt is {size} tokens; this model's context is {self.n_ctx}",
                code="context_length_exceeded",
                param="messages" if request.kind == "chat" else "prompt",
            )
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        sampler = self._sampler(request)
        try:
            return self._token_loop(gen, tokens, sampler, limit)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _token_loop(
        self, gen: Generation, tokens: list[int], sampler: llama_cpp.llama_sampler_p, limit: int
    ) -> FinishReason:
        if not self._eval_prompt(gen, tokens):
            return "cancelled" if gen.cancelled else "timeout"
        llama, ctx, vocab = self.llama, self.llama.ctx, self._vocab
        text = CompletionText(gen.request.stop)
        reason: FinishReason = "length"
        produced = 0
        while produced < limit:
            if gen.cancelled:
                return "cancelled"
            if gen.expired():
                reason = "timeout"
                break
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"
                break
            produced += 1
            gen.completion_tokens = produced
            piece = text.feed(self._piece(token))
            if piece:
                gen.put(piece)
            if text.stopped:
                reason = "stop"
                break
            if produced < limit:
                llama.eval([token])
        if gen.cancelled:
            return "cancelled"
        tail = text.finish()
        if tail:
            gen.put(tail)
        return reason

    def _eval_prompt(self, gen: Generation, tokens: list[int]) -> bool:
        """Process the prompt (reusing the cached prefix of the previous one); False if aborted."""
        llama = self.llama
        keep = 0
        if self._reuse_prefix:
            cached = llama.input_ids[: llama.n_tokens]
            limit = min(len(cached), len(tokens) - 1)  # at least one token is decoded, for fresh logits
            while keep < limit and cached[keep] == tokens[keep]:
                keep += 1
        if keep == 0:
            llama.reset()
        else:
            llama.n_tokens = keep  # eval() drops the cache past n_tokens before decoding
        self._abort_target = gen
        llama_cpp.llama_set_abort_callback(llama.ctx, self._abort_callback, None)
        try:
            llama.eval(tokens[keep:])
        except RuntimeError:
            if gen.should_stop():
                return False
            raise
        finally:
            llama_cpp.llama_set_abort_callback(llama.ctx, self._no_abort_callback, None)
            self._abort_target = None
        return not gen.should_stop()

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        target = self._abort_target
        return target is not None and target.should_stop()

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    # ---- prompts and sampling ----

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None

        def text_of(token: int) -> str:
            if token < 0:
                return ""
            return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

        eos = self.llama.token_eos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=text_of(eos),
            bos_token=text_of(self.llama.token_bos()),
            stop_token_ids=[eos],
        )

    def _prompt_tokens(self, gen: Generation) -> list[int] | None:
        """The prompt's token ids (see ``prompt``: caller text never becomes a control token); None if the
        request was cancelled or ran out of time while it was tokenized. A prompt that cannot fit the
        context is refused before it is rendered."""
        request = gen.request
        if request.kind == "chat":
            if self._chat is None or self._tokenizer is None:
                raise errors.BadRequest(
                    "this local model has no chat template; use completions", code="no_chat_template"
                )
            turns = chat_turns(request.messages)
            chars = sum(len(text) for _, text in turns)
            check_fits(len(turns), chars, self.n_ctx, self._tokenizer.longest_piece, "messages")
            segments = chat_segments(self._render, turns)
            if gen.should_stop():
                return None
            # The template writes bos itself: nothing is added around the segments.
            return self._tokenizer.segments(segments, limit=self.n_ctx, stop=gen.should_stop)
        prompt = plain_text(request.prompt or "", "prompt")
        if not prompt:
            return [self.llama.token_bos()]
        assert self._tokenizer is not None  # only embedding instances have none, and they never generate
        check_fits(1, len(prompt), self.n_ctx, self._tokenizer.longest_piece, "prompt")
        return self._tokenizer.plain(prompt, add_special=True)

    def _render(self, messages: list[dict[str, str]]) -> str:
        assert self._chat is not None
        try:
            return self._chat(messages=messages).prompt  # type: ignore[arg-type]
        except Exception as exc:  # the template is the model's code: any error is a refused request
            raise errors.BadRequest(
                "the messages cannot be rendered with this model's chat template",
                code="chat_template_error",
            ) from exc

    def _sampler(self, request: GenerationRequest) -> llama_cpp.llama_sampler_p:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            if request.logit_bias:
                self._add_logit_bias(chain, request.logit_bias)
            if request.grammar is not None:
                grammar = LlamaGrammar.from_string(request.grammar, verbose=False)
                stage = llama_cpp.llama_sampler_init_grammar(
                    self._vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
                )
                if not stage:
                    raise errors.BadRequest(
                        "the response format's grammar is invalid", code="invalid_grammar"
                    )
                llama_cpp.llama_sampler_chain_add(chain, stage)
            if request.temperature <= 0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            else:
                seed = llama_cpp.LLAMA_DEFAULT_SEED if request.seed is None else request.seed & 0xFFFFFFFF
                for stage in (
                    llama_cpp.llama_sampler_init_top_k(TOP_K),
                    llama_cpp.llama_sampler_init_top_p(request.top_p, 1),
                    llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
                    llama_cpp.llama_sampler_init_temp(request.temperature),
                    llama_cpp.llama_sampler_init_dist(seed),
                ):
                    llama_cpp.llama_sampler_chain_add(chain, stage)
        except BaseException:
            llama_cpp.llama_sampler_free(chain)
            raise
        return chain

    def _add_logit_bias(self, chain: llama_cpp.llama_sampler_p, bias: dict[int, float]) -> None:
        if any(not 0 <= token < self._n_vocab for token in bias):
            raise errors.BadRequest(
                "logit_bias names a token this model does not have",
                code="invalid_logit_bias",
                param="logit_bias",
            )
        entries = (llama_cpp.llama_logit_bias * len(bias))()
        for entry, (token, value) in zip(entries, bias.items(), strict=True):
            entry.token = token
            entry.bias = value
        stage = llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(bias), entries)
        llama_cpp.llama_sampler_chain_add(chain, stage)

    # ---- embeddings ----

    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """One unit-length vector per input (the model's pooling, else the mean) and the tokens read."""
        try:
            output, count = self.llama.embed(inputs, normalize=False, truncate=False, return_count=True)
        except ValueError as exc:
            raise errors.BadRequest(
                f"an input is longer than this model's context of {self.n_ctx} tokens",
                code="context_length_exceeded",
                param="input",
            ) from exc
        if (
            self.llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE
        ):  # one vector per token: average them
            output = [np.asarray(per_token, dtype=np.float64).mean(axis=0) for per_token in output]
        vectors = []
        for vector in output:
            array = np.asarray(vector, dtype=np.float64)
            norm = float(np.linalg.norm(array))
            vectors.append((array / norm if norm > 0 else array).tolist())
        return vectors, count
