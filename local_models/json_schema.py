"""Structured output on local routes: OpenAI's ``response_format`` turned into a llama.cpp grammar.

llama-cpp-python silently ignores ``{"type": "json_schema", ...}``; here it becomes GBNF text through
llama_cpp's own schema converter (``llama_cpp.llama_grammar.json_schema_to_gbnf``), with one repair: the
converter's string characters admit raw control characters, which JSON forbids, so that rule is narrowed.
``validate_against`` checks a value against the subset of JSON Schema the converter honours.

Owns: reading ``response_format``, the limits put on a schema before conversion, the grammar text, and the
proof that llama.cpp can parse it (``grammar_compiles``).

Never: fetches a remote ``$ref`` (the appliance is air-gapped; llama_cpp's fetch guard is an ``assert``,
which ``python -O`` strips); returns a grammar llama.cpp cannot parse (llama-cpp-python would then add a
NULL sampler: unconstrained output or a crash); accepts a repetition bound that would make llama.cpp's
recursive grammar parser overflow a thread stack, nor a ``pattern`` quantifier (``{n}``, ``{n,}``,
``{n,m}``) above it: the converter spells each repetition out, so ``a{0,100000000}`` alone would take
seconds and gigabytes before any size check could run; nor a ``pattern`` with a stray ``]`` or ``}``,
on which the converter loops for ever; nor lets a schema's strings act as grammar: literals (property
names, ``enum`` and ``const`` values) are escaped for GBNF here, as llama_cpp's converter leaves backslashes
alone and a ``"`` in a name would end its literal, and a ``pattern`` may not produce, nor escape its way
to, a character that JSON must escape.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import (
    DOT,
    ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS,
    PRIMITIVE_RULES,
    SchemaConverter,
)

from appliance import errors

PARAM = "response_format"
MAX_DEPTH = 32
"""Deepest nesting of subschemas accepted."""
MAX_REPEAT = 256
"""Largest minItems/maxItems/minLength/maxLength and ``pattern`` repeat count: each unit nests one group
in the grammar, and llama.cpp parses nested groups recursively (about 600 overflow a 256 KiB thread
stack)."""
MAX_PATTERN_REPEATS = 16 * MAX_REPEAT
"""Largest sum of the repeat counts of one ``pattern``: the converter's output grows with it."""
MAX_GRAMMAR_CHARS = 512 * 1024

_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ENUM = 1024
"""Most values one ``enum`` may list."""
MAX_SCHEMA_CHARS = 128 * 1024
"""Longest schema (as JSON) converted: the converter's work grows with it before any grammar check."""
_PATTERN_ESCAPES = frozenset(ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS)
"""What a pattern may escape: the converter turns these escapes into the plain character."""
_ESCAPES_SHOWN = " ".join(sorted(_PATTERN_ESCAPES))
_JSON_ESCAPED_CODES = (0x22, 0x5C, 0x7F, *range(0x20))

# The converter's JSON string character is [^"\\]: raw newlines and other control characters would make
# the output invalid JSON. JSON (RFC 8259 §7) needs them escaped, as llama.cpp's own json.gbnf has it.
_LOOSE_CHAR_RULE = "char ::= " + PRIMITIVE_RULES["char"].content
_STRICT_CHAR_RULE = _LOOSE_CHAR_RULE.replace(r'[^"\\]', r'[^"\\\x7F\x00-\x1F]', 1)


# A pattern's '.' is any character but a line break; inside a JSON string it must not be a quote, a
# backslash or a control character either.
_LOOSE_DOT_RULE = "dot ::= " + DOT
_STRICT_DOT_RULE = r'dot ::= [^"\\\x7F\x00-\x1F]'
_REPAIRS = {_LOOSE_CHAR_RULE: _STRICT_CHAR_RULE, _LOOSE_DOT_RULE: _STRICT_DOT_RULE}


def _repair(gbnf: str) -> str:
    return "\n".join(_REPAIRS.get(line, line) for line in gbnf.split("\n"))


_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class _Converter(SchemaConverter):
    """llama_cpp's converter with literals escaped for GBNF: its own ``_format_literal`` leaves ``\\``
    alone, so the JSON of a property name, enum or const holding ``"`` (``\\"``) closed the literal
    early and the rest of the string was read as grammar."""

    def _format_literal(self, literal: str) -> str:
        escaped = "".join(
            _GBNF_ESCAPES.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 0x20 or c == "\x7f" else c)
            for c in literal
        )
        return f'"{escaped}"'


def _to_gbnf(schema_json: str) -> str:
    """``llama_grammar.json_schema_to_gbnf`` with ``_Converter`` and the repairs above; never fetches."""
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = converter.resolve_refs(json.loads(schema_json), "stdin")
    converter.visit(schema, "")
    return _repair(converter.format_grammar())


JSON_OBJECT_GBNF = _to_gbnf(json.dumps({"type": "object"}))
"""Any JSON object (``response_format: {"type": "json_object"}``), one optional space between tokens."""


def grammar_compiles(gbnf: str) -> bool:
    """Whether llama.cpp parses ``gbnf`` (root rule ``root``); no model is needed for the check.

    ``LlamaGrammar.from_string`` in llama-cpp-python 0.3.x only stores the text; this asks llama.cpp.
    """
    sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def _bad(message: str) -> errors.BadRequest:
    return errors.BadRequest(message, code="invalid_response_format", param=PARAM)


def grammar_for(response_format: object) -> str | None:
    """GBNF for a chat/completions ``response_format``; ``None`` when the output is free text.

    Accepts ``{"type": "text"}``, ``{"type": "json_object"}`` (with llama-cpp-python's optional
    ``"schema"`` extension) and OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict", "description"}}``. Anything else raises ``BadRequest`` (param ``response_format``).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _bad('response_format must be an object such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind == "text":
        _only_keys(response_format, {"type"}, "response_format")
        return None
    if kind == "json_object":
        _only_keys(response_format, {"type", "schema"}, "response_format")
        if "schema" not in response_format:
            return JSON_OBJECT_GBNF
        return _schema_grammar(response_format["schema"], "response_format.schema")
    if kind == "json_schema":
        _only_keys(response_format, {"type", "json_schema"}, "response_format")
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise _bad("response_format.json_schema must be an object with a name and a schema")
        _only_keys(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or _NAME_RE.match(name) is None):
            raise _bad("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'")
        if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
            raise _bad("response_format.json_schema.strict must be true or false")
        if spec.get("description") is not None and not isinstance(spec.get("description"), str):
            raise _bad("response_format.json_schema.description must be a string")
        if "schema" not in spec:
            raise _bad("response_format.json_schema.schema is required: the JSON Schema of the output")
        return _schema_grammar(spec["schema"], "response_format.json_schema.schema")
    raise _bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {_short(kind)}")


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _only_keys(obj: Mapping[Any, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise _bad(f"{where}: unknown field {_short(unknown[0])} (allowed: {', '.join(sorted(allowed))})")


def _schema_grammar(schema: object, where: str) -> str:
    if not isinstance(schema, Mapping):
        raise _bad(f"{where} must be a JSON Schema object")
    _check_schema(schema, where, 0)
    try:
        text = json.dumps(schema, allow_nan=False)
        if len(text) > MAX_SCHEMA_CHARS:
            raise _bad(f"{where} is too large: more than {MAX_SCHEMA_CHARS} characters as JSON")
        gbnf = _to_gbnf(text)
    except Exception as exc:  # the converter signals with assert, KeyError, TypeError…
        detail = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
        raise _bad(f"{where} cannot be turned into a grammar: {detail}") from exc
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise _bad(f"{where} is too large: its grammar exceeds {MAX_GRAMMAR_CHARS} characters")
    try:
        gbnf.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{where} is not valid Unicode: it holds a lone surrogate (such as \\ud800)") from None
    if not grammar_compiles(gbnf):
        raise _bad(f"{where} is not supported: llama.cpp cannot parse the grammar made from it")
    return gbnf


def _check_schema(node: Mapping[Any, Any], where: str, depth: int) -> None:
    """Refuse what the converter would fetch, loop on, or blow up into a huge grammar."""
    if depth > MAX_DEPTH:
        raise _bad(f"{where}: the schema nests deeper than {MAX_DEPTH} levels")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#/")):
        raise _bad(f"{where}.$ref: only local references ('#/...') are supported")
    kind = node.get("type")
    if kind is not None and not isinstance(kind, str | list):
        raise _bad(f"{where}.type must be a string or a list of strings")
    for key in _REPEAT_KEYS:
        if key in node:
            bound = node[key]
            if isinstance(bound, bool) or not isinstance(bound, int) or not 0 <= bound <= MAX_REPEAT:
                raise _bad(f"{where}.{key} must be an integer from 0 to {MAX_REPEAT}")
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if low in node and high in node and node[low] > node[high]:
            raise _bad(f"{where}: {low} is greater than {high}")
    if "pattern" in node:
        _check_pattern(node["pattern"], f"{where}.pattern")
    if "enum" in node and (not isinstance(node["enum"], list) or not 0 < len(node["enum"]) <= MAX_ENUM):
        raise _bad(f"{where}.enum must be a non-empty list of at most {MAX_ENUM} values")
    properties = node.get("properties", {})
    if "required" in node and "allOf" not in node:  # with allOf the converter takes required from the parts
        required = node["required"]
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _bad(f"{where}.required must be a list of property names")
        missing = [r for r in required if not isinstance(properties, Mapping) or r not in properties]
        if missing:
            raise _bad(f"{where}.required names {_short(missing[0])}, which is not in properties")
    for key in _SUBSCHEMA_MAPS:
        if key in node:
            children = node[key]
            if not isinstance(children, Mapping):
                raise _bad(f"{where}.{key} must be an object of schemas")
            for name, child in children.items():
                _check_child(child, f"{where}.{key}.{name}", depth)
    for key in _SUBSCHEMA_LISTS:
        if key in node:
            children = node[key]
            if not isinstance(children, list) or not children:
                raise _bad(f"{where}.{key} must be a non-empty list of schemas")
            for i, child in enumerate(children):
                _check_child(child, f"{where}.{key}[{i}]", depth)
    if "items" in node:
        items = node["items"]
        if isinstance(items, list):
            for i, child in enumerate(items):
                _check_child(child, f"{where}.items[{i}]", depth)
        else:
            _check_child(items, f"{where}.items", depth)
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        _check_child(extra, f"{where}.additionalProperties", depth)


def _check_pattern(pattern: object, where: str) -> None:
    """Bound the ``{n}``, ``{n,}`` and ``{n,m}`` quantifiers of a pattern, read as the converter reads them
    (``llama_grammar.SchemaConverter._visit_pattern``): a backslash escapes the next character, a
    character class runs to the first unescaped ``]``, and any other ``{`` opens a quantifier up to the
    next ``}``, whose comma-separated bounds go through ``int``. A ``]`` or ``}`` outside those is refused:
    the converter would loop on it for ever.

    The converter copies a pattern's characters and classes into the grammar as they are, inside a JSON
    string: so a character JSON must escape (quote, backslash, control characters) is refused wherever the
    pattern could produce it (a literal, a class, a range spanning one, a negated class), and so is an
    escape the converter does not turn into a plain character (such as ``\\d``, or a trailing
    backslash): in the grammar it would be GBNF syntax. ``.`` is narrowed in ``_repair``."""
    if not isinstance(pattern, str):
        raise _bad(f"{where} must be a string")
    total = 0
    i, length = 0, len(pattern)
    while i < length:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= length or pattern[i + 1] not in _PATTERN_ESCAPES:
                raise _bad(f"{where}: unsupported escape at index {i} (only {_ESCAPES_SHOWN} can be escaped)")
            i += 2
        elif c == "[":
            i = _check_class(pattern, i, where)
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                raise _bad(f"{where}: unbalanced '{{' at index {i}")
            total += _repeat_count(pattern[i : end + 1], where)
            if total > MAX_PATTERN_REPEATS:
                raise _bad(f"{where}: its repeat counts add up to more than {MAX_PATTERN_REPEATS}")
            i = end + 1
        elif c in "]}":
            raise _bad(f"{where}: unmatched {c!r} at index {i} (escape it as '\\{c}')")
        else:
            _check_json_char(c, i, where)
            i += 1


def _check_class(pattern: str, i: int, where: str) -> int:
    """Check the character class opening at ``i``; return the index after its ``]``."""
    start, length = i, len(pattern)
    i += 1
    if i < length and pattern[i] == "^":
        raise _bad(f"{where}: negated class at index {start}: it would admit quotes and control characters")
    chars: list[tuple[str, int]] = []  # (character, index), with '-' between two ends of a range kept
    while i < length and pattern[i] != "]":
        if pattern[i] == "\\":
            if i + 1 >= length or pattern[i + 1] not in "[]":
                raise _bad(f"{where}: unsupported escape in the class at index {i} (only \\[ and \\])")
            chars.append((pattern[i + 1], i))
            i += 2
        else:
            chars.append((pattern[i], i))
            i += 1
    if i >= length:
        raise _bad(f"{where}: unbalanced '[' at index {start}")
    k = 0
    while k < len(chars):
        low, at = chars[k]
        if k + 2 < len(chars) and chars[k + 1][0] == "-":
            high = chars[k + 2][0]
            if ord(low) > ord(high):
                raise _bad(f"{where}: reversed range at index {at}")
            if any(ord(low) <= code <= ord(high) for code in _JSON_ESCAPED_CODES):
                raise _bad(f"{where}: the range at index {at} spans a quote, backslash or control character")
            k += 3
        else:
            _check_json_char(low, at, where)
            k += 1
    return i + 1


def _check_json_char(c: str, at: int, where: str) -> None:
    if c in '"\\' or ord(c) < 0x20 or c == "\x7f":
        raise _bad(f"{where}: index {at} is a quote, backslash or control character, which JSON must escape")


def _repeat_count(quantifier: str, where: str) -> int:
    """The largest count a ``{...}`` quantifier spells out (its upper bound, else its lower one)."""
    bounds = [part.strip() for part in quantifier[1:-1].split(",")]
    try:
        if len(bounds) == 1:
            counts = [int(bounds[0])]
        elif len(bounds) == 2:
            counts = [int(part) for part in bounds if part]
        else:
            raise ValueError(quantifier)
    except ValueError:  # also a number too long for int(): refused, never converted
        raise _bad(f"{where}: invalid quantifier {_short(quantifier)}") from None
    if any(not 0 <= count <= MAX_REPEAT for count in counts):
        raise _bad(f"{where}: quantifier {_short(quantifier)} repeats more than {MAX_REPEAT} times")
    return max(counts, default=0)


def _check_child(child: object, where: str, depth: int) -> None:
    if not isinstance(child, Mapping):
        raise _bad(f"{where} must be a schema object")
    _check_schema(child, where, depth + 1)


# --- validation -------------------------------------------------------------------------------------


def validate_against(schema: dict[str, Any], value: object) -> list[str]:
    """Errors (``"$.path: reason"``) of ``value`` against ``schema``; empty when it conforms.

    Covers what the converter turns into grammar: type (or a list of types), properties, required,
    additionalProperties, items / prefixItems, minItems/maxItems, minLength/maxLength, enum, const,
    anyOf/oneOf/allOf and local ``$ref``. Other keywords are ignored, as JSON Schema does.
    """
    found: list[str] = []
    _validate(schema, value, "$", schema, found, 0)
    return found


def _type_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number" if math.isfinite(value) else "non-finite number (not JSON)"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _is_type(value: object, kind: object) -> bool:
    if isinstance(value, float) and kind == "integer" and math.isfinite(value):
        return value.is_integer()  # JSON has one number type: 2.0 is an integer
    actual = _type_of(value)
    return actual == kind or (actual == "integer" and kind == "number")


def _json_equal(a: object, b: object) -> bool:
    """Equality as JSON means it: true is not 1, 1 equals 1.0, objects ignore key order."""
    ta, tb = _type_of(a), _type_of(b)
    if {ta, tb} <= {"integer", "number"}:
        return a == b
    if ta != tb:
        return False
    if ta == "array":
        assert isinstance(a, list | tuple) and isinstance(b, list | tuple)
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ta == "object":
        assert isinstance(a, Mapping) and isinstance(b, Mapping)
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _resolve(root: dict[str, Any], ref: str) -> Any:
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, Mapping) or part not in target:
            return None
        target = target[part]
    return target


def _validate(
    schema: Any, value: object, path: str, root: dict[str, Any], found: list[str], depth: int
) -> None:
    if depth > 100:
        found.append(f"{path}: the schema or value nests too deeply to check")
        return
    if schema is True or schema == {}:
        return
    if schema is False:
        found.append(f"{path}: no value is allowed here")
        return
    if not isinstance(schema, Mapping):
        found.append(f"{path}: the schema here is not an object")
        return
    if "$ref" in schema:
        target = _resolve(root, str(schema["$ref"]))
        if target is None:
            found.append(f"{path}: unresolvable $ref {schema['$ref']!r}")
        else:
            _validate(target, value, path, root, found, depth + 1)
        return  # like the converter: $ref replaces its siblings

    kinds = schema.get("type")
    if kinds is not None:
        allowed = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is_type(value, k) for k in allowed):
            found.append(f"{path}: expected {' or '.join(map(str, allowed))}, got {_type_of(value)}")
            return
    if "const" in schema and not _json_equal(value, schema["const"]):
        found.append(f"{path}: expected {json.dumps(schema['const'])}")
    if "enum" in schema and not any(_json_equal(value, option) for option in schema["enum"]):
        found.append(f"{path}: {_short(value)} is not one of {json.dumps(schema['enum'])[:200]}")

    for key in ("anyOf", "oneOf"):
        if key in schema:
            matches = sum(1 for option in schema[key] if not _subcheck(option, value, path, root, depth))
            if matches == 0:
                found.append(f"{path}: matches none of the {key} alternatives")
            elif key == "oneOf" and matches > 1:
                found.append(f"{path}: matches {matches} of the oneOf alternatives, not exactly one")
    for option in schema.get("allOf", []):
        _validate(option, value, path, root, found, depth + 1)

    if isinstance(value, Mapping):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{path}: missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            where = f"{path}.{name}"
            if name in properties:
                _validate(properties[name], item, where, root, found, depth + 1)
            elif extra is False:
                found.append(f"{path}: property {name!r} is not allowed")
            elif isinstance(extra, Mapping):
                _validate(extra, item, where, root, found, depth + 1)
    elif isinstance(value, list | tuple):
        _check_bounds(schema, len(value), "minItems", "maxItems", "items", path, found)
        items = schema.get("items")
        prefix = schema.get("prefixItems", items if isinstance(items, list) else [])
        rest = None if isinstance(items, list) else items
        for i, item in enumerate(value):
            if i < len(prefix):
                _validate(prefix[i], item, f"{path}[{i}]", root, found, depth + 1)
            elif rest is not None:
                _validate(rest, item, f"{path}[{i}]", root, found, depth + 1)
    elif isinstance(value, str):
        _check_bounds(schema, len(value), "minLength", "maxLength", "characters", path, found)


def _check_bounds(
    schema: Mapping[str, Any], size: int, low_key: str, high_key: str, unit: str, path: str, found: list[str]
) -> None:
    low, high = schema.get(low_key), schema.get(high_key)
    if isinstance(low, int) and size < low:
        found.append(f"{path}: {size} {unit}, fewer than {low_key} {low}")
    if isinstance(high, int) and size > high:
        found.append(f"{path}: {size} {unit}, more than {high_key} {high}")


def _subcheck(schema: Any, value: object, path: str, root: dict[str, Any], depth: int) -> list[str]:
    errors_here: list[str] = []
    _validate(schema, value, path, root, errors_here, depth + 1)
    return errors_here
