"""Names in a policy are what they seem: a trailing line break no longer passes a ``$``-anchored pattern
(issue 10, class 6: on main ``openai/gpt-4o\\n`` passed as a pricing key and as a requested model)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.policy.schema import Policy, split_model
from tests.support.gateway import policy_doc


def _rename(section: Callable[[dict[str, Any]], dict[str, Any]], old: str, new: str) -> Callable[..., None]:
    def edit(doc: dict[str, Any]) -> None:
        table = section(doc)
        table[new] = table.pop(old)

    return edit


EDITS = {
    "role": _rename(lambda d: d["organizations"]["stmarys"]["roles"], "billing", "billing\n"),
    "route": _rename(lambda d: d["routes"], "local", "local\n"),
    "organization": _rename(lambda d: d["organizations"], "stmarys", "stmarys\n"),
    "pricing": _rename(lambda d: d["pricing"], "openai/gpt-4o", "openai/gpt-4o\n"),
    "alias": lambda d: d.update(aliases={"summary\n": "openai/gpt-4o"}),
    "alias target": lambda d: d.update(aliases={"summary": "openai/gpt-4o\n"}),
    "model glob": lambda d: d["organizations"]["stmarys"]["roles"]["billing"].update(models=["openai/gpt\n"]),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_name_with_a_trailing_line_break_is_refused(case: str) -> None:
    doc = copy.deepcopy(policy_doc("http://127.0.0.1:9"))
    EDITS[case](doc)
    with pytest.raises(ValidationError):
        Policy.model_validate_json(json.dumps(doc))


@pytest.mark.parametrize("model", ["openai/gpt-4o\n", "openai\n/gpt-4o", "openai/gpt-4o\r", " openai/gpt-4o"])
def test_a_requested_model_with_a_line_break_is_no_model_name(model: str) -> None:
    assert split_model(model) is None
