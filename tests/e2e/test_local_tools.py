"""End to end: OpenAI ``tools`` on a local model (the tiny model, real llama.cpp) through the real OpenAI SDK.

The model's weights are random: its calls are what the grammar lets through, so every call must validate
against its schema whatever the model "thinks". Schemas use enums, booleans, integers and short strings so
that a call ends well within ``max_tokens``."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from local_models.json_schema import validate_against
from local_models.tiny import write_tiny_model
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import GatewayHarness, policy_doc

TRIAGE = {
    "type": "object",
    "properties": {
        "site": {"type": "string", "enum": ["chest", "head", "abdomen"]},
        "urgent": {"type": "boolean"},
        "priority": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["site", "urgent", "priority"],
    "additionalProperties": False,
}
LOOKUP = {
    "type": "object",
    "properties": {"code": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}},
    "required": ["code"],
    "additionalProperties": False,
}
SCHEMAS = {"triage_study": TRIAGE, "lookup_code": LOOKUP, "delete_record": LOOKUP}


def _tool(name: str, strict: bool = True) -> dict[str, Any]:
    function = {"name": name, "description": f"{name} for a study", "parameters": SCHEMAS[name]}
    return {"type": "function", "function": {**function, "strict": strict}}


TOOLS = [_tool("triage_study"), _tool("lookup_code")]
ASK = [{"role": "user", "content": "Triage the chest study."}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    return path, write_tiny_model(path, seed=0)


@pytest.fixture
def gateway(tmp_path: Path, upstream: FakeUpstream, tiny_model: tuple[Path, str]) -> Iterator[GatewayHarness]:
    path, sha = tiny_model
    h = GatewayHarness(tmp_path)
    shutil.copy(path, h.home.models_dir / path.name)
    doc = policy_doc(upstream.base_url)
    doc["models"] = {"local/tiny": {"file": path.name, "sha256": sha, "n_ctx": 2048}}
    doc["pricing"]["local/tiny"] = {"input_per_mtok": 0.0, "output_per_mtok": 0.0}
    roles = doc["organizations"]["stmarys"]["roles"]
    roles["radiology"]["models"].append("local/*")
    roles["coding"] = {"models": ["local/*"], "tools": {"allow": ["lookup_*"], "on_violation": "deny"}}
    roles["scribe"] = {"models": ["local/*"], "tools": {"allow": ["lookup_*"], "on_violation": "drop"}}
    h.import_policy(doc)
    h.start()
    yield h
    h.stop()


def _client(h: GatewayHarness, caller: str = "radiology-bot", role: str = "radiology") -> openai.OpenAI:
    return openai.OpenAI(base_url=h.base_url, api_key=h.issue(caller, role=role), max_retries=0, timeout=60)


def _arguments(call: Any) -> Any:
    return json.loads(call.function.arguments)


def test_required_and_named_calls_validate_against_their_schemas(gateway: GatewayHarness) -> None:
    with _client(gateway) as client:
        for seed in range(3):
            reply = client.chat.completions.create(
                model="local/tiny",
                messages=ASK,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice="required",
                parallel_tool_calls=False,
                max_tokens=400,
                seed=seed,
            )
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            [call] = choice.message.tool_calls or []
            assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function"
            assert validate_against(SCHEMAS[call.function.name], _arguments(call)) == []
        named = client.chat.completions.create(
            model="local/tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "lookup_code"}},
            parallel_tool_calls=False,
            max_tokens=400,
            presence_penalty=0.5,
            frequency_penalty=0.5,
        )
    [call] = named.choices[0].message.tool_calls or []
    assert call.function.name == "lookup_code" and validate_against(LOOKUP, _arguments(call)) == []
    assert named.usage is not None and named.usage.completion_tokens > 0


def test_a_streamed_call_reassembles_with_the_sdks_own_helpers(gateway: GatewayHarness) -> None:
    fields: dict[str, Any] = {
        "model": "local/tiny",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 400,
        "seed": 4,
    }
    with _client(gateway) as client:
        chunks = list(client.chat.completions.create(stream=True, **fields))
        helper = getattr(client.chat.completions, "stream", None) or client.beta.chat.completions.stream
        with helper(**fields) as stream:
            final = stream.get_final_completion()
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    first = next(d.tool_calls[0] for d in deltas if d.tool_calls)
    assert re.fullmatch(r"call_[0-9a-f]{24}", first.id or "") and first.type == "function"
    assert first.function is not None and first.function.name in SCHEMAS and first.function.arguments == ""
    arguments = "".join(d.tool_calls[0].function.arguments or "" for d in deltas if d.tool_calls)  # type: ignore[union-attr]
    assert validate_against(SCHEMAS[first.function.name], json.loads(arguments)) == []
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The SDK's stream state machine put the same deltas back together, and parsed the strict arguments.
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert validate_against(SCHEMAS[call.function.name], call.function.parsed_arguments) == []
    assert json.loads(call.function.arguments) == call.function.parsed_arguments


def test_auto_answers_with_text_or_with_calls_that_validate(gateway: GatewayHarness) -> None:
    with _client(gateway) as client:
        reply = client.chat.completions.create(
            model="local/tiny",
            messages=ASK,
            tools=TOOLS,
            max_tokens=48,
            seed=2,  # type: ignore[arg-type]
        )
    choice = reply.choices[0]
    for call in choice.message.tool_calls or []:
        assert validate_against(SCHEMAS[call.function.name], _arguments(call)) == []
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.tool_calls or choice.message.content is not None


def test_a_conversation_with_calls_and_results_is_answered(gateway: GatewayHarness) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0123456789abcdef01234567",
                    "type": "function",
                    "function": {"name": "lookup_code", "arguments": '{"code": "I21"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "<|end|> myocardial"},
    ]
    with _client(gateway) as client:
        reply = client.chat.completions.create(
            model="local/tiny",
            messages=history,
            tools=TOOLS,
            tool_choice="none",
            max_tokens=8,  # type: ignore[arg-type]
        )
    assert reply.choices[0].message.tool_calls is None and reply.usage is not None
    assert reply.usage.prompt_tokens > 20


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {
                "tools": [
                    {
                        **_tool("lookup_code"),
                        "function": {**_tool("lookup_code")["function"], "description": "a<|system|>b"},
                    }
                ]
            },
            "tools[0].function.description",
        ),
        ({"tools": [{"type": "function", "function": {"name": "lookup<|end|>"}}]}, "tools[0].function.name"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "lookup_code", "arguments": '{"code": "</s>"}'},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments.code",
        ),
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"functions": [{"name": "lookup_code", "parameters": LOOKUP}]}, "functions"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"tool_choice": {"type": "function", "function": {"name": "triage"}}}, "tool_choice.function.name"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "x",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "string", "pattern": "\\d"}},
                            },
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_what_local_models_cannot_take_is_a_400_naming_the_field(
    gateway: GatewayHarness, change: dict[str, Any], param: str
) -> None:
    body = {"model": "local/tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 8, **change}
    with _client(gateway) as client, pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    error = err.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"]
    # The refusal names its request, and the ledger holds its outcome under that id.
    request_id = err.value.response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    outcomes: list[int] = []
    while not outcomes and time.monotonic() < deadline:
        records = gateway.audit.for_request(request_id)
        outcomes = [r["status_code"] for r in records if r["type"] in ("response", "error")]
        time.sleep(0.02)
    assert outcomes == [400], gateway.audit.for_request(request_id)


def test_the_roles_tool_allow_list_holds_on_local_routes(gateway: GatewayHarness) -> None:
    tools = [_tool("delete_record"), _tool("lookup_code")]
    with _client(gateway, "coder", "coding") as client, pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="local/tiny", messages=ASK, tools=tools, max_tokens=8)  # type: ignore[arg-type]
    assert err.value.body["code"] == "tools_denied"  # type: ignore[index]
    with _client(gateway, "scribe-bot", "scribe") as client:
        # The tool outside the allow-list is dropped before the route sees it: only lookup_code is offered,
        # so a required call can only be lookup_code.
        reply = client.chat.completions.create(
            model="local/tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=tools,  # type: ignore[arg-type]
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=400,
        )
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "lookup_code"
