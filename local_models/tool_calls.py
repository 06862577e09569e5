"""The model's text back into OpenAI tool calls, as it streams: the ``<tool_call>`` blocks parsed out.

Owns: ``ToolCallParser`` (text pieces in, content and tool-call events out, whatever the pieces'
boundaries), the events (``ContentText``, ``CallStarted``, ``CallArguments``) and ``assemble`` (the events
as OpenAI's content and ``tool_calls``). The syntax, the definitions and the grammar are ``tools``'.

Must never: hold back more than a call's head and closing suffix, so a stream shows arguments as they are
written; or let markup of a call reach the content.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from local_models.tools import CALL_CLOSE, CALL_OPEN


@dataclass(frozen=True, slots=True)
class ContentText:
    text: str


@dataclass(frozen=True, slots=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str


Event = ContentText | CallStarted | CallArguments
_State = Literal["text", "head", "arguments", "tail"]
_WS = " \t\n\r"
_HELD_SPACE = 256
"""Most trailing whitespace held back as a possible separator before a call; past it, it is content."""
_HEAD_LIMIT = 512
"""Longest call head (``{"name": "...", "arguments": ``) or closing suffix read before giving up."""
_HEAD = ("{", '"name"', ":", None, ",", '"arguments"', ":")
_NAME_STRING = re.compile(r'"([A-Za-z0-9_-]{1,64})"')
_NAME_PREFIX = re.compile(r'"[A-Za-z0-9_-]{0,64}\Z')


class ToolCallParser:
    """Text pieces in, content and tool-call events out, whatever the pieces' boundaries.

    Text outside calls is content, less the whitespace just before a call (a separator). A call's first
    event (``CallStarted``) comes once its head (``{"name": "<name>", "arguments":``) is read whole; its
    arguments follow as they arrive, up to the
    brace that closes them; the closing ``}`` and ``CALL_CLOSE`` are never shown. Text that breaks the
    syntax (only possible when generation was cut, by ``stop`` say) is content from there on. At
    ``finish`` a call cut before its head was complete is dropped; one cut in its arguments keeps the
    arguments written so far."""

    def __init__(self) -> None:
        self.calls = 0
        """Calls started so far."""
        self._state: _State = "text"
        self._buffer = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._begun = False  # the arguments' first character has been read

    @property
    def inside_call(self) -> bool:
        """A call is open: its head or arguments are not complete."""
        return self._state in ("head", "arguments")

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self._buffer += text
        while self._step(events):
            pass
        return _merged(events)

    def finish(self) -> list[Event]:
        """What was held back at the end: whitespace and a partial ``CALL_OPEN`` are content before any
        call, and after one only the start of another call's separator (dropped)."""
        events: list[Event] = []
        if self._state == "text" and self._buffer and not self.calls:
            events.append(ContentText(self._buffer))
        self._buffer = ""
        return events

    def _step(self, out: list[Event]) -> bool:
        """Consume what the buffer allows in the current state; True if the state changed."""
        if self._state == "text":
            return self._text(out)
        if self._state == "head":
            return self._head(out)
        if self._state == "arguments":
            return self._arguments(out)
        return self._tail(out)

    def _text(self, out: list[Event]) -> bool:
        buffer = self._buffer
        at = buffer.find(CALL_OPEN)
        if at >= 0:
            before = buffer[:at].rstrip(_WS)
            if before:
                out.append(ContentText(before))
            self._buffer = buffer[at + len(CALL_OPEN) :]
            self._state = "head"
            return True
        keep = len(buffer) - _partial_suffix(buffer, CALL_OPEN)
        floor = max(0, keep - _HELD_SPACE)
        while keep > floor and buffer[keep - 1] in _WS:
            keep -= 1
        if keep:
            out.append(ContentText(buffer[:keep]))
            self._buffer = buffer[keep:]
        return False

    def _head(self, out: list[Event]) -> bool:
        status, name, end = _read_head(self._buffer)
        if status == "partial" and len(self._buffer) <= _HEAD_LIMIT:
            return False
        if status != "done":
            out.append(ContentText(CALL_OPEN))
            self._state = "text"
            return True
        out.append(CallStarted(self.calls, "call_" + secrets.token_hex(12), name))
        self.calls += 1
        self._buffer = self._buffer[end:]
        self._state = "arguments"
        self._depth, self._in_string, self._escaped, self._begun = 0, False, False, False
        return True

    def _arguments(self, out: list[Event]) -> bool:
        buffer, i = self._buffer, 0
        if not self._begun:
            while i < len(buffer) and buffer[i] in _WS:
                i += 1
            if i == len(buffer):
                self._buffer = ""
                return False
            if buffer[i] not in "{[":
                self._buffer = buffer[i:]
                self._state = "text"
                return True
            self._begun = True
        start, end = i, None
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        while i < len(buffer):
            c = buffer[i]
            i += 1
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    end = i
                    break
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        stop = len(buffer) if end is None else end
        if stop > start:
            out.append(CallArguments(self.calls - 1, buffer[start:stop]))
        self._buffer = buffer[stop:]
        if end is None:
            return False
        self._state = "tail"
        return True

    def _tail(self, out: list[Event]) -> bool:
        buffer, i = self._buffer, 0
        for part in ("}", CALL_CLOSE):
            while i < len(buffer) and buffer[i] in _WS:
                i += 1
            rest = buffer[i:]
            if rest.startswith(part):
                i += len(part)
                continue
            if part.startswith(rest) and len(buffer) <= _HEAD_LIMIT:
                return False
            self._state = "text"  # not the closing suffix: what follows is content
            return True
        self._buffer = buffer[i:]
        self._state = "text"
        return True


def _read_head(buffer: str) -> tuple[Literal["partial", "done", "bad"], str, int]:
    """Read ``{"name": "<name>", "arguments":`` (JSON whitespace between tokens) from the start."""
    i, name = 0, ""
    for part in _HEAD:
        while i < len(buffer) and buffer[i] in _WS:
            i += 1
        if i == len(buffer):
            return "partial", "", 0
        if part is None:
            match = _NAME_STRING.match(buffer, i)
            if match is not None:
                name, i = match.group(1), match.end()
                continue
            return ("partial" if _NAME_PREFIX.match(buffer, i) else "bad"), "", 0
        if buffer.startswith(part, i):
            i += len(part)
            continue
        return ("partial" if part.startswith(buffer[i:]) else "bad"), "", 0
    return "done", name, i


def _partial_suffix(text: str, word: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``word``."""
    for size in range(min(len(word) - 1, len(text)), 0, -1):
        if word.startswith(text[-size:]):
            return size
    return 0


def _merged(events: list[Event]) -> list[Event]:
    """Neighbouring content, or neighbouring arguments of one call, as one event."""
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, ContentText) and isinstance(last, ContentText):
            merged[-1] = ContentText(last.text + event.text)
        elif (
            isinstance(event, CallArguments) and isinstance(last, CallArguments) and last.index == event.index
        ):
            merged[-1] = CallArguments(event.index, last.text + event.text)
        else:
            merged.append(event)
    return merged


def assemble(events: list[Event]) -> tuple[str, list[dict[str, Any]]]:
    """The content and the OpenAI ``tool_calls`` (arguments as a JSON string) that ``events`` spell."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ContentText):
            content.append(event.text)
        elif isinstance(event, CallStarted):
            calls.append(
                {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
            )
        else:
            calls[event.index]["function"]["arguments"] += event.text
    return "".join(content), calls
