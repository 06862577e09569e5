"""A stream of garbage under a 200 is an upstream failure (found by ``./dev faults``, row garbage-sse: the
gateway relayed it byte for byte and recorded a success)."""

from __future__ import annotations

import pytest

from appliance.errors import UpstreamError
from routes.usage import check_events

GOOD = b'data: {"choices":[]}\n\n: keep-alive\n\nevent: ping\ndata: {"type":"ping"}\n\n'


def test_json_objects_comments_and_done_pass() -> None:
    check_events(GOOD + b"data: [DONE]\n\n", "openai", done_marker=True)
    check_events(GOOD, "anthropic", done_marker=False)


@pytest.mark.parametrize(
    "event",
    [
        b"data: {not json at all\n\n",
        b"data: \xff\xfe\x00binary\n\n",
        b"data: [1, 2]\n\n",
        b"data: NaNx\n\n",
        b"data: " + b"[" * 100_000 + b"\n\n",
    ],
)
def test_an_event_that_is_not_a_json_object_is_an_upstream_failure(event: bytes) -> None:
    with pytest.raises(UpstreamError, match="not a JSON object"):
        check_events(GOOD + event, "openai", done_marker=True)


def test_done_is_no_event_on_anthropic_streams() -> None:
    with pytest.raises(UpstreamError):
        check_events(b"data: [DONE]\n\n", "anthropic", done_marker=False)
