"""What of a request body may be forwarded to a model, per endpoint, and the text in it that is screened.

The rule (issue 10): every string that can reach a model is either screened or refused. So the fields a
request may carry are an allow-list per endpoint, not a deny-list, and each field has a kind:

    text     any JSON; every string inside it, and every object key outside the wire vocabulary below
             (a JSON-schema property name, say), is text the deny patterns and ``max_chars`` see
    number   a finite JSON number          integer  a whole number within +-2**63
    boolean  true or false                 word     a short lower-case identifier (``service_tier``)

Inside text fields, a few structural keys carry values that are not prose (``role``, ``type``, ids, base64
payloads). Each must have the strict shape of its kind or the request is refused with 400 naming the
field; only the closed-set ones (``role``, ``detail``) and base64 images and audio go unscreened. So
``"role": "system\\n..."`` cannot smuggle text into a chat template, nor ``"type"`` text to a provider. A
string that cannot be encoded (a lone surrogate) is refused.

Owns: the per-endpoint allow-lists, the structural shapes, and ``screened_text`` (one walk of the body).
Never: keeps the text it reads; forwards a field not listed here (the caller gets a 400 naming it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Literal

from appliance.errors import BadRequest

Kind = Literal["model", "text", "number", "integer", "boolean", "word"]

_SHARED_SAMPLING: Final[dict[str, Kind]] = {
    "model": "model",  # parsed and policed on its own; what leaves is the verdict's model
    "stream": "boolean",
    "temperature": "number",
    "top_p": "number",
    "max_tokens": "integer",
    "metadata": "text",
}

FIELDS: Final[dict[str, dict[str, Kind]]] = {
    "chat": {
        **_SHARED_SAMPLING,
        "messages": "text",
        "max_completion_tokens": "integer",
        "frequency_penalty": "number",
        "presence_penalty": "number",
        "logit_bias": "text",
        "logprobs": "boolean",
        "top_logprobs": "integer",
        "n": "integer",
        "seed": "integer",
        "stop": "text",
        "stream_options": "text",
        "response_format": "text",
        "tools": "text",
        "tool_choice": "text",
        "parallel_tool_calls": "boolean",
        "functions": "text",
        "function_call": "text",
        "user": "text",
        "store": "boolean",
        "service_tier": "word",
        "reasoning_effort": "word",
        "verbosity": "word",
        "modalities": "text",
        "audio": "text",
        "prediction": "text",
        "prompt_cache_key": "text",
        "safety_identifier": "text",
        "web_search_options": "text",
        "prompt_cache_retention": "text",
        "prompt_cache_options": "text",
        "moderation": "text",
    },
    "messages": {
        **_SHARED_SAMPLING,
        "messages": "text",
        "system": "text",
        "stop_sequences": "text",
        "top_k": "integer",
        "tools": "text",
        "tool_choice": "text",
        "thinking": "text",
        "service_tier": "word",
        "cache_control": "text",
        "output_config": "text",
        "container": "text",
        "inference_geo": "text",
        "speed": "text",
        "diagnostics": "text",
    },
    "completions": {
        **_SHARED_SAMPLING,
        "prompt": "text",
        "suffix": "text",
        "n": "integer",
        "best_of": "integer",
        "echo": "boolean",
        "logprobs": "integer",
        "stop": "text",
        "stream_options": "text",
        "frequency_penalty": "number",
        "presence_penalty": "number",
        "logit_bias": "text",
        "seed": "integer",
        "user": "text",
    },
    "embeddings": {
        "model": "model",
        "input": "text",
        "encoding_format": "word",
        "dimensions": "integer",
        "user": "text",
    },
}
"""The top-level fields each endpoint forwards, with their kinds (OpenAI's and Anthropic's documented
request parameters that a gateway in front of them can police)."""

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
"""Message roles of either wire format; any other value is refused (a chat template would render it)."""

_WORD = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_ID = re.compile(r"[A-Za-z0-9_.:-]{0,256}")
_MEDIA_TYPE = re.compile(r"[a-z]+/[A-Za-z0-9.+-]{1,64}(?:\s*;\s*[A-Za-z0-9_.-]+=[A-Za-z0-9_.\"-]+){0,4}")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_MEDIA_DATA_URL = re.compile(r"data:(?:image|audio)/[A-Za-z0-9.+-]{1,64};base64,[A-Za-z0-9+/]+={0,2}")

_STRUCTURAL: Final[dict[str, Callable[[str], bool]]] = {
    "role": ROLES.__contains__,
    "type": lambda v: _WORD.fullmatch(v) is not None,
    "id": lambda v: _ID.fullmatch(v) is not None,
    "tool_call_id": lambda v: _ID.fullmatch(v) is not None,
    "tool_use_id": lambda v: _ID.fullmatch(v) is not None,
    "media_type": lambda v: _MEDIA_TYPE.fullmatch(v) is not None,
    "detail": lambda v: v in ("auto", "low", "high", "original"),
    "signature": lambda v: _BASE64.fullmatch(v) is not None,
}
"""Keys whose string values are structure, with the only shape each may have. ``url`` is structural only
as a ``data:`` URL (an image); any other URL is text (it can carry words)."""

_OPAQUE: Final = frozenset({"role", "detail"})
"""Structural keys whose values are not screened: each a closed set of words. Ids, types, media types and
signatures are screened as well as shaped. A ``data`` payload is left unscreened only when it is base64
of an image or audio (``_is_media``): Anthropic's text documents carry plain text in ``data``."""

_VOCABULARY: Final = frozenset(
    {
        *_STRUCTURAL,
        *(name for fields in FIELDS.values() for name in fields),
        "content", "text", "name", "description", "parameters", "properties", "required", "items",
        "function", "arguments", "tool_calls", "image_url", "url", "source", "input", "input_schema",
        "strict", "json_schema", "schema", "additionalProperties", "enum", "const", "format", "minimum",
        "maximum", "minItems", "maxItems", "minLength", "maxLength", "pattern", "anyOf", "oneOf", "allOf",
        "$ref", "$defs", "definitions", "default", "title", "cache_control", "ttl", "include_usage",
        "is_error", "budget_tokens", "refusal", "file", "file_id", "filename", "file_data", "input_audio",
        "disable_parallel_tool_use", "allowed_tools", "mode", "tools", "custom", "grammar", "syntax",
        "definition", "search_context_size", "user_location", "approximate", "voice", "thinking",
    }
)  # fmt: skip
"""Object keys of the wire formats themselves: not screened (every other key is, as text)."""

_FREE_FORM: Final = frozenset(
    {
        "input", "arguments", "properties", "enum", "const", "default", "examples", "metadata", "logit_bias",
        "parameters", "input_schema", "schema",
    }
)  # fmt: skip
"""Keys whose values are the caller's own data (tool arguments, JSON schemas, enum values): no key in them
is structural, so a tool argument named ``type`` or a draft-04 schema ``id`` URL is text to screen, not a
shape to check."""

_TYPES: Final = frozenset(
    {
        "text", "image", "image_url", "input_audio", "file", "document", "function", "custom", "tool",
        "tool_use", "tool_result", "thinking", "redacted_thinking", "json_schema", "json_object", "object",
        "string", "number", "integer", "boolean", "array", "null", "base64", "url", "ephemeral", "enabled",
        "disabled", "auto", "any", "none", "required", "content", "allowed_tools", "grammar", "approximate",
    }
)  # fmt: skip
"""``type`` values of the wire formats and of JSON Schema: structure, not screened (any other is)."""

MAX_DEPTH: Final = 64
"""Deepest nesting of a forwarded value; deeper is refused (no real request nests past ~10)."""

_INT_LIMIT: Final = 1 << 63


def screened_text(body: dict[str, object], endpoint: str) -> list[str]:
    """Every piece of text in ``body`` a model may read; 400 naming the field for anything not allowed."""
    fields = FIELDS[endpoint]
    pieces: list[str] = []
    for name, value in body.items():
        kind = fields.get(name)
        if kind is None:
            raise BadRequest(
                f"'{_shown(name)}' is not a parameter this gateway forwards on this endpoint",
                param=_shown(name),
                code="unknown_parameter",
            )
        if value is None:
            continue
        if kind == "text":
            _walk(value, pieces, name, 0, free=name in _FREE_FORM)
        elif kind == "model":
            pieces.append(str(value))  # a glob (openai/*) lets the caller choose it, and it goes upstream
        elif not _KIND_CHECKS[kind](value):
            raise BadRequest(f"'{name}' must be {_KIND_WORDS[kind]}", param=name, code="invalid_parameter")
        elif kind == "word":
            pieces.append(str(value))  # a setting, but still a word the caller chose and the provider reads
    return pieces


def _walk(value: object, pieces: list[str], path: str, depth: int, *, free: bool = False) -> None:
    if depth > MAX_DEPTH:
        raise BadRequest("the request is nested too deeply", param=path, code="invalid_request")
    if isinstance(value, str):
        pieces.append(_encodable(value, path))
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{_shown(key)}"
            if key not in _VOCABULARY:
                pieces.append(_encodable(key, where))
            check = None if free else _STRUCTURAL.get(key)
            if check is not None and isinstance(item, str):
                if not check(item):
                    raise BadRequest(f"'{where}' has a value this field cannot take", param=where)
                if key not in _OPAQUE and item not in _TYPES:  # short, but still words a caller chose
                    pieces.append(item)
                continue
            if not free and isinstance(item, str) and _is_media(key, item, value):
                continue  # an image or a sound: no deny pattern can read it, and it is not text
            _walk(item, pieces, where, depth + 1, free=free or key in _FREE_FORM)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _walk(item, pieces, f"{path}[{index}]", depth + 1, free=free)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not -_INT_LIMIT < value < _INT_LIMIT:
            raise BadRequest(f"'{path}' is out of range", param=path, code="invalid_parameter")
        pieces.append(repr(value))  # a number in a tool argument or an enum is read by the model too


_AUDIO_FORMATS: Final = frozenset({"wav", "mp3", "flac", "opus", "pcm16", "aac"})


def _is_media(key: str, item: str, holder: dict[str, object]) -> bool:
    """``item`` is base64 of an image or audio clip: a ``data:image/...`` or ``data:audio/...`` URL, or the
    ``data`` of a source whose ``media_type`` is an image or audio type (or of OpenAI's ``input_audio``,
    which has a ``format``). Anything else (a text document, a PDF, a ``data:text/plain`` URL) is text."""
    if key == "url":
        return _MEDIA_DATA_URL.fullmatch(item) is not None
    if key != "data" or _BASE64.fullmatch(item) is None:
        return False
    media = holder.get("media_type")
    if isinstance(media, str):
        return media.startswith(("image/", "audio/"))
    return holder.get("format") in _AUDIO_FORMATS


def _encodable(text: str, path: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(
                f"'{path}' holds an unpaired surrogate (not valid Unicode text)", param=path
            ) from None
    return text


def _shown(name: str) -> str:
    """A field name as an error may echo it: printable ASCII, bounded (it is caller text)."""
    if len(name) <= 64 and name.isascii() and name.isprintable():
        return name
    return f"<{len(name)}-character field name>"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT


_KIND_CHECKS: Final[dict[str, Callable[[object], bool]]] = {
    "number": _is_number,
    "integer": _is_integer,
    "boolean": lambda value: isinstance(value, bool),
    "word": lambda value: isinstance(value, str) and _WORD.fullmatch(value) is not None,
}
_KIND_WORDS: Final = {
    "number": "a finite number",
    "integer": "a whole number",
    "boolean": "true or false",
    "word": "a short lower-case identifier",
}
