"""One generation model in llama.cpp: the weights, one context with N sequence slots, prompts and samplers.

Owns: ``LoadedModel`` — loading the GGUF (through the low-level API: ``Llama`` cannot make a context with
several sequences), one context whose KV cache holds ``slots`` sequences of up to ``n_ctx`` tokens each (a
stream of cells per sequence), the model's chat template (``tokenizer.chat_template`` in the GGUF), prompts as
token ids (through ``prompt``: caller text never becomes a control token), a sampler chain per request (logit
bias, penalties, grammar or lazy grammar, top-k/top-p/min-p, temperature, seed) and token pieces. The decode
step that drives it for many requests at once is ``batching.BatchRunner``'s.

Must never: be used from any thread but the one that created it (llama.cpp contexts are not thread-safe);
fork; or map the GGUF file (``use_mmap``): the file was hashed before the load, and a mapped file
overwritten in place would change the running weights, truncated would SIGBUS the process. The weights
are copied into memory once, at load.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance import errors
from local_models.cpu_backend import ensure_cpu_backend
from local_models.generation import Generation, GenerationRequest
from local_models.prompt import PromptTokenizer, chat_prompt, check_fits, plain_text
from local_models.tools import template_supports_tools

BATCH = 512
"""Tokens per decode call: prompt chunks of newly admitted sequences plus one token per running one."""

# llama-cpp-python's create_completion defaults; OpenAI requests only set temperature and top_p.
TOP_K = 40
MIN_P = 0.05
PENALTY_LAST_N = 64
"""Generated tokens that presence and frequency penalties look back over."""
MAX_SLOTS = 64


class LoadedModel:
    """A model, its context and what is derived from them; every method runs on its worker thread."""

    def __init__(self, path: Path, n_ctx: int, *, slots: int = 1, n_threads: int | None = None) -> None:
        ensure_cpu_backend()
        self.name = path.name
        if not 1 <= slots <= MAX_SLOTS:
            raise errors.Unavailable(f"slots must be 1 to {MAX_SLOTS}", code="model_load_failed")
        self.slots = slots
        self.model: llama_cpp.llama_model_p | None = load_weights(path)
        self.ctx = None
        try:
            self.n_ctx = n_ctx
            self.ctx = new_context(
                self.model,
                path,
                f"{n_ctx} x {slots} tokens",
                n_threads,
                n_ctx=n_ctx * slots,
                n_batch=BATCH,
                n_ubatch=BATCH,
                n_seq_max=slots,
                # A stream of n_ctx cells per sequence: llama.cpp then sizes each sequence's context (and
                # picks rope factors, e.g. Phi-3's LongRoPE) from n_ctx, not from the whole cache.
                kv_unified=False,
                no_perf=True,
            )
            self.memory = llama_cpp.llama_get_memory(self.ctx)
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
            self.reuse_prefix = not (
                llama_cpp.llama_model_is_recurrent(self.model) or llama_cpp.llama_model_is_hybrid(self.model)
            )
            self._pieces: dict[int, bytes] = {}
            self._by_piece: dict[bytes, list[int]] | None = None  # built on the first lazy grammar
            self._piece_buf = ctypes.create_string_buffer(64)
            self.template = self._metadata("tokenizer.chat_template")
            self._chat = self._chat_formatter()
            self.tools_supported = bool(self.template) and template_supports_tools(self.template or "")
            self._tokenizer = PromptTokenizer(self.vocab, self.n_vocab)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        free_model(self.model, self.ctx)
        self.model, self.ctx = None, None

    # ---- tokens ----

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self.piece(t) for t in tokens)

    # ---- prompts ----

    def _metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        if not self.template:
            return None

        def text_of(token: int) -> str:
            if token < 0:
                return ""
            return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

        eos = llama_cpp.llama_vocab_eos(self.vocab)
        return Jinja2ChatFormatter(
            template=self.template,
            eos_token=text_of(eos),
            bos_token=text_of(llama_cpp.llama_vocab_bos(self.vocab)),
            stop_token_ids=[eos],
        )

    def prompt_tokens(self, gen: Generation) -> list[int] | None:
        """The prompt's token ids (see ``prompt``: caller text never becomes a control token); None if the
        request was cancelled or ran out of time while it was tokenized. A prompt that cannot fit the
        context is refused before it is rendered."""
        request = gen.request
        if request.kind == "chat":
            if self._chat is None:
                raise errors.BadRequest(
                    "this local model has no chat template; use completions", code="no_chat_template"
                )
            if request.tools and not self.tools_supported:
                raise errors.BadRequest(
                    "this local model's chat template does not take tools",
                    code="tools_unsupported",
                    param="tools",
                )
            return chat_prompt(
                self._render,
                self._tokenizer,
                request.messages or [],
                request.tools,
                n_ctx=self.n_ctx,
                stop=gen.should_stop,
            )
        prompt = plain_text(request.prompt or "", "prompt")
        if not prompt:
            bos = llama_cpp.llama_vocab_bos(self.vocab)
            return [bos] if bos >= 0 else []
        check_fits(1, len(prompt), self.n_ctx, self._tokenizer.longest_piece, "prompt")
        return self._tokenizer.plain(prompt, add_special=True)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        assert self._chat is not None
        try:
            return self._chat(messages=messages, tools=tools).prompt  # type: ignore[arg-type]
        except Exception as exc:  # the template is the model's code: any error is a refused request
            raise errors.BadRequest(
                "the messages cannot be rendered with this model's chat template",
                code="chat_template_error",
            ) from exc

    # ---- sampling ----

    def sampler(self, request: GenerationRequest) -> llama_cpp.llama_sampler_p:
        """A new sampler chain for one request (freed with ``llama_sampler_free``)."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            if request.logit_bias:
                self._add_logit_bias(chain, request.logit_bias)
            if request.presence_penalty or request.frequency_penalty:
                stage = llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab, PENALTY_LAST_N, 1.0, request.frequency_penalty, request.presence_penalty
                )
                llama_cpp.llama_sampler_chain_add(chain, stage)
            grammar = self._grammar(request) if request.grammar is not None else None
            if grammar is not None:
                llama_cpp.llama_sampler_chain_add(chain, grammar)
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

    def _grammar(self, request: GenerationRequest) -> llama_cpp.llama_sampler_p | None:
        """The grammar stage; None when a lazy grammar cannot be held safely here (see below)."""
        assert request.grammar is not None
        grammar = LlamaGrammar.from_string(request.grammar, verbose=False)
        text, root = grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        if request.grammar_triggers:
            # Triggered by token ids only: a trigger found in the text can end inside a token that carries
            # more text, which the grammar may refuse, and llama.cpp then throws through its C API (the
            # process aborts). A token whose text is the whole trigger word (Qwen's and Hermes'
            # <tool_call>) ends exactly at a token boundary. Where no token spells a word the request runs
            # free: its calls are parsed, their arguments not held to the schema.
            tokens = [token for word in request.grammar_triggers for token in self._spelling(word)]
            if any(not self._spelling(word) for word in request.grammar_triggers):
                return None
            ids = (llama_cpp.llama_token * len(tokens))(*tokens)
            no_patterns = (ctypes.c_char_p * 0)()
            stage = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                self.vocab, text, root, no_patterns, 0, ids, len(tokens)
            )
        else:
            stage = llama_cpp.llama_sampler_init_grammar(self.vocab, text, root)
        if not stage:
            raise errors.BadRequest("the requested output's grammar is invalid", code="invalid_grammar")
        return stage

    def _spelling(self, word: str) -> list[int]:
        """The ids of the tokens whose text is exactly ``word`` (a byte token and a merged one may both
        spell it); empty if none does."""
        if self._by_piece is None:
            by_piece: dict[bytes, list[int]] = {}
            for token in range(self.n_vocab):
                by_piece.setdefault(self.piece(token), []).append(token)
            self._by_piece = by_piece
        return self._by_piece.get(word.encode("utf-8"), []) if word else []

    def _add_logit_bias(self, chain: llama_cpp.llama_sampler_p, bias: dict[int, float]) -> None:
        if any(not 0 <= token < self.n_vocab for token in bias):
            raise errors.BadRequest(
                "logit_bias names a token this model does not have",
                code="invalid_logit_bias",
                param="logit_bias",
            )
        entries = (llama_cpp.llama_logit_bias * len(bias))()
        for entry, (token, value) in zip(entries, bias.items(), strict=True):
            entry.token = token
            entry.bias = value
        stage = llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(bias), entries)
        llama_cpp.llama_sampler_chain_add(chain, stage)


def load_weights(path: Path) -> llama_cpp.llama_model_p:
    """The model's weights, read into memory (never mapped: see the module docstring)."""
    params = llama_cpp.llama_model_default_params()
    set_fields(params, load_mode=llama_cpp.LLAMA_LOAD_MODE_NONE, n_gpu_layers=0)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise errors.Unavailable(
            f"local model file {path.name} could not be loaded", code="model_load_failed"
        )
    return model


def free_model(model: llama_cpp.llama_model_p | None, ctx: llama_cpp.llama_context_p | None) -> None:
    """Free a context, then the weights it was made on (either may be missing after a failed load)."""
    if ctx:
        llama_cpp.llama_free(ctx)
    if model:
        llama_cpp.llama_model_free(model)


def new_context(
    model: llama_cpp.llama_model_p, path: Path, size: str, n_threads: int | None, **fields: object
) -> llama_cpp.llama_context_p:
    """A context on ``model`` with these parameter ``fields`` (``size`` names it in the error)."""
    params = llama_cpp.llama_context_default_params()
    set_fields(params, **fields)
    if n_threads:
        set_fields(params, n_threads=n_threads, n_threads_batch=n_threads)
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise errors.Unavailable(
            f"local model file {path.name}: no context of {size} could be made", code="model_load_failed"
        )
    return ctx


def set_fields(params: ctypes.Structure, **fields: object) -> None:
    """Set fields of a llama.cpp parameter struct; a name the struct does not have is an error, not a
    silently added Python attribute (``use_mmap`` became ``load_mode`` in llama.cpp, unnoticed)."""
    known = {name for name, *_ in params._fields_}
    for name, value in fields.items():
        if name not in known:
            raise RuntimeError(f"llama.cpp's {type(params).__name__} has no field {name!r}")
        setattr(params, name, value)
