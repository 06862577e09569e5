"""Fuzzing the SSE usage scanner (``routes.usage``): chunk splits change nothing; junk raises nothing.

Properties: a valid OpenAI or Anthropic event stream, with any line endings, comments and field spellings
the SSE spec allows, cut into chunks at arbitrary points (inside a CRLF, inside a blank line, one byte at
a time), gives the same events, the same passed-through bytes and the same usage as the stream fed whole,
and that usage is what the stream reported. Arbitrary bytes in arbitrary chunks raise nothing but the
project's ``UpstreamError`` (an oversized event).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.errors import UpstreamError
from routes.result import Usage
from routes.usage import (
    SSEScanner,
    event_fields,
    filter_openai_sse,
    scan_anthropic_sse,
    split_events,
)
from tests.fuzz._profile import examples

pytestmark = pytest.mark.fuzz

newlines = st.sampled_from([b"\n", b"\r\n", b"\r"])
counts = st.integers(0, 10**9)
texts = st.text(max_size=30)


@st.composite
def event_bytes(draw: st.DrawFn, data: bytes, name: str | None = None) -> bytes:
    """One SSE event carrying ``data`` (a single line), spelled any way the SSE spec allows."""
    nl = draw(newlines)
    lines: list[bytes] = []
    if draw(st.booleans()):
        lines.append(b": " + draw(st.sampled_from([b"ping", b"keep-alive", b""])))
    if name is not None:
        lines.append(b"event:" + draw(st.sampled_from([b" ", b""])) + name.encode())
    lines.append(b"data:" + draw(st.sampled_from([b" ", b""])) + data)
    if draw(st.booleans()):
        lines.append(b"id: " + str(draw(st.integers(0, 99))).encode())
    return nl.join(lines) + nl + nl


def _dumps(obj: Any) -> bytes:
    # JSON never holds a raw CR or LF, so one event's data is one line.
    return json.dumps(obj, separators=(",", ":")).encode()


@st.composite
def openai_streams(draw: st.DrawFn) -> tuple[bytes, Usage, bool]:
    """(an OpenAI chat.completion.chunk stream, the usage it reports, keep the usage chunk)."""
    usage_null = draw(st.booleans())  # include_usage on: every chunk carries "usage": null
    events = []
    for piece in draw(st.lists(texts, max_size=6)):
        chunk: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        if usage_null:
            chunk["usage"] = None
        events.append(draw(event_bytes(_dumps(chunk))))
    expected = Usage()
    if draw(st.booleans()):
        expected = Usage(draw(counts), draw(counts), True)
        final = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": expected.tokens_in, "completion_tokens": expected.tokens_out},
        }
        events.append(draw(event_bytes(_dumps(final))))
    events.append(draw(event_bytes(b"[DONE]")))
    return b"".join(events), expected, draw(st.booleans())


@st.composite
def anthropic_streams(draw: st.DrawFn) -> tuple[bytes, Usage]:
    """(an Anthropic Messages event stream, the usage it reports)."""
    tokens_in, cache_read, tokens_out = draw(counts), draw(counts), draw(counts)

    def ev(name: str, obj: dict[str, Any]) -> bytes:
        return draw(event_bytes(_dumps({"type": name, **obj}), name))

    parts = [
        ev(
            "message_start",
            {
                "message": {
                    "id": "msg_1",
                    "role": "assistant",
                    "content": [],
                    "usage": {"input_tokens": tokens_in, "output_tokens": 1},
                }
            },
        ),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    for piece in draw(st.lists(texts, max_size=5)):
        # A text that mentions "usage" must not be taken for usage.
        parts.append(ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}}))
    parts.append(ev("content_block_stop", {"index": 0}))
    delta_usage: dict[str, Any] = {"output_tokens": tokens_out}
    expected_in = tokens_in
    if draw(st.booleans()):  # newer API versions repeat the final input counts here
        delta_usage.update(input_tokens=tokens_in, cache_read_input_tokens=cache_read)
        expected_in = tokens_in + cache_read
    parts.append(ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": delta_usage}))
    parts.append(ev("message_stop", {}))
    return b"".join(parts), Usage(expected_in, tokens_out, True)


@st.composite
def splits(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """``stream`` cut at arbitrary points, with a bias to the places that matter: around CR and LF."""
    if draw(st.integers(0, 9)) == 0:
        return [stream[i : i + 1] for i in range(len(stream))]
    special = [i for i, b in enumerate(stream) if b in b"\r\n"]
    cuts = draw(
        st.lists(
            st.one_of(st.integers(0, len(stream)), st.sampled_from(special or [0]).map(lambda i: i + 1)),
            max_size=40,
        )
    )
    points = sorted({0, len(stream), *cuts})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def _run_openai(chunks: list[bytes], keep: bool) -> tuple[bytes, Usage, list[bytes]]:
    scanner, usage, out = SSEScanner("openai"), Usage(), []
    for chunk in chunks:
        out.append(filter_openai_sse(scanner.feed(chunk), usage, keep_usage_chunk=keep))
    tail = scanner.flush()
    if tail:
        out.append(filter_openai_sse(tail + b"\n\n", usage, keep_usage_chunk=keep))
    passed = b"".join(out)
    return passed, usage, split_events(passed)


def _run_anthropic(chunks: list[bytes]) -> tuple[Usage, list[tuple[str, bytes]]]:
    scanner, usage, events = SSEScanner("anthropic"), Usage(), []
    for chunk in [*chunks, None]:
        region = scanner.feed(chunk) if chunk is not None else scanner.flush() + b"\n\n"
        scan_anthropic_sse(region, usage)
        events.extend(event_fields(e) for e in split_events(region))
    return usage, events


@examples(200)
@given(data=st.data(), case=openai_streams())
def test_openai_usage_does_not_depend_on_chunking(
    data: st.DataObject, case: tuple[bytes, Usage, bool]
) -> None:
    stream, expected, keep = case
    whole = _run_openai([stream], keep)
    split = _run_openai(data.draw(splits(stream), label="chunks"), keep)
    assert split == whole
    _passed, usage, events = whole
    assert usage == expected
    assert event_fields(events[-1])[1] == b"[DONE]"
    usage_chunks = [e for e in events if b'"choices":[]' in e]
    assert len(usage_chunks) == (1 if keep and expected.reported else 0)


@examples(200)
@given(data=st.data(), case=anthropic_streams())
def test_anthropic_usage_does_not_depend_on_chunking(data: st.DataObject, case: tuple[bytes, Usage]) -> None:
    stream, expected = case
    whole = _run_anthropic([stream])
    split = _run_anthropic(data.draw(splits(stream), label="chunks"))
    assert split == whole
    assert whole[0] == expected
    assert [name for name, _ in whole[1]][-1] == "message_stop"


junk = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\n", b"data: ", b'"usage":{', b"event: message_delta"]),
        st.builds(lambda v: b"data: " + json.dumps(v).encode() + b"\n\n", st.from_type(object).map(str)),
        st.builds(
            lambda name, usage: b"event: " + name + b"\ndata: " + usage + b"\n\n",
            st.sampled_from([b"message_start", b"message_delta", b"x"]),
            st.sampled_from(
                [
                    b'{"usage":{"input_tokens":"7","output_tokens":-1}}',
                    b'{"usage":{"output_tokens":true,"input_tokens":null}}',
                    b'{"message":{"usage":[]},"usage":{"prompt_tokens":1e400}}',
                    b'{"usage":{}, "choices":[]}',
                    b'{"usage":{"cache_read_input_tokens":{}}}',
                    b"[1,2]",
                ]
            ),
        ),
    ),
    max_size=20,
)


@examples(200)
@given(chunks=junk, keep=st.booleans())
@example(chunks=[b"\r", b"\n\r", b"\n"], keep=False)
def test_arbitrary_bytes_raise_only_project_errors(chunks: list[bytes], keep: bool) -> None:
    for run in (lambda: _run_openai(chunks, keep), lambda: _run_anthropic(chunks)):
        try:
            result = run()
        except UpstreamError:
            continue
        usage = result[1] if isinstance(result, tuple) and len(result) == 3 else result[0]
        assert isinstance(usage, Usage) and usage.tokens_in >= 0 and usage.tokens_out >= 0
