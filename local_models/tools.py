"""Tool calling on local models: OpenAI ``tools`` in, ``<tool_call>`` blocks written by the model, OpenAI
tool calls out.

A local model calls a tool by writing text. Its chat template lists the tools (the template renders
``tools`` itself, usually with ``tojson``) and the model answers with one block per call, in the syntax of
Hermes 2 Pro, Qwen 2.5 and most local tool models::

    <tool_call>
    {"name": "<function>", "arguments": {...}}
    </tool_call>

=============================  =====================  ======================================================
OpenAI ``tool_choice``         the template is given  grammar (GBNF, from the tools' parameter schemas)
=============================  =====================  ======================================================
``none``                       no tools               none: free text
``auto`` (the default)         the tools              lazy: free text until ``<tool_call>``, then calls only
``required``                   the tools              from the first token: one or more calls
``{"type": "function", ...}``  the tools              from the first token: calls of that function
=============================  =====================  ======================================================

``parallel_tool_calls: false`` lets the grammar end after one call. ``tool_calls.ToolCallParser`` turns the
model's text back into content and OpenAI tool-call deltas as it streams.

Owns: reading ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (``plan_tools``: at most ``MAX_TOOLS``
functions, names ``^[A-Za-z0-9_-]{1,64}$`` and unique, ``MAX_TOOLS_CHARS`` of definitions, each ``parameters``
schema checked and converted by ``json_schema``); the tool calls of assistant messages in the history
(``history_calls``); the call syntax and its grammar; and whether a chat template speaks this syntax
(``template_supports_tools``).

Must never: build a grammar from a schema ``json_schema`` has not checked; let one tool's grammar rules
stand in for another's (each tool's rules are renamed apart); let a call name a function that was not
offered (the grammar lists only those). Tool text rendered by the template is caller text: the
worker refuses any that spells a control token (``prompt.chat_prompt``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import DOT, PRIMITIVE_RULES, SPACE_RULE, STRING_FORMAT_RULES

from appliance import errors
from local_models.json_schema import MAX_GRAMMAR_CHARS, grammar_compiles
from local_models.json_schema import _repair as repair_builtins
from local_models.json_schema import _schema_grammar as schema_grammar

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128
"""Most functions one request may offer."""
MAX_TOOLS_CHARS = 256 * 1024
"""Longest ``tools`` list accepted, as JSON: it is rendered into every prompt of the request."""
MAX_TOOLS_GRAMMAR_CHARS = 4 * MAX_GRAMMAR_CHARS
"""Longest grammar of all the offered tools together (each tool's own is held to ``MAX_GRAMMAR_CHARS``)."""
MAX_HISTORY_CALLS = 128
"""Most tool calls one assistant message of the history may carry."""
MAX_ARGUMENT_DEPTH = 64
"""Deepest nesting of a history call's arguments (the worker walks them to screen every string)."""
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")

_CHOICES = ("none", "auto", "required")
_TOOL_FIELDS = frozenset({"type", "function"})
_FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})
_NOT_AN_OBJECT_ROOT = ("anyOf", "oneOf", "allOf", "$ref", "enum", "const", "not")
"""At the root of ``parameters`` these could make the arguments something other than one JSON object."""


def _bad(message: str, param: str, code: str = "invalid_tools") -> errors.BadRequest:
    return errors.BadRequest(message, code=code, param=param)


# ---- what the request asks for -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tool fields mean for one generation."""

    offered: list[dict[str, Any]] | None
    """The validated definitions the template lists (``GenerationRequest.tools``); None: no tools."""
    grammar: str | None
    """GBNF whose root starts with ``CALL_OPEN``; None when no tools are offered."""
    triggers: list[str]
    """Non-empty (``[CALL_OPEN]``): the grammar is lazy, applied from the first trigger on."""
    calls_only: bool
    """The answer is tool calls only (``required`` or a named function)."""


NO_TOOLS = ToolPlan(offered=None, grammar=None, triggers=[], calls_only=False)


def plan_tools(tools: object, tool_choice: object, parallel_tool_calls: object) -> ToolPlan:
    """The plan for a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``; ``BadRequest``
    naming the field otherwise. Converts every offered schema: run it off the event loop."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    definitions = read_tools(tools)
    choice = _read_choice(tool_choice, definitions)
    if choice == "none" or not definitions:
        return NO_TOOLS
    if choice in ("auto", "required"):
        called = definitions
    else:
        called = [d for d in definitions if d["function"]["name"] == choice]
    grammar = _calls_grammar(called, definitions, parallel=parallel_tool_calls is not False)
    lazy = choice == "auto"
    return ToolPlan(
        offered=definitions, grammar=grammar, triggers=[CALL_OPEN] if lazy else [], calls_only=not lazy
    )


def read_tools(tools: object) -> list[dict[str, Any]]:
    """OpenAI function tools, as the template gets them: ``{"type": "function", "function": {"name",
    "description"?, "parameters"}}`` (``strict`` is dropped: the grammar is always strict)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise _bad(f"'tools' lists {len(tools)} tools; local models take at most {MAX_TOOLS}", "tools")
    definitions: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise _bad(f"'{where}' must be an object", where)
        if tool.get("type") != "function":
            raise _bad(
                f"'{where}.type' must be 'function': local models call functions only", f"{where}.type"
            )
        _only(tool, _TOOL_FIELDS, where)
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise _bad(f"'{where}.function' must be an object with a name", f"{where}.function")
        _only(function, _FUNCTION_FIELDS, f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or TOOL_NAME.fullmatch(name) is None:
            raise _bad(
                f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name"
            )
        if name in names:
            raise _bad(f"'{where}.function.name' repeats the name {name!r}", f"{where}.function.name")
        names.add(name)
        entry: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise _bad(
                    f"'{where}.function.description' must be a string", f"{where}.function.description"
                )
            entry["description"] = description
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(f"'{where}.function.strict' must be true or false", f"{where}.function.strict")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif (
            not isinstance(parameters, Mapping)
            or parameters.get("type", "object") != "object"
            or any(key in parameters for key in _NOT_AN_OBJECT_ROOT)
        ):
            raise _bad(
                f"'{where}.function.parameters' must be a JSON Schema of type 'object'",
                f"{where}.function.parameters",
            )
        entry["parameters"] = parameters
        definitions.append({"type": "function", "function": entry})
    try:
        size = len(json.dumps(definitions, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise _bad(
            "'tools' must be plain JSON text: no lone surrogates, no NaN or Infinity", "tools"
        ) from None
    if size > MAX_TOOLS_CHARS:
        raise _bad(f"'tools' is {size} bytes as JSON; local models take at most {MAX_TOOLS_CHARS}", "tools")
    return definitions


def _only(obj: Mapping[Any, Any], allowed: frozenset[str], where: str) -> None:
    for key, value in obj.items():
        if key not in allowed and value is not None:
            shown = str(key) if TOOL_NAME.fullmatch(str(key)) else "?"
            raise _bad(f"'{where}.{shown}' is not a field local models take", f"{where}.{shown}")


def _read_choice(choice: object, definitions: list[dict[str, Any]]) -> str:
    """``none``, ``auto``, ``required`` or the name of the one function to call."""
    if choice is None:
        return "auto" if definitions else "none"
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise _bad("'tool_choice' must be 'none', 'auto', 'required' or a function", "tool_choice")
        if choice == "required" and not definitions:
            raise _bad("'tool_choice' is 'required' but no 'tools' are given", "tool_choice")
        return choice
    if not isinstance(choice, Mapping) or choice.get("type") != "function":
        raise _bad(
            "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
            '{"name": ...}} (local models take no other kind)',
            "tool_choice",
        )
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    known = {d["function"]["name"] for d in definitions}
    if not isinstance(name, str) or name not in known:
        raise _bad("'tool_choice.function.name' must name one of the 'tools'", "tool_choice.function.name")
    return name


# ---- the grammar ----------------------------------------------------------------------------------------

_BUILTIN: dict[str, str] = {
    name: repair_builtins(f"{name} ::= {body}").split(" ::= ", 1)[1]
    for name, body in {
        "space": SPACE_RULE,
        "dot": DOT,
        **{name: rule.content for name, rule in PRIMITIVE_RULES.items()},
        **{name: rule.content for name, rule in STRING_FORMAT_RULES.items()},
    }.items()
}
"""The converter's shared rules, by name, as json_schema writes them (strict JSON strings). A tool's rule
with one of these names and bodies is shared by every tool; any other rule is renamed apart."""
_RULE_LINE = re.compile(r"([A-Za-z0-9-]+) ::= (.*)")
_GBNF_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|\{[^}]*\}|([A-Za-z0-9-]+)|.', re.DOTALL)
"""One token of a rule body: a literal, a character class, a repetition count, a rule name, or any other
character. Only rule names (group 1) are ever rewritten."""


def _calls_grammar(called: list[dict[str, Any]], offered: list[dict[str, Any]], *, parallel: bool) -> str:
    """GBNF for one call (or, ``parallel``, several separated by a newline) of the ``called`` functions,
    each ``{"name": "<name>", "arguments": <its parameters schema>}`` inside ``CALL_OPEN``/``CALL_CLOSE``."""
    rules: dict[str, str] = {}
    alternatives = []
    total = 0
    index = {d["function"]["name"]: i for i, d in enumerate(offered)}
    for definition in called:
        function = definition["function"]
        i = index[function["name"]]
        where = f"tools[{i}].function.parameters"
        try:
            gbnf = schema_grammar(function["parameters"], where)
        except errors.BadRequest as exc:
            raise _bad(exc.message, where) from None
        total += len(gbnf)
        if total > MAX_TOOLS_GRAMMAR_CHARS:  # before converting the rest: a big request stops early
            limit = MAX_TOOLS_GRAMMAR_CHARS
            raise _bad(f"'tools': the grammar of these tools exceeds {limit} characters", "tools")
        arguments = _merge_apart(gbnf, f"tool{i}-", rules)
        rules[f"call-{i}"] = (
            _literal(f'{{"name": "{function["name"]}", "arguments": ') + f" {arguments} " + _literal("}")
        )
        alternatives.append(f"call-{i}")
    rules["call"] = f"{_OPEN_RULE} ( {' | '.join(alternatives)} ) {_CLOSE_RULE}"
    rules["root"] = f"call ( {_SEPARATOR_RULE} call )*" if parallel else "call"
    grammar = "\n".join(f"{name} ::= {body}" for name, body in sorted(rules.items()))
    if len(grammar) > MAX_TOOLS_GRAMMAR_CHARS:
        limit = MAX_TOOLS_GRAMMAR_CHARS
        raise _bad(f"'tools': the grammar of these tools exceeds {limit} characters", "tools")
    if not grammar_compiles(grammar):  # each part compiled on its own: this would be a bug here
        raise _bad("'tools': llama.cpp cannot parse the grammar made from these tools", "tools")
    return grammar


def _merge_apart(gbnf: str, prefix: str, into: dict[str, str]) -> str:
    """Add the rules of one schema grammar to ``into``, every rule that is not a shared builtin renamed
    with ``prefix``; returns the new name of its root."""
    own: dict[str, str] = {}
    for line in gbnf.split("\n"):
        match = _RULE_LINE.fullmatch(line)
        if match is None:
            raise _bad("'tools': a schema grammar line could not be read", "tools")
        own[match.group(1)] = match.group(2)
    renamed = {name: name if _BUILTIN.get(name) == body else prefix + name for name, body in own.items()}

    def rename(match: re.Match[str]) -> str:
        word = match.group(1)
        return renamed.get(word, word) if word is not None else match.group(0)

    for name, body in own.items():
        new = renamed[name]
        text = _GBNF_TOKEN.sub(rename, body)
        if into.setdefault(new, text) != text:
            raise _bad("'tools': two tools' grammars disagree on a shared rule", "tools")
    return renamed["root"]


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


_OPEN_RULE = _literal(CALL_OPEN + "\n")
_CLOSE_RULE = _literal("\n" + CALL_CLOSE)
_SEPARATOR_RULE = _literal("\n")


# ---- calls in the history -------------------------------------------------------------------------------


def history_calls(value: object, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, as templates take them: ``{"id"?, "type": "function",
    "function": {"name", "arguments": <the JSON object the arguments string holds>}}``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"'{where}' must be a list of tool calls", where)
    if len(value) > MAX_HISTORY_CALLS:
        raise _bad(f"'{where}' holds more than {MAX_HISTORY_CALLS} calls", where)
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, Mapping):
            raise _bad(f"'{at}' must be an object", at)
        if call.get("type", "function") != "function":
            raise _bad(f"'{at}.type' must be 'function'", f"{at}.type")
        # index: the SDK's stream helper keeps it on the message it appends; dropped.
        _only(call, frozenset({"id", "type", "function", "index"}), at)
        if not isinstance(call.get("index", 0), int):
            raise _bad(f"'{at}.index' must be an integer", f"{at}.index")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise _bad(f"'{at}.function' must be an object with a name and arguments", f"{at}.function")
        # parsed_arguments: what the SDK's parse helpers add beside arguments; dropped, arguments rule.
        _only(function, frozenset({"name", "arguments", "parsed_arguments"}), f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or TOOL_NAME.fullmatch(name) is None:
            raise _bad(
                f"'{at}.function.name' must be 1-64 letters, digits, '_' or '-'", f"{at}.function.name"
            )
        entry: dict[str, Any] = {"type": "function", "function": {"name": name}}
        ident = call.get("id")
        if ident is not None:
            if not isinstance(ident, str) or CALL_ID.fullmatch(ident) is None:
                raise _bad(f"'{at}.id' must be 1-256 letters, digits or '_.:-'", f"{at}.id")
            entry["id"] = ident
        entry["function"]["arguments"] = _arguments(function.get("arguments"), f"{at}.function.arguments")
        calls.append(entry)
    return calls


def _arguments(text: object, where: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise _bad(f"'{where}' must be a string of JSON (an object)", where)
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _bad(f"'{where}' is not JSON", where) from None
    if not isinstance(value, dict):
        raise _bad(f"'{where}' must be a JSON object", where)
    if _depth(value) > MAX_ARGUMENT_DEPTH:
        raise _bad(f"'{where}' nests deeper than {MAX_ARGUMENT_DEPTH} levels", where)
    try:  # \ud800 escapes decode to lone surrogates, which no tokenizer takes
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"'{where}' holds a lone surrogate (such as \\ud800): not valid Unicode", where) from None
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _depth(value: object) -> int:
    deepest, level = 0, [(value, 1)]
    while level:
        node, depth = level.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            level += [(child, depth + 1) for child in node.values()]
        elif isinstance(node, list):
            level += [(child, depth + 1) for child in node]
    return deepest


def wire_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history_calls`` back in OpenAI's shape (arguments as a JSON string)."""
    return [
        {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
        for call in calls
    ]


# ---- which templates speak this syntax ------------------------------------------------------------------

_USES_TOOLS = re.compile(r"\{[{%][^}]*\btools\b")


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template lists ``tools`` and asks for ``<tool_call>`` blocks (Hermes 2 Pro, Qwen 2.5,
    and the tiny model's). Any other template (Llama 3.1's JSON calls, Mistral's ``[TOOL_CALLS]``) would
    be asked for a syntax it does not teach: requests with tools are refused on such models."""
    if not template:
        return False
    return CALL_OPEN in template and _USES_TOOLS.search(template) is not None
