"""Turning generated token bytes into text that can be streamed at once: UTF-8 decoding and stop strings.

Owns: the incremental UTF-8 decoder (``Utf8Stream``), the stop-string scanner (``StopScanner``) and their
combination for one completion (``CompletionText``). Pure Python on bytes and str; no llama.cpp here, so
every rule is unit-tested with byte sequences.

Must never: hold back bytes that can no longer become valid UTF-8 (they leave at once as U+FFFD), hold
more than the three bytes of an unfinished character, or hold back text that cannot be the start of a
stop string. llama-cpp-python's own streaming breaks both rules; this module exists to keep them.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"

# Per lead byte: (sequence length, allowed range of the second byte). Unicode Table 3-7 (well-formed UTF-8):
# the narrower second-byte ranges exclude overlong forms, surrogates and code points above U+10FFFF.
_LEADS: dict[int, tuple[int, int, int]] = {}
for _b in range(0xC2, 0xE0):
    _LEADS[_b] = (2, 0x80, 0xBF)
for _b in range(0xE0, 0xF0):
    _LEADS[_b] = (3, 0x80, 0xBF)
for _b in range(0xF0, 0xF5):
    _LEADS[_b] = (4, 0x80, 0xBF)
_LEADS[0xE0] = (3, 0xA0, 0xBF)
_LEADS[0xED] = (3, 0x80, 0x9F)
_LEADS[0xF0] = (4, 0x90, 0xBF)
_LEADS[0xF4] = (4, 0x80, 0x8F)


def _unfinished_tail(buf: bytes) -> int:
    """Length of the tail of buf that is the valid beginning of a character still missing bytes (0..3)."""
    n = len(buf)
    for back in range(1, min(3, n) + 1):
        byte = buf[n - back]
        if byte & 0xC0 == 0x80:  # a continuation byte: the lead is further back
            continue
        lead = _LEADS.get(byte)
        if lead is None or back >= lead[0]:
            return 0  # ASCII, an invalid lead, or a character that is already complete
        if back >= 2 and not lead[1] <= buf[n - back + 1] <= lead[2]:
            return 0  # the second byte already rules every character out
        return back
    return 0


class Utf8Stream:
    """Incremental UTF-8 decoder that emits text as soon as it is decodable.

    Unlike an incremental decoder that waits for the next byte to judge a sequence, every byte that can no
    longer be part of a valid character is replaced (one U+FFFD per maximal invalid subpart, as
    ``bytes.decode(errors="replace")`` does) in the same call that received it.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def decode(self, data: bytes) -> str:
        buf = self._pending + data if self._pending else data
        keep = _unfinished_tail(buf)
        if keep:
            self._pending = buf[-keep:]
            buf = buf[:-keep]
        else:
            self._pending = b""
        return buf.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """The end of the stream: an unfinished character becomes U+FFFD."""
        buf, self._pending = self._pending, b""
        return buf.decode("utf-8", errors="replace")


class StopScanner:
    """Finds stop strings across piece boundaries, holding back only a tail that could still start one."""

    __slots__ = ("_held", "_longest", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached). After a stop, feed no more."""
        if not self._stops:
            return text, False
        buf = self._held + text
        first = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            self._held = ""
            return buf[:first], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The end of the stream without a stop: the held tail was ordinary text after all."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        # The longest suffix of buf that is a proper prefix of some stop string; it contains every shorter
        # one, so holding it back is enough for a match that starts here and ends in a later piece.
        for size in range(min(self._longest - 1, len(buf)), 0, -1):
            tail = buf[len(buf) - size :]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0


class CompletionText:
    """Bytes of generated tokens in, streamable text out, stop strings honoured (not included)."""

    __slots__ = ("_scanner", "_utf8", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._utf8 = Utf8Stream()
        self._scanner = StopScanner(stops)
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Text that may be sent now; nothing once a stop string was reached."""
        if self.stopped:
            return ""
        text = self._utf8.decode(data)
        if not text:
            return ""
        out, self.stopped = self._scanner.feed(text)
        return out

    def finish(self) -> str:
        """Everything still held at the end of the stream (nothing after a stop string)."""
        if self.stopped:
            return ""
        tail, self.stopped = self._scanner.feed(self._utf8.flush())
        return tail if self.stopped else tail + self._scanner.flush()
