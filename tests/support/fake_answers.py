"""What the fake upstream answers, as bytes: OpenAI and Anthropic bodies and SSE events, errors, HTTP framing.

Pure functions, no server: ``fake_upstream`` serves them (and is the only user of the underscore names).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

BIG_STREAM_CHUNKS = 2000
BIG_JSON_CONTENT = "tok " * (256 * 1024)  # 1 MiB, in one piece
_CREATED = 1_764_000_000


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Status"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _head(
    status: int,
    content_type: bytes,
    *,
    length: int | None,
    close: bool,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _reason(status)),
        b"content-type: " + content_type,
        b"x-request-id: req_fake",
    ]
    lines.append(b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length)
    if close:
        lines.append(b"connection: close")
    lines.extend(name + b": " + value for name, value in extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _json_response(
    status: int, payload: bytes, *, close: bool, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    return _head(status, b"application/json", length=len(payload), close=close, extra=extra) + payload


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n\r\n"


def _words(content: object) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                for key in ("text", "content"):
                    total += _words(part.get(key))
        return total
    return 0


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _pieces(model: str) -> list[str]:
    if model == "big-stream":
        return ["tok "] * BIG_STREAM_CHUNKS
    if model == "big-json":
        return [BIG_JSON_CONTENT]
    return ["Hello", " from", " ", model]


# --- OpenAI chat completions --------------------------------------------------------------------------------


def openai_answer(req: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    """(JSON body, SSE events) for a chat completions request."""
    model = str(req.get("model", ""))
    messages = req.get("messages") or []
    prompt = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
    pieces = _pieces(model)
    usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}
    body = _dumps(
        {
            "id": "chatcmpl-fake01",
            "object": "chat.completion",
            "created": _CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )
    options = req.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    base: dict[str, Any] = {
        "id": "chatcmpl-fake01",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
    }
    if include_usage:
        base["usage"] = None  # as OpenAI does: every chunk carries "usage": null

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return b"data: " + _dumps(obj) + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events.extend(chunk({"content": piece}) for piece in pieces)
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(b"data: " + _dumps(dict(base, choices=[], usage=usage)) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return body, events


# --- Anthropic Messages ------------------------------------------------------------------------------------


def _event(kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, **fields}) + b"\n\n"


def anthropic_answer(req: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    """(JSON body, SSE events) for a Messages request; a tool_use when asked to "use tool" with tools."""
    model = str(req.get("model", ""))
    messages = req.get("messages") or []
    prompt = _words(req.get("system")) + sum(
        _words(m.get("content")) for m in messages if isinstance(m, dict)
    )
    pieces = _pieces(model)
    tools = req.get("tools") or []
    use_tool = bool(tools) and "use tool" in _last_user_text(messages)
    tool = {"type": "tool_use", "id": "toolu_fake01", "name": tools[0].get("name") if tools else None}
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(pieces)}]
    if use_tool:
        content.append({**tool, "input": {"query": "fake"}})
    stop = "tool_use" if use_tool else "end_turn"
    message = {"id": "msg_fake01", "type": "message", "role": "assistant", "model": model}
    body = _dumps({**message, "content": content, "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": prompt, "output_tokens": len(pieces)}})  # fmt: skip
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": prompt, "output_tokens": 1}}  # fmt: skip
    events = [
        _event("message_start", message=start),
        _event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        _event("ping"),
    ]
    for piece in pieces:
        events.append(_event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece}))
    events.append(_event("content_block_stop", index=0))
    if use_tool:
        events.append(_event("content_block_start", index=1, content_block={**tool, "input": {}}))
        for part in ('{"query": ', '"fake"}'):
            delta = {"type": "input_json_delta", "partial_json": part}
            events.append(_event("content_block_delta", index=1, delta=delta))
        events.append(_event("content_block_stop", index=1))
    delta = {"stop_reason": stop, "stop_sequence": None}
    events.append(_event("message_delta", delta=delta, usage={"output_tokens": len(pieces)}))
    events.append(_event("message_stop"))
    return body, events


def _error_body(kind: str, status: int, message: str) -> bytes:
    if kind == "anthropic":
        return _dumps({"type": "error", "error": {"type": "api_error", "message": message}})
    return _dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def _failure(kind: str, model: str, headers: dict[str, str], close: bool) -> bytes | None:
    """The response for a ``fail-<status>`` model, or None when the model is not one."""
    code = model[5:]
    if code == "400-text":
        return _head(400, b"text/plain", length=11, close=close) + b"bad request"
    if code == "400-big":
        return _json_response(400, _error_body(kind, 400, BIG_JSON_CONTENT), close=close)
    if not code.isdigit():
        return None
    status = int(code)
    extra: tuple[tuple[bytes, bytes], ...] = ()
    message = f"fake failure {status}"
    if status == 401:
        key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        message = f"Incorrect API key provided: {key[:6]}...{key[-4:]}"
    elif status == 429:
        extra = ((b"retry-after", b"7"),)
    return _json_response(status, _error_body(kind, status, message), close=close, extra=extra)
