"""Translation between the OpenAI chat completions wire format and the Anthropic Messages API.

Owns: the pure functions that turn a ``/v1/chat/completions`` request into a Messages request, a Messages
response into a ``chat.completion``, a Messages event stream into ``chat.completion.chunk`` SSE lines, and an
Anthropic error body into an OpenAI-shaped one. No sockets, no clocks except the ``created`` stamp.

It must never drop a caller's instruction silently: a request feature that has no Anthropic equivalent
(image parts, ``n`` > 1, logprobs, structured output) is refused with ``BadRequest``, and no error message
quotes the prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from appliance.errors import BadRequest, UpstreamError
from routes.result import Usage
from routes.usage import anthropic_event_usage, anthropic_usage, parse_object

DEFAULT_MAX_TOKENS = 1024

FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Sampling knobs without an Anthropic counterpart whose absence changes nothing the caller relies on.
_IGNORED = frozenset(
    {
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "logit_bias",
        "store",
        "service_tier",
        "metadata",
        "prediction",
        "reasoning_effort",
        "modalities",
        "audio",
        "web_search_options",
    }
)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _fields(value: object) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one: an upstream's malformed member reads as absent."""
    return value if isinstance(value, dict) else {}


# --- request: OpenAI chat -> Anthropic Messages ------------------------------------------------------------


def _text_of(content: object, *, where: str) -> str:
    """Plain text of a system/developer/tool content (a string or a list of text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(
                    f"{where} content must be text for anthropic routes", code="unsupported_content"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest(f"{where} content must be a string or a list of text parts", param="messages")


def _content_blocks(content: object, *, role: str) -> list[dict[str, Any]]:
    """Anthropic content blocks for a user/assistant content (string or OpenAI content parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"{role} content must be a string or a list of parts", param="messages")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            blocks.append({"type": "text", "text": part["refusal"]})
        elif kind in ("image_url", "input_audio", "file"):
            raise BadRequest(
                f"{kind} content parts are not supported by anthropic routes", code="unsupported_content"
            )
        else:
            raise BadRequest(f"unknown {role} content part type {str(kind)[:40]!r}", param="messages")
    return blocks


def _tool_use_blocks(tool_calls: object) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise BadRequest("tool_calls must be a list", param="messages")
    blocks: list[dict[str, Any]] = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise BadRequest("only function tool calls are supported by anthropic routes", param="messages")
        arguments = function.get("arguments") or "{}"
        parsed = parse_object(arguments) if isinstance(arguments, str) else arguments
        if not isinstance(parsed, dict):
            raise BadRequest("tool call arguments must be a JSON object", param="messages")
        blocks.append(
            {"type": "tool_use", "id": str(call.get("id", "")), "name": function.get("name"), "input": parsed}
        )
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Anthropic wants alternating roles; consecutive turns of one role (several tool results) merge.
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _convert_messages(raw: object) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list", param="messages")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in raw:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object", param="messages")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), where="system")
            if text:
                system.append(text)
        elif role == "user":
            _append(messages, "user", _content_blocks(message.get("content"), role="user"))
        elif role == "assistant":
            blocks = _content_blocks(message.get("content"), role="assistant")
            if message.get("tool_calls"):
                blocks.extend(_tool_use_blocks(message["tool_calls"]))
            _append(messages, "assistant", blocks)
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": str(message.get("tool_call_id", "")),
                "content": _text_of(message.get("content"), where="tool"),
            }
            _append(messages, "user", [result])
        else:
            raise BadRequest(f"message role {str(role)[:40]!r} is not supported", param="messages")
    # A string content is the plainest form of a single text block; keep requests readable upstream.
    for message in messages:
        content = message["content"]
        if len(content) == 1 and content[0]["type"] == "text":
            message["content"] = content[0]["text"]
    return "\n\n".join(system), messages


def _convert_tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", param="tools")
    out: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or "name" not in function:
            raise BadRequest("only function tools are supported by anthropic routes", param="tools")
        converted: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            converted["description"] = function["description"]
        out.append(converted)
    return out


def _convert_tool_choice(choice: object, parallel: object) -> dict[str, Any] | None:
    converted: dict[str, Any]
    if choice is None:
        if parallel is not False:
            return None
        converted = {"type": "auto"}
    elif choice in ("auto", "none"):
        converted = {"type": choice}
    elif choice == "required":
        converted = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        converted = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise BadRequest("tool_choice is not valid", param="tool_choice")
    if parallel is False and converted["type"] != "none":
        converted["disable_parallel_tool_use"] = True
    return converted


def chat_request_to_messages(body: Mapping[str, Any], upstream_model: str) -> dict[str, Any]:
    """An Anthropic Messages request equivalent to an OpenAI chat completions request."""
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("n > 1 is not supported by anthropic routes", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported by anthropic routes", param="logprobs")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise BadRequest("response_format is not supported by anthropic routes", param="response_format")
    system, messages = _convert_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": upstream_model, "max_tokens": max_tokens, "messages": messages}
    if system:
        out["system"] = system
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    if body.get("tools"):
        out["tools"] = _convert_tools(body["tools"])
        choice = _convert_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream") is True:
        out["stream"] = True
    return out


# --- response: Anthropic message -> OpenAI chat.completion ------------------------------------------------


def finish_reason(stop_reason: object) -> str | None:
    """The OpenAI finish_reason for an Anthropic stop_reason (unknown ones read as "stop")."""
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(str(stop_reason), "stop")


def usage_block(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.tokens_in,
        "completion_tokens": usage.tokens_out,
        "total_tokens": usage.tokens_in + usage.tokens_out,
    }


def messages_response_to_chat(message: Mapping[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` equivalent to an Anthropic Messages response."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    content = message.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": _dumps(block.get("input") or {})},
                }
            )
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if tool_calls:
        reply["tool_calls"] = tool_calls
    usage = Usage()
    anthropic_usage(message, usage)
    return {
        "id": f"chatcmpl-{message.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": finish_reason(message.get("stop_reason")),
            }
        ],
        "usage": usage_block(usage),
    }


def anthropic_error_to_openai(body: bytes, status: int) -> bytes:
    """An OpenAI-shaped error body for an Anthropic error body (``{"type":"error","error":{...}}``)."""
    message = f"upstream answered status {status}"
    kind = "invalid_request_error"
    obj = parse_object(body)
    if obj is not None and isinstance(obj.get("error"), dict):
        error = obj["error"]
        message = str(error.get("message") or message)
        kind = str(error.get("type") or kind)
    return _dumps({"error": {"message": message, "type": kind, "code": None, "param": None}}).encode()


# --- stream: Anthropic events -> OpenAI chat.completion.chunk SSE ------------------------------------------


class MessagesStreamToChat:
    """Turns Anthropic Messages stream events, one at a time, into ``chat.completion.chunk`` SSE bytes.

    The chunk id is derived from the message id, so every chunk of one answer carries the same id. The
    usage-only chunk is emitted only when the caller asked for ``stream_options.include_usage``.
    """

    __slots__ = (
        "_blocks",
        "_created",
        "_finish",
        "_id",
        "_include_usage",
        "_model",
        "_route",
        "done",
        "usage",
    )

    def __init__(self, *, include_usage: bool, route: str = "anthropic", created: int | None = None) -> None:
        self._include_usage = include_usage
        self._route = route
        self._created = int(time.time()) if created is None else created
        self._id = "chatcmpl-"
        self._model = ""
        self._blocks: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool_calls index
        self._finish: str | None = None
        self.usage = Usage()
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + _dumps(chunk).encode() + b"\n\n"

    def event(self, event_type: str, obj: Mapping[str, Any]) -> bytes:
        """SSE bytes (maybe ``b""``) for one Anthropic event; raises ``UpstreamError`` on an error event or
        a tool_use block it could not index. Members of the wrong JSON type read as absent."""
        anthropic_event_usage(event_type, obj, self.usage)
        if event_type == "content_block_delta":
            delta = _fields(obj.get("delta"))
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            index = obj.get("index")
            if delta.get("type") == "input_json_delta" and isinstance(index, int) and index in self._blocks:
                call = {
                    "index": self._blocks[index],
                    "function": {"arguments": delta.get("partial_json", "")},
                }
                return self._chunk({"tool_calls": [call]})
            return b""  # thinking and signature deltas have no chat completions form
        if event_type == "message_start":
            message = _fields(obj.get("message"))
            self._id = f"chatcmpl-{message.get('id', '')}"
            self._model = str(message.get("model", ""))
            return self._chunk({"role": "assistant", "content": ""})
        if event_type == "content_block_start":
            block = _fields(obj.get("content_block"))
            if block.get("type") == "tool_use":
                at = obj.get("index", 0)
                if not isinstance(at, int):
                    raise UpstreamError(f"upstream {self._route} sent a tool_use block without an index")
                index = self._blocks[at] = len(self._blocks)
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if event_type == "message_delta":
            self._finish = finish_reason(_fields(obj.get("delta")).get("stop_reason")) or "stop"
            return self._chunk({}, self._finish)
        if event_type == "message_stop":
            self.done = True
            tail = b""
            if self._include_usage:
                chunk = {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": usage_block(self.usage),
                }
                tail = b"data: " + _dumps(chunk).encode() + b"\n\n"
            return tail + b"data: [DONE]\n\n"
        if event_type == "error":
            error = _fields(obj.get("error"))
            kind = str(error.get("type", "error"))[:60]
            raise UpstreamError(f"upstream {self._route} failed mid-stream ({kind})")
        return b""  # ping, content_block_stop, and event types added after this was written
