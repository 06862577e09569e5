"""Token usage as the providers report it, and the incremental SSE scanner the adapters read streams with.

Owns: reading usage numbers out of OpenAI and Anthropic JSON bodies and SSE streams, and cutting an SSE
byte stream into whole events even when an event (or a CRLF) is split across network chunks.

It must never rewrite an event it does not have to (content chunks pass through byte for byte), never
keep or log event content. Each event is parsed once to check it is a JSON object (``check_events``): a
stream of garbage under a 200 is an upstream failure, not an answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from appliance.errors import UpstreamError
from routes.result import Usage

# An object-valued "usage" key: OpenAI puts `"usage":null` in every chunk once include_usage is on, and
# those must not cost a JSON parse.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# The longest unfinished event held: real events are a few KiB; a provider's bug must not grow memory.
MAX_EVENT = 1024 * 1024


class SSEScanner:
    """Cuts an SSE byte stream into whole events; the unfinished tail is held until its blank line arrives.

    Line endings are normalised to ``\\n`` (a lone ``\\r`` at the end of a chunk is held back, since it may be
    the first half of a CRLF), so every region returned ends with ``\\n\\n``. Each chunk is searched once:
    the held tail is kept as parts and joined only when its event completes, so a slow drip of bytes costs
    linear time. An unfinished event over ``MAX_EVENT`` bytes raises ``UpstreamError``.
    """

    __slots__ = ("_cr", "_parts", "_route", "_size")

    def __init__(self, route: str) -> None:
        self._route = route
        self._parts: list[bytes] = []  # the unfinished event, normalised, in arrival order
        self._size = 0
        self._cr = False  # a "\r" ended the last chunk

    def feed(self, chunk: bytes) -> bytes:
        """Add ``chunk``; return the whole events it completed (maybe ``b""``), each ending in "\\n\\n"."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = chunk.rfind(b"\n\n")
        if cut >= 0:
            cut += 2
        elif chunk.startswith(b"\n") and self._parts and self._parts[-1].endswith(b"\n"):
            cut = 1  # the blank line was split across chunks
        else:
            self._hold(chunk)
            return b""
        parts, self._parts, self._size = self._parts, [], 0
        self._hold(chunk[cut:])
        if not parts:
            return chunk[:cut]
        parts.append(chunk[:cut])
        return b"".join(parts)

    def flush(self) -> bytes:
        """The unfinished tail at the end of the stream (an event without its blank line), if any."""
        rest = b"".join(self._parts) + (b"\n" if self._cr else b"")
        self._parts, self._size, self._cr = [], 0, False
        return rest if rest.strip() else b""

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size > MAX_EVENT:
            raise UpstreamError(f"upstream {self._route} sent an oversized event")


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


def check_events(region: bytes, route: str, *, done_marker: bool) -> None:
    """Every event of ``region`` must carry a JSON object (or OpenAI's ``[DONE]`` when ``done_marker``), or be
    data-less (a comment, a keep-alive): an upstream that streams garbage has failed, even under a 200, and
    must not be relayed and recorded as a success. Raises ``UpstreamError``; never looks at the content."""
    for event in split_events(region):
        data = event_fields(event)[1]
        if not data or (done_marker and data == b"[DONE]"):
            continue
        if parse_object(data) is None:
            raise UpstreamError(f"upstream {route} sent a stream event that is not a JSON object")


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


def parse_object(data: bytes | str) -> dict[str, Any] | None:
    """``data`` as a JSON object; None for anything else: not JSON (invalid UTF-8 included), another JSON
    type, or nesting deep enough to exhaust the decoder's stack. The one parser for what a provider (or a
    caller's tool-call arguments) sends, so no such input can raise past a route."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
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
            obj = parse_object(event_fields(event)[1])
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
        obj = parse_object(data)
        if obj is not None:
            anthropic_event_usage(name or str(obj.get("type", "")), obj, usage)
