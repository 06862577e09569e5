"""The route for ``local/<name>``: in-process llama.cpp models, answered in OpenAI's wire format.

Owns: turning an OpenAI request (chat, completions, embeddings) into a ``GenerationRequest`` for the
engine (sampling parameters and penalties, stop strings, ``response_format`` as a grammar, ``tools`` as
template input and a grammar through ``local_models.tools``, the role's priority, the deadline), the
allow-list of body and message fields each endpoint reads (others refused, a few ignored: see
``_CHAT_FIELDS`` and below), and the engine's text back into OpenAI JSON or SSE chunks (tool calls parsed
out of it), with exact usage.
Never: touches a ``Llama`` object (the engine's worker threads do); lets a generation run on after its
caller has gone (``aclose`` cancels it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

from appliance.errors import BadRequest
from local_models.engine import Generation, GenerationRequest
from local_models.json_schema import grammar_for
from local_models.prompt import chat_turns, plain_text
from local_models.runtime import LocalRuntime
from local_models.tool_calls import (
    CallArguments,
    CallStarted,
    ContentText,
    Event,
    ToolCallParser,
    assemble,
)
from local_models.tools import (
    NO_TOOLS,
    ToolPlan,
    plan_tools,
    wire_calls,
)
from routes.result import EVENT_STREAM, JSON, NO_HINTS, Hints, RouteResult, Usage, UsageView

_FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}
"""The engine's finish reasons as OpenAI's; a chat that ended on its own after tool calls is "tool_calls"."""

# The body fields each endpoint reads. A field outside its list is refused (400, ``param`` naming it)
# unless it is null or listed in _IGNORED; a field in _UNSUPPORTED is refused when set (not null, false,
# zero or empty): local models cannot honour it, and a silent default would answer a different question.
_SAMPLING = (
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "logit_bias",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
)
_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
"""Read by ``tools.plan_tools``, in its argument order."""
_CHAT_FIELDS = frozenset({*_SAMPLING, "messages", *_TOOL_FIELDS})
_COMPLETION_FIELDS = frozenset({*_SAMPLING, "prompt"})
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format"})
_NO_LOGPROBS = "local models do not return logprobs"
_UNSUPPORTED = {
    "functions": "'functions' is not supported by local models: use 'tools'",
    "function_call": "'function_call' is not supported by local models: use 'tool_choice' with 'tools'",
    "logprobs": _NO_LOGPROBS,
    "top_logprobs": _NO_LOGPROBS,
    "audio": "local models take and return text only",
    "modalities": "local models take and return text only",
    "echo": "'echo' is not supported by local models",
    "suffix": "'suffix' is not supported by local models",
    "best_of": "local models return one choice ('best_of' must be 1)",
    "dimensions": "'dimensions' is not supported by local models",
    "prediction": "'prediction' is not supported by local models",
}
"""Fields refused when set, each with its reason."""
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
"""Accepted and without effect: bookkeeping for the provider."""
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls"})
"""What a chat message may carry: role and content reach the template, and an assistant's ``tool_calls``
and a tool message's ``tool_call_id`` and ``name`` (``prompt.chat_turns``); other messages' ``name`` and
``tool_call_id`` are accepted and dropped (a name is caller text a template would put among its own).
Other non-null fields (``audio``, ``function_call``…) are refused."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class LiveUsage:
    """A generation's usage as it stands: counted by its worker token by token, final once it has ended.

    The pipeline records a stream's outcome the moment the client leaves; reading the counters then
    counts every token generated so far, delivered or not.
    """

    reported = True

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    @property
    def tokens_in(self) -> int:
        return self._generation.prompt_tokens

    @property
    def tokens_out(self) -> int:
        return self._generation.completion_tokens


class LocalStream:
    """SSE bytes for one generation, its first text piece already read (errors before it were raised)."""

    def __init__(
        self,
        generation: Generation,
        first: str | None,
        frame: _ChatFrame | _CompletionFrame,
        include_usage: bool,
    ) -> None:
        self._generation = generation
        self._frame = frame
        self.usage = LiveUsage(generation)
        self._iter = self._events(first, include_usage)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        return await self._iter.__anext__()

    async def _events(self, first: str | None, include_usage: bool) -> AsyncGenerator[bytes, None]:
        frame = self._frame
        yield _sse(frame.start())
        if first:
            for chunk in frame.pieces(first):
                yield _sse(chunk)
        if first is not None:
            async for piece in self._generation:
                for chunk in frame.pieces(piece):
                    yield _sse(chunk)
        for chunk in frame.flush():
            yield _sse(chunk)
        yield _sse(frame.end(frame.finish(self._generation.finish_reason)))
        if include_usage:
            yield _sse(frame.usage(self.usage))
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self._generation.cancel()
        await self._iter.aclose()


class _Frame:
    """The chunks of one streamed answer: shared id, time and model; subclasses shape the choice."""

    prefix = ""
    kind = ""

    def __init__(self, model: str) -> None:
        self.base: dict[str, Any] = {
            "id": f"{self.prefix}-{os.urandom(12).hex()}",
            "object": self.kind,
            "created": int(time.time()),
            "model": model,
        }

    def _with(self, choice: dict[str, Any]) -> dict[str, Any]:
        return dict(self.base, choices=[{"index": 0, **choice, "logprobs": None}])

    def usage(self, usage: UsageView) -> dict[str, Any]:
        return dict(self.base, choices=[], usage=_usage(usage))

    def flush(self) -> list[dict[str, Any]]:
        """Chunks for what was held back until the end."""
        return []

    def finish(self, reason: str | None) -> str:
        """OpenAI's ``finish_reason`` for the engine's."""
        return _FINISH.get(reason or "stop", "stop")


class _ChatFrame(_Frame):
    prefix, kind = "chatcmpl", "chat.completion.chunk"

    def __init__(self, model: str, plan: ToolPlan = NO_TOOLS) -> None:
        super().__init__(model)
        self.base["system_fingerprint"] = None
        self._plan = plan
        self._parser = ToolCallParser() if plan.offered else None

    def start(self) -> dict[str, Any]:
        # An answer that can only be calls has no content (OpenAI's forced calls start with null too).
        content = None if self._plan.calls_only else ""
        return self._with({"delta": {"role": "assistant", "content": content}, "finish_reason": None})

    def pieces(self, text: str) -> list[dict[str, Any]]:
        if self._parser is None:
            return [self._delta({"content": text})] if text else []
        return [self._event(event) for event in self._parser.feed(text)]

    def flush(self) -> list[dict[str, Any]]:
        return [] if self._parser is None else [self._event(event) for event in self._parser.finish()]

    def finish(self, reason: str | None) -> str:
        return _finish(reason, self._parser)

    def end(self, finish: str) -> dict[str, Any]:
        return self._with({"delta": {}, "finish_reason": finish})

    def message(self, text: str) -> dict[str, Any]:
        """The answer's message, not streamed: the whole ``text``, its tool calls parsed out."""
        if self._parser is None:
            return {"role": "assistant", "content": text}
        content, calls = assemble([*self._parser.feed(text), *self._parser.finish()])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls or self._plan.calls_only:
            message["content"] = content or None
        if calls:
            message["tool_calls"] = calls
        return message

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return self._with({"delta": delta, "finish_reason": None})

    def _event(self, event: Event) -> dict[str, Any]:
        if isinstance(event, ContentText):
            return self._delta({"content": event.text})
        if isinstance(event, CallStarted):
            call = {"name": event.name, "arguments": ""}
            first = {"index": event.index, "id": event.id, "type": "function", "function": call}
            return self._delta({"tool_calls": [first]})
        assert isinstance(event, CallArguments)
        return self._delta({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})


class _CompletionFrame(_Frame):
    prefix, kind = "cmpl", "text_completion"

    def start(self) -> dict[str, Any]:
        return self._with({"text": "", "finish_reason": None})

    def pieces(self, text: str) -> list[dict[str, Any]]:
        return [self._with({"text": text, "finish_reason": None})] if text else []

    def end(self, finish: str) -> dict[str, Any]:
        return self._with({"text": "", "finish_reason": finish})


def _finish(reason: str | None, parser: ToolCallParser | None) -> str:
    """``tool_calls`` when the model ended on its own after complete calls; else the engine's reason. A
    call cut short (``max_tokens``, a stop string) keeps the reason that cut it."""
    if parser is not None and parser.calls and reason == "stop" and not parser.inside_call:
        return "tool_calls"
    return _FINISH.get(reason or "stop", "stop")


def _usage(usage: UsageView) -> dict[str, int]:
    return {
        "prompt_tokens": usage.tokens_in,
        "completion_tokens": usage.tokens_out,
        "total_tokens": usage.tokens_in + usage.tokens_out,
    }


class LocalRoute:
    """A route of kind "local"; one per policy route name, all sharing the gateway's runtime."""

    kind = "local"

    def __init__(self, name: str, runtime: LocalRuntime) -> None:
        self.name = name
        self._runtime = runtime

    async def chat_completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        _check_fields(body, _CHAT_FIELDS)
        turns = chat_turns(body.get("messages"))
        for i, message in enumerate(body["messages"]):
            _check_message(message, f"messages[{i}]")
        request = self._request(body, hints, kind="chat")
        request.messages = [_wire_message(turn.message(turn.text)) for turn in turns]
        plan = NO_TOOLS
        if any(body.get(name) is not None for name in _TOOL_FIELDS):
            # Every offered schema becomes a grammar, which can take a while: off the event loop.
            plan = await asyncio.to_thread(plan_tools, *(body.get(name) for name in _TOOL_FIELDS))
        if plan.offered is not None:
            if body.get("response_format") not in (None, {"type": "text"}):
                raise BadRequest(
                    "local models take 'response_format' or 'tools', not both", param="response_format"
                )
            request.tools = plan.offered
            request.grammar = plan.grammar
            request.grammar_triggers = list(plan.triggers)
        frame = _ChatFrame(self._shown(upstream_model), plan)
        return await self._generate(body, upstream_model, request, frame)

    async def completions(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        _check_fields(body, _COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("local models take one prompt per request", param="prompt")
            prompt = prompt[0]
        request = self._request(body, hints, kind="completion")
        request.prompt = "" if prompt is None else plain_text(prompt, "prompt")
        frame = _CompletionFrame(self._shown(upstream_model))
        return await self._generate(body, upstream_model, request, frame)

    async def embeddings(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        _check_fields(body, _EMBEDDING_FIELDS)
        raw = body.get("input")
        if not isinstance(raw, str | list):
            raise BadRequest("'input' must be a string or a list of strings", param="input")
        inputs = [raw] if isinstance(raw, str) else raw
        for i, text in enumerate(inputs):
            plain_text(text, f"input[{i}]")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        model = await self._runtime.ensure_loaded(f"{self.name}/{upstream_model}")
        deadline = time.monotonic() + self._runtime.settings.request_timeout_s
        vectors, tokens = await self._runtime.engine.embed(
            model, inputs, priority=hints.priority, deadline=deadline
        )
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
            for i, vector in enumerate(vectors)
        ]
        usage = Usage(tokens_in=tokens, tokens_out=0, reported=True)
        answer = {
            "object": "list",
            "data": data,
            "model": f"{self.name}/{upstream_model}",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return RouteResult(200, JSON, _dumps(answer), None, usage, upstream_model)

    async def messages(
        self, body: dict[str, Any], *, upstream_model: str, key: str | None, hints: Hints = NO_HINTS
    ) -> RouteResult:
        raise BadRequest("/v1/messages serves anthropic routes only", code="unsupported_endpoint")

    def _request(
        self, body: dict[str, Any], hints: Hints, *, kind: Literal["chat", "completion"]
    ) -> GenerationRequest:
        if body.get("n", 1) not in (1, None):
            raise BadRequest("local models return one choice ('n' must be 1)", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise BadRequest("'stop' must be a string or up to 4 strings", param="stop")
        for i, text in enumerate(stop):
            plain_text(text, f"stop[{i}]")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise BadRequest("'max_tokens' must be a positive integer", param="max_tokens")
        return GenerationRequest(
            kind=kind,
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
            stop=stop,
            grammar=None,  # built off the event loop in _generate
            logit_bias=_logit_bias(body.get("logit_bias")),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            priority=hints.priority,
            cache_scope=hints.scope,
            deadline=time.monotonic() + self._runtime.settings.request_timeout_s,
        )

    def _shown(self, upstream_model: str) -> str:
        return f"{self.name}/{upstream_model}"

    async def _generate(
        self,
        body: dict[str, Any],
        upstream_model: str,
        request: GenerationRequest,
        frame: _ChatFrame | _CompletionFrame,
    ) -> RouteResult:
        if request.grammar is None and body.get("response_format") is not None:
            # A schema's grammar can take a while to build: off the event loop.
            request.grammar = await asyncio.to_thread(grammar_for, body["response_format"])
        model = await self._runtime.ensure_loaded(self._shown(upstream_model))
        generation = await self._runtime.engine.generate(model, request)
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            try:  # errors found before the first token (context too long, bad grammar) get their own status
                first: str | None = await generation.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                generation.cancel()
                raise
            stream = LocalStream(generation, first, frame, include_usage)
            return RouteResult(200, EVENT_STREAM, None, stream, stream.usage, upstream_model)
        try:
            text = await generation.text()
        except BaseException:
            generation.cancel()
            raise
        usage = Usage(generation.prompt_tokens, generation.completion_tokens, True)
        if isinstance(frame, _ChatFrame):
            ident, kind = f"chatcmpl-{os.urandom(12).hex()}", "chat.completion"
            choice: dict[str, Any] = {"index": 0, "message": frame.message(text)}
        else:
            ident, kind = f"cmpl-{os.urandom(12).hex()}", "text_completion"
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=frame.finish(generation.finish_reason))
        answer = {
            "id": ident,
            "object": kind,
            "created": int(time.time()),
            "model": self._shown(upstream_model),
            "choices": [choice],
            "usage": _usage(usage),
        }
        return RouteResult(200, JSON, _dumps(answer), None, usage, upstream_model)


def _wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """A template message (``prompt.Turn.message``) in OpenAI's shape, as ``GenerationRequest`` takes it."""
    if "tool_calls" in message:
        message["tool_calls"] = wire_calls(message["tool_calls"])
    return message


def _check_fields(body: dict[str, Any], read: frozenset[str]) -> None:
    """Refuse a field the endpoint does not read (see _UNSUPPORTED and _IGNORED above)."""
    for name, value in body.items():
        if name in read or value is None or name in _IGNORED:
            continue
        if name in _UNSUPPORTED:
            if value is False or value == 0 or value == [] or value == {}:
                continue
            raise BadRequest(_UNSUPPORTED[name], param=name)
        raise BadRequest(f"'{_shown(name)}' is not a field local models take", param=_shown(name))


def _check_message(message: dict[str, Any], where: str) -> None:
    """A message's fields beyond those ``chat_turns`` reads (see _MESSAGE_FIELDS): dropped, or refused
    when set."""
    for name, value in message.items():
        if name in ("name", "tool_call_id"):
            if value is not None and not isinstance(value, str):
                raise BadRequest(f"'{where}.{name}' must be a string", param=f"{where}.{name}")
        elif name not in _MESSAGE_FIELDS and value is not None and value != []:
            shown = f"{where}.{_shown(name)}"
            raise BadRequest(f"'{shown}' is not supported by local models", param=shown)


def _shown(name: str) -> str:
    """A field name as an error may quote it: short, and printable."""
    clean = "".join(c if c.isprintable() and not "\ud800" <= c <= "\udfff" else "?" for c in name)
    return clean if len(clean) <= 64 else clean[:61] + "..."


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a number from {low} to {high}", param=name)
    return float(value)


def _logit_bias(value: object) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids (as strings) to a bias from -100 to 100."""
    if value is None:
        return None
    try:
        bias = {int(token): float(amount) for token, amount in value.items()}  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError) as exc:
        raise BadRequest("'logit_bias' maps token ids to numbers", param="logit_bias") from exc
    if len(bias) > 1024 or any(not -100 <= amount <= 100 for amount in bias.values()):
        raise BadRequest("'logit_bias' takes at most 1024 entries, each from -100 to 100", param="logit_bias")
    return bias


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
