"""What the Police phase needs to know about a request body, read once, in both wire formats.

Owns: reading, from an OpenAI (chat/completions, completions, embeddings) or Anthropic (messages) body and
the ``X-Phi-Data-Class`` header, the declared data class, the tool names, the message count, the message
text (for deny patterns) and the requested ``max_tokens``; and applying the Police phase's edits
back to the body (tools dropped, ``max_tokens`` clamped, the model replaced).
Never: keeps or logs the text it reads (it lives only as long as the request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.errors import BadRequest

DATA_CLASSES = ("phi", "deidentified", "public")


@dataclass(slots=True)
class BodyFacts:
    data_class: str | None = None
    tools: list[str] = field(default_factory=list)
    message_count: int = 0
    text_len: int = 0
    text: str = ""
    max_tokens: int | None = None


def read_facts(body: dict[str, Any], header_data_class: str | None) -> BodyFacts:
    facts = BodyFacts()
    if header_data_class is not None:
        declared = header_data_class.strip().lower()
        if declared not in DATA_CLASSES:
            raise BadRequest(
                f"X-Phi-Data-Class must be one of {', '.join(DATA_CLASSES)}", code="invalid_data_class"
            )
        facts.data_class = declared
    facts.tools = _tool_names(body.get("tools"))
    pieces: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        facts.message_count = len(messages)
        if isinstance(body.get("system"), str):  # Anthropic's system prompt is text the rules apply to
            pieces.append(body["system"])
        for message in messages:
            if isinstance(message, dict):
                _collect_text(message.get("content"), pieces)
    for name in ("prompt", "input"):
        _collect_text(body.get(name), pieces)
    facts.text = "\n".join(pieces)  # complete: the policy engine bounds its own scan (and denies past it)
    facts.text_len = sum(len(piece) for piece in pieces)
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    facts.max_tokens = requested if isinstance(requested, int) and not isinstance(requested, bool) else None
    return facts


def apply_edits(body: dict[str, Any], *, model: str, drop_tools: list[str], max_tokens: int | None) -> None:
    """Write the Police phase's decisions into the body that is forwarded."""
    body["model"] = model
    if drop_tools and isinstance(body.get("tools"), list):
        dropped = set(drop_tools)
        kept = [tool for tool in body["tools"] if _tool_name(tool) not in dropped]
        if kept:
            body["tools"] = kept
        else:
            body.pop("tools", None)
            body.pop("tool_choice", None)
    if max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
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
            raise BadRequest("every tool needs a name", param="tools")
        names.append(name)
    return names


def _tool_name(tool: object) -> str | None:
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return str(function["name"])  # OpenAI: {"type": "function", "function": {"name": ...}}
    name = tool.get("name")  # Anthropic: {"name": ..., "input_schema": ...}
    return name if isinstance(name, str) else None


def _collect_text(content: object, pieces: list[str]) -> None:
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
