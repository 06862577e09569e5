"""Token usage as the providers report it, and the incremental SSE scanner the adapters read streams with.

Owns: reading usage numbers out of OpenAI and Anthropic JSON bodies and SSE streams, and cutting an SSE
byte stream into whole events even when an event (or a CRLF) is split across network chunks.

It must never rewrite an event it does not have to (content chunks pass through byte for byte), never
parse an event that cannot carry usage, and never keep or log event content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from routes.result import Usage

# An object-valued "usage" key: OpenAI puts `"usage":null` in every chunk once include_usage is on, and
# those must not cost a JSON parse.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


class SSEScanner:
    """Cuts an SSE byte stream into whole events; the unfinished tail is held until its blank line arrives.

    Line endings are normalised to ``\\n`` (a lone ``\\r`` at the end of a chunk is held back, since it may be
    the first half of a CRLF), so every region returned ends with ``\\n\\n``.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Add ``chunk``; return the whole events it completed (maybe ``b""``), each ending in "\\n\\n"."""
        data = self._pending + chunk if self._pending else chunk
        hold = b""
        if b"\r" in data:
            if data.endswith(b"\r"):
                data, hold = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data + hold
            return b""
        cut += 2
        self._pending = data[cut:] + hold
        return data[:cut]

    def flush(self) -> bytes:
        """The unfinished tail at the end of the stream (an event without its blank line), if any."""
        rest, self._pending = self._pending, b""
        return rest.replace(b"\r", b"\n") if rest.strip() else b""


def split_events(region: bytes) -> list[bytes]:
    """The events of a region returned by ``SSEScanner.feed``, each without its trailing blank line."""
    return [event for event in region.split(b"\n\n") if event.strip(b"\n")]


def event_fields(event: bytes) -> tuple[str, bytes]:
    """(event name or "", data lines joined with ``\\n``) of one event; comments and other fields skipped."""
    name = ""
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def openai_usage(obj: Mapping[str, Any], usage: Usage) -> bool:
    """Copy an OpenAI ``usage`` object (prompt/completion tokens) into ``usage``; False when there is none."""
    found = obj.get("usage")
    if not isinstance(found, dict):
        return False
    usage.tokens_in = _count(found.get("prompt_tokens"))
    usage.tokens_out = _count(found.get("completion_tokens"))
    usage.reported = True
    return True


def _anthropic_input(found: Mapping[str, Any]) -> int:
    # Cache writes and reads are prompt tokens too (OpenAI's prompt_tokens includes cached ones).
    return (
        _count(found.get("input_tokens"))
        + _count(found.get("cache_creation_input_tokens"))
        + _count(found.get("cache_read_input_tokens"))
    )


def anthropic_usage(obj: Mapping[str, Any], usage: Usage) -> bool:
    """Copy an Anthropic Messages ``usage`` object into ``usage``; False when there is none."""
    found = obj.get("usage")
    if not isinstance(found, dict):
        return False
    usage.tokens_in = _anthropic_input(found)
    usage.tokens_out = _count(found.get("output_tokens"))
    usage.reported = True
    return True


def anthropic_event_usage(event_type: str, obj: Mapping[str, Any], usage: Usage) -> None:
    """Update ``usage`` from one Anthropic stream event: input from ``message_start``, output (cumulative)
    from ``message_delta``, which newer API versions also give the final input counts in."""
    if event_type == "message_start":
        message = obj.get("message")
        if isinstance(message, dict):
            anthropic_usage(message, usage)
    elif event_type == "message_delta":
        found = obj.get("usage")
        if isinstance(found, dict):
            usage.tokens_out = _count(found.get("output_tokens"))
            if "input_tokens" in found and found["input_tokens"] is not None:
                usage.tokens_in = _anthropic_input(found)
            usage.reported = True


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def filter_openai_sse(region: bytes, usage: Usage, *, keep_usage_chunk: bool) -> bytes:
    """Pass a region of OpenAI ``chat.completion.chunk`` events through, recording any usage they carry.

    The usage-only chunk (empty ``choices`` plus ``usage``) the gateway asked for is dropped unless the caller
    asked for it too. Regions without an object-valued ``usage`` come back as the same bytes object.
    """
    if _USAGE_OBJECT.search(region) is None:
        return region
    out: list[bytes] = []
    for event in split_events(region):
        if _USAGE_OBJECT.search(event) is not None:
            obj = _json_object(event_fields(event)[1])
            if (
                obj is not None
                and openai_usage(obj, usage)
                and not keep_usage_chunk
                and not obj.get("choices")
            ):
                continue
        out.append(event)
        out.append(b"\n\n")
    return b"".join(out)


def scan_anthropic_sse(region: bytes, usage: Usage) -> None:
    """Record the usage carried by a region of Anthropic Messages events (parses only events with usage)."""
    if b'"usage"' not in region:
        return
    for event in split_events(region):
        if b'"usage"' not in event:
            continue
        name, data = event_fields(event)
        obj = _json_object(data)
        if obj is not None:
            anthropic_event_usage(name or str(obj.get("type", "")), obj, usage)
