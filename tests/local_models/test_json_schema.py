"""response_format on local routes: grammars from llama_cpp's converter, and the small validator."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import llama_cpp
import pytest

from appliance import errors
from local_models import json_schema
from local_models.json_schema import JSON_OBJECT_GBNF, grammar_compiles, grammar_for, validate_against

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer"},
        "height_m": {"type": "number"},
        "alive": {"type": "boolean"},
        "nickname": {"type": ["string", "null"]},
        "role": {"enum": ["patient", "clinician", 3, None]},
        "kind": {"const": "person"},
    },
    "required": ["name", "age", "role", "kind"],
    "additionalProperties": False,
}

ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "enum": ["A", "B"]},
                    "qty": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["code", "qty"],
                "additionalProperties": False,
            },
        },
        "patient": {"$ref": "#/$defs/patient"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["id", "lines"],
    "additionalProperties": False,
    "$defs": {
        "patient": {
            "type": "object",
            "properties": {"mrn": {"type": "string"}, "dob": {"type": "string", "format": "date"}},
            "required": ["mrn"],
        }
    },
}

TREE: dict[str, Any] = {  # recursive through $defs
    "type": "object",
    "properties": {"root": {"$ref": "#/$defs/node"}},
    "required": ["root"],
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["label"],
        }
    },
}

SCHEMAS = {
    "person": PERSON,
    "order": ORDER,
    "tree": TREE,
    "string": {"type": "string"},
    "oneOf": {
        "oneOf": [
            {"type": "integer"},
            {"type": "object", "properties": {"x": {"const": 1}}, "required": ["x"]},
        ]
    },
}


def as_json_schema(schema: object, **extra: object) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True, **extra}}


# --- grammar_for ----------------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_free_text_needs_no_grammar(response_format: object) -> None:
    assert grammar_for(response_format) is None


def test_json_object_gets_the_generic_object_grammar() -> None:
    gbnf = grammar_for({"type": "json_object"})
    assert gbnf == JSON_OBJECT_GBNF
    assert "root ::= object" in gbnf
    assert grammar_compiles(gbnf)


def test_json_object_with_a_schema_follows_llama_cpp_python() -> None:
    gbnf = grammar_for({"type": "json_object", "schema": PERSON})
    assert gbnf == grammar_for(as_json_schema(PERSON))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_grammars_compile(name: str) -> None:
    gbnf = grammar_for(as_json_schema(SCHEMAS[name]))
    assert gbnf is not None
    assert grammar_compiles(gbnf)
    assert llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)._grammar == gbnf


def test_grammar_comes_from_llama_cpp_converter() -> None:
    gbnf = grammar_for(as_json_schema(PERSON))
    assert gbnf is not None
    converted = llama_cpp.llama_grammar.json_schema_to_gbnf(json.dumps(PERSON))
    # Identical but for the narrowed string character rule.
    changed = set(gbnf.splitlines()) ^ set(converted.splitlines())
    assert {line.split(" ::= ")[0] for line in changed} == {"char"}
    assert '"\\"role\\"" space ":" space role' in gbnf
    assert '"\\"patient\\"" | "\\"clinician\\"" | "3" | "null"' in gbnf


def test_strings_cannot_hold_raw_control_characters() -> None:
    gbnf = grammar_for(as_json_schema({"type": "object", "properties": {"s": {"type": "string"}}}))
    assert gbnf is not None
    char_rule = next(line for line in gbnf.splitlines() if line.startswith("char ::= "))
    assert char_rule.startswith(r'char ::= [^"\\\x7F\x00-\x1F] | "\\" ')
    assert r'[^"\\\x7F\x00-\x1F]' in JSON_OBJECT_GBNF


def test_grammar_compiles_tells_bad_grammars_apart() -> None:
    assert grammar_compiles('root ::= "a" | "b"')
    assert not grammar_compiles("root ::= undefined-rule")
    assert not grammar_compiles('other ::= "x"')  # no root
    assert not grammar_compiles('root ::= root "x"')  # left recursion


@pytest.mark.parametrize(
    ("response_format", "fragment"),
    [
        ("json_object", "must be an object"),
        (["json_object"], "must be an object"),
        ({}, "response_format.type must be"),
        ({"type": "xml"}, "response_format.type must be"),
        ({"type": "text", "schema": {}}, "unknown field"),
        ({"type": "json_object", "strict": True}, "unknown field"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": "x"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
            "must be a JSON Schema object",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "must be a JSON Schema object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schemas": {}}}, "unknown field"),
        ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "name must be"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "strict"),
        (as_json_schema({"type": "tuple"}), "cannot be turned into a grammar"),
        (as_json_schema({"type": 5}), "type must be"),
        (as_json_schema({"$ref": "https://example.com/schema.json"}), "only local references"),
        (as_json_schema({"$ref": "other.json#/x"}), "only local references"),
        (as_json_schema({"$ref": "#/$defs/missing"}), "cannot be turned into a grammar"),
        (as_json_schema({"enum": []}), "non-empty list"),
        (as_json_schema({"anyOf": []}), "non-empty list"),
        (as_json_schema({"type": "object", "properties": {"a": "string"}}), "properties.a must be a schema"),
        (as_json_schema({"type": "object", "properties": [1]}), "properties must be an object"),
        (as_json_schema({"type": "array", "items": 3}), "items must be a schema"),
        (as_json_schema({"type": "object", "required": ["a"]}), "not in properties"),
        (as_json_schema({"type": "object", "properties": {}, "required": "a"}), "required must be a list"),
        (as_json_schema({"type": "array", "items": {}, "maxItems": 100_000}), "maxItems must be an integer"),
        (as_json_schema({"type": "string", "minLength": -1}), "minLength must be an integer"),
        (as_json_schema({"type": "string", "maxLength": 2.5}), "maxLength must be an integer"),
        (as_json_schema({"type": "array", "items": {}, "minItems": 3, "maxItems": 2}), "greater than"),
        (as_json_schema({"type": "number", "const": float("nan")}), "cannot be turned into a grammar"),
    ],
)
def test_malformed_response_format_is_a_bad_request(response_format: object, fragment: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        grammar_for(response_format)
    assert info.value.param == "response_format"
    assert info.value.status == 400
    assert fragment in info.value.message


def test_deep_nesting_is_refused() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(json_schema.MAX_DEPTH + 2):
        schema = {"type": "array", "items": schema}
    with pytest.raises(errors.BadRequest) as info:
        grammar_for(as_json_schema(schema))
    assert "nests deeper" in info.value.message


def test_repetition_at_the_limit_compiles() -> None:
    schema = {"type": "array", "items": {"type": "string", "maxLength": 256}, "maxItems": 256}
    gbnf = grammar_for(as_json_schema(schema))
    assert gbnf is not None and grammar_compiles(gbnf)


# Run in a child process: before the pattern checks, these took gigabytes or never returned at all.
_PATTERN_PROBE = """
import json, sys, time
from appliance import errors
from local_models.json_schema import grammar_for
schema = {"type": "string", "pattern": sys.argv[1]}
started = time.monotonic()
try:
    grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    outcome = {"ok": True}
except errors.BadRequest as exc:
    outcome = {"ok": False, "code": exc.code, "param": exc.param, "message": exc.message}
outcome["seconds"] = time.monotonic() - started
print(json.dumps(outcome))
"""


def pattern_outcome(pattern: str) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PATTERN_PROBE, pattern], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"grammar_for did not return within 20 s for pattern {pattern!r}")
    assert done.returncode == 0, done.stderr[-2000:]
    outcome: dict[str, Any] = json.loads(done.stdout)
    return outcome


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("^a{0,100000000}$", "repeats more than 256 times"),
        ("^a{100000000}$", "repeats more than 256 times"),
        ("^(ab){100000000,}$", "repeats more than 256 times"),
        ("^[{]{9999}$", "repeats more than 256 times"),
        ("^a{1,2,3}$", "invalid quantifier"),
        ("^a{" + "9" * 5000 + "}$", "invalid quantifier"),
        ("^" + "a{256}" * 20 + "$", "add up to more than"),
        ("^a}$", "unmatched '}'"),  # the converter loops for ever on a stray } or ]
        ("^\\{5}$", "unmatched '}'"),  # an escaped { opens no quantifier
        ("^[]]$", "unmatched ']'"),
    ],
)
def test_pattern_repeats_are_bounded_before_conversion(pattern: str, fragment: str) -> None:
    outcome = pattern_outcome(pattern)
    assert not outcome["ok"], outcome
    assert outcome["code"] == "invalid_response_format" and outcome["param"] == "response_format"
    assert fragment in outcome["message"]
    assert outcome["seconds"] < 0.5


@pytest.mark.parametrize(
    "pattern",
    [
        "^[0-9]{3}-[0-9]{2}-[0-9]{4}$",
        "^[a-f0-9]{8}(-[a-f0-9]{4}){3}-[a-f0-9]{12}$",
        "^a{,5}b{2,}c{256}$",
        "^[\\]}{]x\\{\\}$",
    ],
)
def test_legit_patterns_still_compile(pattern: str) -> None:
    gbnf = grammar_for(as_json_schema({"type": "string", "pattern": pattern}))
    assert gbnf is not None and grammar_compiles(gbnf)


def test_huge_grammar_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_schema, "MAX_GRAMMAR_CHARS", 100)
    with pytest.raises(errors.BadRequest) as info:
        grammar_for(as_json_schema(PERSON))
    assert "too large" in info.value.message


def test_a_grammar_llama_cpp_rejects_is_a_bad_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_schema, "_to_gbnf", lambda text: "root ::= nowhere")
    with pytest.raises(errors.BadRequest) as info:
        grammar_for(as_json_schema(PERSON))
    assert "llama.cpp cannot parse" in info.value.message


# --- validate_against ------------------------------------------------------------------------------


GOOD_PERSON = {
    "name": "Ada",
    "age": 36,
    "height_m": 1.65,
    "alive": False,
    "nickname": None,
    "role": 3,
    "kind": "person",
}
GOOD_ORDER = {
    "id": "o-1",
    "lines": [{"code": "A", "qty": 2, "tags": ["x"]}, {"code": "B", "qty": 1}],
    "patient": {"mrn": "123", "dob": "2001-02-03"},
    "note": None,
    "pair": [1, "one"],
    "extra": {"a": 1, "b": 2.0},
}


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        (PERSON, GOOD_PERSON),
        (PERSON, {"name": "B", "age": 1.0, "role": None, "kind": "person"}),
        (ORDER, GOOD_ORDER),
        (TREE, {"root": {"label": "a", "children": [{"label": "b", "children": [{"label": "c"}]}]}}),
        (SCHEMAS["oneOf"], 5),
        (SCHEMAS["oneOf"], {"x": 1.0}),
        ({}, [1, "x"]),
        ({"type": "number"}, 3),
        ({"const": {"a": [1, True]}}, {"a": [1.0, True]}),
        ({"allOf": [{"type": "integer"}, {"enum": [1, 2]}]}, 2),
    ],
)
def test_conforming_values_have_no_errors(schema: dict[str, Any], value: object) -> None:
    assert validate_against(schema, value) == []


@pytest.mark.parametrize(
    ("schema", "value", "expected"),
    [
        (PERSON, [], ["$: expected object, got array"]),
        (PERSON, {**GOOD_PERSON, "age": "36"}, ["$.age: expected integer, got string"]),
        (PERSON, {**GOOD_PERSON, "age": 36.5}, ["$.age: expected integer, got number"]),
        (PERSON, {**GOOD_PERSON, "alive": 1}, ["$.alive: expected boolean, got integer"]),
        (PERSON, {**GOOD_PERSON, "height_m": True}, ["$.height_m: expected number, got boolean"]),
        (
            PERSON,
            {**GOOD_PERSON, "role": "nurse"},
            ['$.role: "nurse" is not one of ["patient", "clinician", 3, null]'],
        ),
        (
            PERSON,
            {**GOOD_PERSON, "role": True},
            ['$.role: true is not one of ["patient", "clinician", 3, null]'],
        ),
        (PERSON, {**GOOD_PERSON, "kind": "cat"}, ['$.kind: expected "person"']),
        (PERSON, {**GOOD_PERSON, "name": ""}, ["$.name: 0 characters, fewer than minLength 1"]),
        (PERSON, {**GOOD_PERSON, "ssn": "x"}, ["$: property 'ssn' is not allowed"]),
        (
            PERSON,
            {"name": "A", "age": 1},
            ["$: missing required property 'role'", "$: missing required property 'kind'"],
        ),
        (ORDER, {**GOOD_ORDER, "lines": []}, ["$.lines: 0 items, fewer than minItems 1"]),
        (
            ORDER,
            {**GOOD_ORDER, "lines": [{"code": "A", "qty": 1}] * 6},
            ["$.lines: 6 items, more than maxItems 5"],
        ),
        (
            ORDER,
            {**GOOD_ORDER, "lines": [{"code": "C", "qty": 1}]},
            ['$.lines[0].code: "C" is not one of ["A", "B"]'],
        ),
        (
            ORDER,
            {**GOOD_ORDER, "lines": [{"code": "A", "qty": 1, "tags": [1]}]},
            ["$.lines[0].tags[0]: expected string, got integer"],
        ),
        (ORDER, {**GOOD_ORDER, "patient": {}}, ["$.patient: missing required property 'mrn'"]),
        (ORDER, {**GOOD_ORDER, "note": 3}, ["$.note: matches none of the anyOf alternatives"]),
        (ORDER, {**GOOD_ORDER, "pair": ["1", "one"]}, ["$.pair[0]: expected integer, got string"]),
        (ORDER, {**GOOD_ORDER, "extra": {"a": "x"}}, ["$.extra.a: expected integer, got string"]),
        (
            TREE,
            {"root": {"label": "a", "children": [{}]}},
            ["$.root.children[0]: missing required property 'label'"],
        ),
        (SCHEMAS["oneOf"], "x", ["$: matches none of the oneOf alternatives"]),
        (
            {"oneOf": [{"type": "integer"}, {"type": "number"}]},
            1,
            ["$: matches 2 of the oneOf alternatives, not exactly one"],
        ),
        ({"type": "number"}, float("inf"), ["$: expected number, got non-finite number (not JSON)"]),
        ({"$ref": "#/nowhere"}, 1, ["$: unresolvable $ref '#/nowhere'"]),
    ],
)
def test_nonconforming_values_are_reported(
    schema: dict[str, Any], value: object, expected: list[str]
) -> None:
    assert validate_against(schema, value) == expected
