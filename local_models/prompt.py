"""Prompts as token ids, with the caller's text kept as text: only the chat template may write control tokens.

Owns: reading chat messages into (role, text) turns (``chat_turns``: the role allow-list, text parts,
lone surrogates refused); refusing a prompt that cannot fit the context before any work is done on it
(``check_fits``); splitting a rendered chat prompt into the template's own text and the caller's text
(``chat_segments``); finding control tokens in template text (``ControlTokens``); and tokenizing the
segments (``PromptTokenizer``) in linear time, stoppable between segments, and cut short as soon as the
prompt has outgrown the context.

How caller text is told apart: the template is rendered once with a random stand-in in place of each
caller string and once for real. The stand-in rendering, split at the stand-ins, gives the template's
parts; the real prompt must be exactly those parts with the caller strings between them (as given, or
trimmed of surrounding whitespace, which templates do), else the request is refused. Template parts are
searched for control tokens; caller text is tokenized with llama.cpp's ``parse_special`` off. Each run of
plain text between two control tokens is tokenized as one piece, as llama.cpp itself does, so a benign
prompt gets the very tokens it got when the whole rendering was tokenized with special tokens on.

Must never: let caller text (message content, the completion prompt) become a control token; let a role
that is not on the allow-list reach a template (a role is template text); give llama.cpp a long text to
tokenize with ``parse_special`` on (its special-token partition is quadratic in the matches: 88 s for 30k
one-character messages, on the model's worker); or be used from any thread but the model's worker (the
tokenizer reads the ``Llama``'s vocabulary and reuses one buffer).
"""

from __future__ import annotations

import ctypes
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence

import llama_cpp

from appliance import errors

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
"""The roles a chat message may have."""
_TEMPLATE_ROLE = {"developer": "system"}
"""OpenAI's ``developer`` message is the system message; chat templates know ``system`` only."""

Turn = tuple[str, str]
"""(role, text) of one chat message, as the template sees it."""
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


def chat_turns(messages: object) -> list[Turn]:
    """The (role, text) of each message; ``BadRequest`` naming the field (``messages[i].role``…) otherwise.

    A role is one of ``CHAT_ROLES`` (``developer`` becomes ``system``); content is a string, null (empty)
    or a list of text parts (``{"type": "text", "text": …}``, joined without separator, as templates that
    take parts do). Nothing else of a message reaches the template."""
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
        turns.append((_TEMPLATE_ROLE.get(role, role), _content(message.get("content"), f"{where}.content")))
    return turns


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


# ---- template text and caller text ------------------------------------------------------------------


def chat_segments(render: Callable[[list[dict[str, str]]], str], turns: Sequence[Turn]) -> list[Segment]:
    """The rendered prompt of ``turns`` as template parts and caller parts (see the module docstring).

    ``render`` is the model's chat template on ``{"role", "content"}`` messages. Raises ``BadRequest``
    (``chat_template_error``) when the template changes caller text beyond trimming it."""
    texts = [text for _, text in turns]
    nonce = _nonce(texts)
    # Empty content stays empty: templates test it (`{% if message.content %}`), a stand-in would pass.
    shape = render(
        [{"role": role, "content": f"{nonce}{i}_" if text else ""} for i, (role, text) in enumerate(turns)]
    )
    prompt = render([{"role": role, "content": text} for role, text in turns])
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
        start = pos = 0
        while self._starts is not None and (found := self._starts.search(text, pos)) is not None:
            at = pos = found.start()
            for length in self._lengths:
                key = text[at : at + length]  # shorter near the end: then it can only be a shorter token
                token = self._tokens.get(key)
                if token is not None:
                    if at > start:
                        pieces.append(text[start:at])
                    pieces.append(token)
                    start = pos = at + len(key)
                    break
            else:
                pos = at + 1
        if start < len(text):
            pieces.append(text[start:])
        if len(self._cache) >= _SPLIT_CACHE:
            self._cache.clear()
        self._cache[text] = pieces
        return pieces


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
