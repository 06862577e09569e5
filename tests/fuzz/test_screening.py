"""Fuzz: JSON -> request facts -> what is forwarded. The property of issue 10, class 1: no string that
leaves the gateway escapes screening.

Bodies are drawn from the fields each endpoint forwards, filled with arbitrary JSON in which marked
strings (and object keys) are planted anywhere, structural keys included. For every body the Police phase
accepts, each planted marker that is still in the forwarded body (after the edits) must be in the text
the deny patterns scan. Bodies it refuses must be refused with ``BadRequest``, nothing else.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from appliance.errors import BadRequest
from appliance.pipeline.facts import apply_edits, parse_request, read_facts
from appliance.pipeline.forwarding import FIELDS

MARK = "zq"  # planted in generated strings; no wire keyword contains it

_keys = st.sampled_from(
    ["role", "type", "id", "content", "text", "name", "description", "url", "data", "input", "properties",
     "tool_call_id", "detail", "media_type", "function", "arguments", "enum", f"{MARK}key", "items",
     "signature", "format", "source"]
)  # fmt: skip
_strings = st.one_of(
    st.sampled_from(
        ["user", "assistant", "system", "text", "function", "auto", "image/png", "text/plain", "wav"]
    ),
    st.text(max_size=12).map(lambda s: f"{MARK}{s}"),
    st.from_regex(r"[a-z_]{1,10}", fullmatch=True).map(lambda s: f"{MARK}{s}"),
)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=25,
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    endpoint = draw(st.sampled_from(["chat", "messages", "completions", "embeddings"]))
    names = draw(st.lists(st.sampled_from(sorted(FIELDS[endpoint])), max_size=6, unique=True))
    body: dict[str, Any] = {name: draw(_json) for name in names if name != "model"}
    body["model"] = "openai/gpt-4o"
    if endpoint in ("chat", "messages"):
        body["messages"] = draw(st.lists(_json, min_size=1, max_size=3))
    elif endpoint == "completions":
        body["prompt"] = draw(_strings)
    else:
        body["input"] = draw(_strings)
    if draw(st.booleans()):
        body[f"{MARK}extra"] = draw(_json)  # not a parameter of any endpoint
    return endpoint, body


def _planted(value: Any) -> list[str]:
    """Every string and key in ``value`` that carries the marker, but base64 media (the one documented
    exception: the ``data`` of a source whose ``media_type`` is an image or audio type, or of an audio
    input with a ``format``)."""
    found: list[str] = []
    if isinstance(value, str):
        found += [value] if MARK in value else []
    elif isinstance(value, list):
        for item in value:
            found += _planted(item)
    elif isinstance(value, dict):
        media = value.get("media_type")
        for key, item in value.items():
            found += [key] if MARK in key else []
            if key == "data" and (
                (isinstance(media, str) and media.startswith(("image/", "audio/")))
                or value.get("format") == "wav"
            ):
                continue
            found += _planted(item)
    return found


@given(bodies())
@example(("messages", {"model": "openai/gpt-4o", "messages": [None], "tools": [{"role": None, "name": []}]}))
def test_no_forwarded_string_escapes_screening(case: tuple[str, dict[str, Any]]) -> None:
    endpoint, body = case
    raw = json.dumps(body).encode()
    try:
        payload, _ = parse_request(raw, endpoint)
        facts = read_facts(payload, endpoint, None)
    except BadRequest:
        return  # refused with a 400: nothing is forwarded
    apply_edits(payload, model="gpt-4o", drop_tools=[], max_tokens=None)
    for text in _planted(payload):
        assert text in facts.text, text


@given(st.binary(max_size=256) | st.text(max_size=256).map(str.encode))
def test_arbitrary_bytes_are_parsed_or_refused_with_a_400(raw: bytes) -> None:
    for endpoint in ("chat", "messages", "completions", "embeddings"):
        try:
            payload, _ = parse_request(raw, endpoint)
            read_facts(payload, endpoint, None)
        except BadRequest:
            pass
