"""What the Police phase needs to know about a request body, read once, in both wire formats.

Owns: parsing the body as a request of its endpoint (strict JSON: no ``NaN`` or ``Infinity``, integers of
at most 20 digits, nesting bounded; a JSON object with a ``model`` and the endpoint's messages, prompt or
input; 400 with the field named otherwise); reading, from an OpenAI (chat/completions, completions,
embeddings) or Anthropic (messages) body and the ``X-Phi-Data-Class`` header, the declared data class, the
tool names (one per tool, whatever its shape), the message count, every piece of text a model may read
(``forwarding.screened_text``, for deny patterns and ``max_chars``) and the requested ``max_tokens``; and
applying the Police phase's edits back to the body (tools dropped, ``max_tokens``
clamped, the model replaced).
Never: keeps or logs the text it reads (it lives only as long as the request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import BadRequest
from appliance.pipeline.forwarding import screened_text
from appliance.policy.schema import DATA_CLASSES


@dataclass(slots=True)
class BodyFacts:
    data_class: str | None = None
    tools: list[str] = field(default_factory=list)
    message_count: int = 0
    text_len: int = 0
    text: str = ""
    max_tokens: int | None = None


WEB_SEARCH = "web_search"
"""The tool name ``web_search_options`` counts as (Anthropic's server tool has the same name): a role's
tool allow-list decides on it like on any other tool."""

_INT_DIGITS = 20  # a JSON integer longer than this is no count, price or seed anyone means


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is out of range")
    return int(text)


_decode = json.JSONDecoder(parse_constant=_no_constant, parse_int=_bounded_int).decode


def parse_request(body: bytes, endpoint: str) -> tuple[dict[str, Any], str]:
    """The body as a JSON request of ``endpoint``, and its model; 400 naming the field otherwise."""
    if not body:
        raise BadRequest("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        payload = _decode(body.decode("utf-8"))
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # NaN and Infinity too: they are not JSON
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "'model' is required: a string 'provider/model'", param="model", code="missing_model"
        )
    if not model.isascii():  # no model name is, and an unpaired surrogate cannot even be encoded
        raise BadRequest("'model' must be a 'provider/model' name", param="model", code="invalid_model")
    if endpoint in ("chat", "messages"):
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "'messages' must be a non-empty array", param="messages", code="invalid_messages"
            )
    elif endpoint == "completions":
        if not _text_or_texts(payload.get("prompt")):
            raise BadRequest("'prompt' must be a string or an array of strings", param="prompt")
    elif not _text_or_texts(payload.get("input")):
        raise BadRequest("'input' must be a non-empty string or array of strings", param="input")
    if not isinstance(payload.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    return payload, model


def _text_or_texts(value: object) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def read_facts(body: dict[str, Any], endpoint: str, header_data_class: str | None) -> BodyFacts:
    facts = BodyFacts()
    if header_data_class is not None:
        declared = header_data_class.strip().lower()
        if declared not in DATA_CLASSES:
            raise BadRequest(
                f"X-Phi-Data-Class must be one of {', '.join(DATA_CLASSES)}", code="invalid_data_class"
            )
        facts.data_class = declared
    facts.tools = _tool_names(body.get("tools")) + _tool_names(body.get("functions"))  # legacy functions too
    if body.get("web_search_options") is not None:  # OpenAI's built-in search: a tool under another name
        facts.tools.append(WEB_SEARCH)
    messages = body.get("messages")
    if isinstance(messages, list):
        facts.message_count = len(messages)
    # Every piece of text a model may read, from the fields the endpoint forwards (any other: 400).
    pieces = screened_text(body, endpoint)
    facts.text = "\n".join(pieces)  # complete: the policy engine bounds its own scan (and denies past it)
    facts.text_len = sum(len(piece) for piece in pieces)
    requested = [body.get(key) for key in ("max_tokens", "max_completion_tokens")]
    numbers = [n for n in requested if isinstance(n, int) and not isinstance(n, bool)]
    facts.max_tokens = max(numbers) if numbers else None  # both sent: the larger is what is at stake
    return facts


def apply_edits(body: dict[str, Any], *, model: str, drop_tools: list[str], max_tokens: int | None) -> None:
    """Write the Police phase's decisions into the body that is forwarded."""
    body["model"] = model
    if drop_tools:
        dropped = set(drop_tools)
        for field_name, choice in (("tools", "tool_choice"), ("functions", "function_call")):
            listed = body.get(field_name)
            if not isinstance(listed, list):
                continue
            kept = [tool for tool in listed if _tool_name(tool) not in dropped]
            if kept:
                body[field_name] = kept
            else:
                body.pop(field_name, None)
            if not kept or _tool_name(body.get(choice)) in dropped:  # the tool it forces, if any
                body.pop(choice, None)
    if WEB_SEARCH in drop_tools:
        body.pop("web_search_options", None)
    if max_tokens is not None:
        written = [key for key in ("max_tokens", "max_completion_tokens") if key in body]
        for key in written or ["max_tokens"]:
            body[key] = max_tokens


def _tool_names(tools: object) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    names = []
    for tool in tools:
        name = _tool_name(tool)
        if name is None:
            raise BadRequest("every tool needs exactly one name (a string)", param="tools")
        names.append(name)
    return names


def _tool_name(tool: object) -> str | None:
    """The one name a provider will call the tool by, in any shape: OpenAI's ``function.name`` and
    ``custom.name``, Anthropic's and the legacy functions' ``name``. A tool carrying two different names
    has none: the gateway would check one while the provider used the other."""
    if not isinstance(tool, dict):
        return None
    names: set[str] = set()
    for holder in (tool, tool.get("function"), tool.get("custom")):
        if isinstance(holder, dict) and "name" in holder:
            name = holder["name"]
            if not isinstance(name, str):
                return None
            names.add(name)
    return names.pop() if len(names) == 1 else None
