"""Prompts as token ids, with the caller's text kept as text: only the chat template may write control tokens.

Owns: reading chat messages into turns (``chat_turns``: the role allow-list, text parts, lone surrogates
refused, an assistant's ``tool_calls`` and a tool message's ``tool_call_id``); the whole chat prompt of a
request (``chat_prompt``: the worker's one call); refusing a prompt that cannot fit the context before any
work is done on it (``check_fits``); refusing caller text the template renders itself when it spells a
control token (``screen_template_text``); splitting a rendered chat prompt into the template's own text
and the caller's text (``chat_segments``); finding control tokens in template text (``ControlTokens``);
and tokenizing the segments (``PromptTokenizer``) in linear time, stoppable between segments, and cut
short as soon as the prompt has outgrown the context.

How caller text is told apart: the template is rendered once with a random stand-in in place of each
message's content and once for real. The stand-in rendering, split at the stand-ins, gives the template's
parts; the real prompt must be exactly those parts with the caller strings between them (as given, or
trimmed of surrounding whitespace, which templates do), else the request is refused. Template parts are
searched for control tokens; caller text is tokenized with llama.cpp's ``parse_special`` off. Each run of
plain text between two control tokens is tokenized as one piece, as llama.cpp itself does, so a benign
prompt gets the very tokens it got when the whole rendering was tokenized with special tokens on.

Tool definitions and an assistant's tool calls cannot take a stand-in: templates transform them (``tojson``,
loops over a schema's properties), so they are rendered into the template's parts. Every string in them,
keys included, is refused (400 naming the field) when it, or its JSON form, holds the text of any special
token of the vocabulary (``screen_template_text``). In the template's JSON each string sits between
quotes, and the strings templates write bare (function names, call ids) are short identifiers, so only a
token whose text holds a quote could span a string's edge. Tool results are message content: they take
the stand-in path.

Must never: let caller text (message content, the completion prompt, tool definitions and calls) become a
control token; let a role that is not on the allow-list reach a template (a role is template text); give
llama.cpp a long text to tokenize with ``parse_special`` on (its special-token partition is quadratic in
the matches: 88 s for 30k one-character messages, on the model's worker); or be used from any thread but
the model's worker (the tokenizer reads the ``Llama``'s vocabulary and reuses one buffer).
"""

from __future__ import annotations

import ctypes
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import llama_cpp

from appliance import errors
from local_models.tools import CALL_ID, TOOL_NAME, history_calls

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
"""The roles a chat message may have."""
_TEMPLATE_ROLE = {"developer": "system"}
"""OpenAI's ``developer`` message is the system message; chat templates know ``system`` only."""

Segment = tuple[str, bool]
"""A piece of a prompt and whether the template wrote it (True: it may spell control tokens)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_ASCII_SPACE = " \t\n\v\f\r"  # what llama.cpp strips beside an LSTRIP/RSTRIP token (C isspace)
_SPECIAL = (
    llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
)  # the attributes llama.cpp's partition matches with parse_special on
_LSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
_RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
_SPLIT_CACHE = 4096
"""Template parts whose control-token split is remembered (a template writes the same few again and again)."""
_SPLIT_CACHE_CHARS = 2048
"""Longest template part remembered: a long one (a tools block) is particular to its request."""
_BUFFER_TOKENS = 4096


# ---- caller text --------------------------------------------------------------------------------------


def plain_text(value: object, param: str) -> str:
    """``value`` if it is a string of valid Unicode; otherwise ``BadRequest`` naming ``param``."""
    if not isinstance(value, str):
        raise errors.BadRequest(f"'{param}' must be a string", param=param)
    if _SURROGATE.search(value) is not None:
        raise errors.BadRequest(
            f"'{param}' is not valid Unicode: it holds a lone surrogate (such as \\ud800)",
            code="invalid_unicode",
            param=param,
        )
    return value


class Turn(NamedTuple):
    """One chat message as the template sees it."""

    role: str
    """From ``CHAT_ROLES`` (``developer`` is ``system``)."""
    text: str
    """The content: caller text, rendered through a stand-in."""
    calls: tuple[dict[str, Any], ...] = ()
    """An assistant's tool calls (``tools.history_calls``: arguments as objects), rendered by the template."""
    call_id: str | None = None
    """A tool message's ``tool_call_id``."""
    name: str | None = None
    """A tool message's function name."""

    def message(self, content: str) -> dict[str, Any]:
        """The template's message, with ``content`` (the text, or its stand-in) as its content."""
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.calls:
            message["tool_calls"] = list(self.calls)
        if self.call_id is not None:
            message["tool_call_id"] = self.call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def chat_turns(messages: object) -> list[Turn]:
    """The turns of chat ``messages``; ``BadRequest`` naming the field (``messages[i].role``…) otherwise.

    A role is one of ``CHAT_ROLES`` (``developer`` becomes ``system``); content is a string, null (empty)
    or a list of text parts (``{"type": "text", "text": …}``, joined without separator, as templates that
    take parts do). An assistant message may carry ``tool_calls``, a tool message ``tool_call_id`` and
    ``name``. Nothing else of a message reaches the template."""
    if not isinstance(messages, list) or not messages:
        raise errors.BadRequest("'messages' must be a non-empty list of messages", param="messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise errors.BadRequest(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise errors.BadRequest(
                f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}", param=f"{where}.role"
            )
        text = _content(message.get("content"), f"{where}.content")
        calls: tuple[dict[str, Any], ...] = ()
        if message.get("tool_calls") not in (None, []):
            if role != "assistant":
                raise errors.BadRequest(
                    f"'{where}.tool_calls': only assistant messages carry tool calls",
                    param=f"{where}.tool_calls",
                )
            calls = tuple(history_calls(message["tool_calls"], f"{where}.tool_calls"))
        call_id = name = None
        if role == "tool":
            call_id = _optional(message.get("tool_call_id"), CALL_ID, f"{where}.tool_call_id")
            name = _optional(message.get("name"), TOOL_NAME, f"{where}.name")
        turns.append(Turn(_TEMPLATE_ROLE.get(role, role), text, calls, call_id, name))
    return turns


def _optional(value: object, shape: re.Pattern[str], where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or shape.fullmatch(value) is None:
        raise errors.BadRequest(f"'{where}' must be a short identifier ({shape.pattern})", param=where)
    return value


def _content(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return plain_text(content, where)
    if not isinstance(content, list):
        raise errors.BadRequest(f"'{where}' must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise errors.BadRequest(
                f"'{at}' is not a text part: local models take text only", param=f"{at}.type"
            )
        texts.append(plain_text(part.get("text"), f"{at}.text"))
    return "".join(texts)


def check_fits(count: int, chars: int, n_ctx: int, longest_piece: int, param: str) -> None:
    """Refuse, before any rendering or tokenizing, a prompt that cannot fit ``n_ctx`` tokens: more
    ``count`` items (messages) than tokens, as every message takes one at least, or more characters than
    ``n_ctx`` tokens can spell (no token is longer than ``longest_piece`` bytes, a character is one at
    least)."""
    if count > n_ctx:
        raise errors.BadRequest(
            f"{count} messages cannot fit this model's context of {n_ctx} tokens",
            code="context_length_exceeded",
            param=param,
        )
    if chars > n_ctx * longest_piece:
        raise errors.BadRequest(
            f"the text is {chars} characters; no text longer than {n_ctx * longest_piece} characters fits "
            f"this model's context of {n_ctx} tokens",
            code="context_length_exceeded",
            param=param,
        )


# ---- the chat prompt of a request ---------------------------------------------------------------------


def chat_prompt(
    render: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str],
    tokenizer: PromptTokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    n_ctx: int,
    stop: Callable[[], bool],
) -> list[int] | None:
    """The token ids of a chat request's prompt; None once ``stop()`` is true.

    ``render(messages, tools)`` is the model's chat template (its errors already ``BadRequest``);
    ``tools`` the definitions the template lists (``tools.plan_tools``), or None. Raises ``BadRequest``
    for messages that are not chat messages, a prompt that cannot fit ``n_ctx`` tokens (refused before
    it is rendered when its size alone tells), caller text the template renders that spells a control
    token, or a template that changes caller text. More than ``n_ctx`` ids come back when the prompt
    outgrew the context (tokenizing stopped there)."""
    turns = chat_turns(messages)
    offered = tools or None
    # Caller text the template renders itself: counted against the context, and kept from the stand-in.
    rendered = [json.dumps(offered, ensure_ascii=False)] if offered else []
    rendered += [json.dumps(turn.calls, ensure_ascii=False) for turn in turns if turn.calls]
    chars = sum(len(turn.text) for turn in turns) + sum(len(text) for text in rendered)
    check_fits(len(turns), chars, n_ctx, tokenizer.longest_piece, "messages")
    screen_template_text(tokenizer.controls, turns, offered)
    segments = chat_segments(lambda shown: render(shown, offered), turns, avoid=rendered)
    if stop():
        return None
    # The template writes bos itself: nothing is added around the segments.
    return tokenizer.segments(segments, limit=n_ctx, stop=stop)


def screen_template_text(
    controls: ControlTokens, turns: Sequence[Turn], tools: list[dict[str, Any]] | None
) -> None:
    """Refuse (``BadRequest`` naming the field) tool definitions, tool calls, call ids and names in which
    a string or key spells a control token: the template renders them among its own text."""
    if tools:
        _screen(controls, tools, "tools")
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if turn.calls:
            _screen(controls, list(turn.calls), f"{where}.tool_calls")
        if turn.call_id is not None:
            _screen(controls, turn.call_id, f"{where}.tool_call_id")
        if turn.name is not None:
            _screen(controls, turn.name, f"{where}.name")


def _screen(controls: ControlTokens, value: object, where: str) -> None:
    pending: list[tuple[object, str]] = [(value, where)]
    while pending:
        node, at = pending.pop()
        if isinstance(node, str):
            _refuse_control_text(controls, node, at, "")
        elif isinstance(node, Mapping):
            children = []
            for key, child in node.items():
                name = str(key)
                _refuse_control_text(controls, name, at, "a key of ")
                children.append((child, f"{at}{_path_step(name)}"))
            pending += reversed(children)
        elif isinstance(node, list | tuple):
            pending += reversed([(child, f"{at}[{k}]") for k, child in enumerate(node)])


def _refuse_control_text(controls: ControlTokens, text: str, where: str, what: str) -> None:
    found = controls.first_in(text) or controls.first_in(json.dumps(text, ensure_ascii=False))
    if found is not None:
        raise errors.BadRequest(
            f"{what}'{where}' holds the text of the control token {found!r}; the chat template renders it "
            "among its own text, where the model would read it as that token",
            code="control_token_text",
            param=where,
        )


_PATH_KEY = re.compile(r"[A-Za-z0-9_$-]{1,64}")


def _path_step(key: str) -> str:
    """A key as a step of an error's ``param``: ``.key``, or its JSON form in brackets (cut short)."""
    if _PATH_KEY.fullmatch(key):
        return f".{key}"
    shown = json.dumps(key)
    if len(shown) > 66:
        shown = shown[:62] + '..."'
    return f"[{shown}]"


# ---- template text and caller text ------------------------------------------------------------------


def chat_segments(
    render: Callable[[list[dict[str, Any]]], str], turns: Sequence[Turn], *, avoid: Sequence[str] = ()
) -> list[Segment]:
    """The rendered prompt of ``turns`` as template parts and caller parts (see the module docstring).

    ``render`` is the model's chat template on the turns' messages; ``avoid`` other text the template
    renders, which the stand-in must not occur in. Raises ``BadRequest`` (``chat_template_error``) when
    the template changes caller text beyond trimming it."""
    texts = [turn.text for turn in turns]
    nonce = _nonce([*texts, *avoid])
    # Empty content stays empty: templates test it (`{% if message.content %}`), a stand-in would pass.
    shape = render([turn.message(f"{nonce}{i}_" if turn.text else "") for i, turn in enumerate(turns)])
    prompt = render([turn.message(turn.text) for turn in turns])
    parts = re.split(re.escape(nonce) + r"(\d+)_", shape)  # [template, index, template, index, …, template]
    if not prompt.startswith(parts[0]):
        raise _template_changed()
    segments: list[Segment] = [(parts[0], True)]
    at = len(parts[0])
    for k in range(1, len(parts), 2):
        index, template = int(parts[k]), parts[k + 1]
        if index >= len(texts):
            raise _template_changed()
        for text in _trimmed(texts[index]):
            if prompt.startswith(text, at) and prompt.startswith(template, at + len(text)):
                break
        else:
            raise _template_changed()
        segments += [(text, False), (template, True)]
        at += len(text) + len(template)
    if at != len(prompt):
        raise _template_changed()
    return [segment for segment in segments if segment[0]]


def _nonce(texts: Sequence[str]) -> str:
    """Letters and digits only (no template syntax, untouched by trim), and in no caller text."""
    while True:
        nonce = "phi" + secrets.token_hex(12)
        if not any(nonce in text for text in texts):
            return nonce


def _trimmed(text: str) -> list[str]:
    forms = [text]
    for form in (text.strip(), text.lstrip(), text.rstrip()):
        if form not in forms:
            forms.append(form)
    return forms


def _template_changed() -> errors.BadRequest:
    return errors.BadRequest(
        "this model's chat template changes message text beyond trimming it; "
        "its own text cannot be told apart from the messages",
        code="chat_template_error",
    )


class ControlTokens:
    """The vocabulary's special-parsed tokens (control, user-defined, unknown) found in template text.

    At each position the longest token wins; llama.cpp's partition takes the longest token first over the
    whole text, which differs only where two tokens overlap. Linear in the text: positions are found by
    first character, and each is tried once per distinct token length."""

    def __init__(self, tokens: Mapping[str, tuple[int, int]]) -> None:
        """``tokens``: text -> (token id, llama.cpp attributes)."""
        self._tokens = dict(tokens)
        self._lengths = sorted({len(text) for text in self._tokens}, reverse=True)
        firsts = sorted({text[0] for text in self._tokens})
        self._starts = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if firsts else None
        self._cache: dict[str, list[str | tuple[int, int]]] = {}

    def split(self, text: str) -> list[str | tuple[int, int]]:
        """``text`` as plain strings and (token id, attributes) of the control tokens in it."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        pieces: list[str | tuple[int, int]] = []
        start = 0
        for at, key, token in self._matches(text):
            if at > start:
                pieces.append(text[start:at])
            pieces.append(token)
            start = at + len(key)
        if start < len(text):
            pieces.append(text[start:])
        if len(text) <= _SPLIT_CACHE_CHARS:
            if len(self._cache) >= _SPLIT_CACHE:
                self._cache.clear()
            self._cache[text] = pieces
        return pieces

    def first_in(self, text: str) -> str | None:
        """The text of the first control token ``text`` holds, if any."""
        for _, key, _ in self._matches(text):
            return key
        return None

    def _matches(self, text: str) -> Iterator[tuple[int, str, tuple[int, int]]]:
        """(position, token text, token) of each control token, left to right, longest first."""
        pos = 0
        while self._starts is not None and (found := self._starts.search(text, pos)) is not None:
            at = found.start()
            for length in self._lengths:
                key = text[at : at + length]  # shorter near the end: then it can only be a shorter token
                token = self._tokens.get(key)
                if token is not None:
                    yield at, key, token
                    pos = at + len(key)
                    break
            else:
                pos = at + 1


class PromptTokenizer:
    """Segments to token ids with one model's vocabulary; see the module docstring for the rules."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, n_vocab: int) -> None:
        self._vocab = vocab
        special: dict[str, tuple[int, int]] = {}
        longest = 1
        piece = ctypes.create_string_buffer(256)
        for token in range(n_vocab):
            attr = int(llama_cpp.llama_vocab_get_attr(vocab, token))
            if attr & _SPECIAL:
                text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")
                if text:
                    special.setdefault(text, (token, attr))
            else:
                n = llama_cpp.llama_token_to_piece(vocab, token, piece, len(piece), 0, False)
                longest = max(longest, abs(n))  # negative: the piece needs that many bytes
        self.controls = ControlTokens(special)
        self.longest_piece = longest
        """Bytes of the longest piece plain text can become: a bound on characters per token."""
        self._buffer = (llama_cpp.llama_token * _BUFFER_TOKENS)()

    def plain(self, text: str, *, add_special: bool = False) -> list[int]:
        """``text`` tokenized with special tokens off; ``add_special`` adds the model's bos (and eos)."""
        data = text.encode("utf-8")
        need = len(data) + 4  # at most a token per byte, plus a space prefix, bos and eos
        out = self._buffer if need <= _BUFFER_TOKENS else (llama_cpp.llama_token * need)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), out, len(out), add_special, False)
        if n < 0:
            out = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), out, len(out), add_special, False)
        return list(out[:n])

    def segments(
        self, segments: Iterable[Segment], *, limit: int, stop: Callable[[], bool]
    ) -> list[int] | None:
        """Token ids of the segments, control tokens only from template segments; None once ``stop()``
        (checked before each segment) is true. Returns early, with more than ``limit`` ids, once the
        prompt has outgrown ``limit``."""
        tokens: list[int] = []
        run: list[str] = []  # plain text since the last control token: one llama.cpp fragment
        strip_next = False  # the last control token strips the whitespace after it (RSTRIP)
        for text, from_template in segments:
            if stop():
                return None
            for piece in self.controls.split(text) if from_template else (text,):
                if isinstance(piece, str):
                    if strip_next:
                        piece = piece.lstrip(_ASCII_SPACE)
                        strip_next = not piece
                    run.append(piece)
                    continue
                token, attr = piece
                before = "".join(run)
                run.clear()
                if attr & _LSTRIP:
                    before = before.rstrip(_ASCII_SPACE)
                if before:
                    tokens += self.plain(before)
                tokens.append(token)
                strip_next = bool(attr & _RSTRIP)
                if len(tokens) > limit:
                    return tokens
        rest = "".join(run)
        if rest:
            tokens += self.plain(rest)
        return tokens
