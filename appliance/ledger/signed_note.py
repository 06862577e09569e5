"""Signed checkpoints of the audit ledger's Merkle tree: C2SP tlog-checkpoint text in a C2SP signed note.

An auditor keeps these as small text files off the appliance and checks them with standard tooling (Go's
``golang.org/x/mod/sumdb/note``, transparency-dev, Sigstore). Copies held elsewhere are what catch a ledger
cut short or rewritten, even one re-signed with the appliance key: the log must never sign a checkpoint
inconsistent with one it signed before. The note (c2sp.org/tlog-checkpoint, c2sp.org/signed-note)::

    phi-gateway.example-hospital/node-a      origin: the ledger's identity, also the signing key's name
    1234                                     tree size: decimal, no leading zeros
    7kk0Pz1x3Bq4Q5uU...=                     RFC 6962 root hash: standard base64 of 32 bytes
    timestamp 2026-11-25T10:00:00.123Z       extension lines: ours, opaque to generic tools
    reason schedule
                                             a blank line ends the signed text
    <U+2014 EM DASH> phi-gateway.example-hospital/node-a <base64(key hash || Ed25519 signature)>

Key hash = SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]. An auditor is given the verifier
key ``<name>+<8 hex key hash>+<base64(0x01 || public key)>``, the string Go's ``note.NewVerifier`` reads.
tlog-checkpoint allows extension lines but does not recommend them (log monitors cannot audit them): ours
are signed like the rest, generic tools pass over them, and only the size and root are checked by proofs.

Owns: the checkpoint text and its strict parser, the signed-note envelope (writing, parsing and verifying
Ed25519 signature lines) and the verifier key string.

Must never: trust a note's text before a known key's signature over it verifies; accept a checkpoint whose
only valid signatures come from keys not named for its origin; write a note that its own parser or Go's
``note.Open`` would refuse; decide which keys are trusted or load them (callers pass keys in). It computes
no Merkle tree and no consistency proof: ``merkle`` owns the tree, and the empty tree's root that a
checkpoint of size 0 must carry; it is the one module of the ledger this one imports.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.errors import CheckpointError
from appliance.ledger.merkle import EMPTY_ROOT

if TYPE_CHECKING:
    from appliance.signing_keys import SigningKey

REASONS: Final[frozenset[str]] = frozenset(
    {"head", "schedule", "policy-import", "shutdown", "export", "archive", "manual"}
)
MAX_NOTE_BYTES: Final = 1 << 20
MAX_SIGNATURES: Final = 100
"""Go's ``note.Open`` cap; signed-note requires accepting at least 16."""
MAX_TREE_SIZE: Final = (1 << 63) - 1
"""Go's sumdb parses the size as an int64."""

_ALG_ED25519: Final = b"\x01"
_SIG_PREFIX: Final = "\u2014 "
_FIELDS: Final = ("origin", "tree size", "root hash", "timestamp", "reason")
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")
_SIZE: Final = re.compile(r"0|[1-9][0-9]*")
_TIMESTAMP: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_HEX8: Final = re.compile(r"[0-9a-fA-F]{8}")


@dataclass(frozen=True)
class Checkpoint:
    """One tree head. Constructing it validates every field, so a ``Checkpoint`` always has a valid body."""

    origin: str
    size: int
    root: bytes
    timestamp: str
    reason: str

    def __post_init__(self) -> None:
        problem = _field_problem(self.origin, self.size, self.root, self.timestamp, self.reason)
        if problem:
            raise CheckpointError(f"invalid checkpoint: {problem}")

    def body(self) -> str:
        """The signed text: five lines, each ending in a newline."""
        root = base64.b64encode(self.root).decode("ascii")
        return f"{self.origin}\n{self.size}\n{root}\ntimestamp {self.timestamp}\nreason {self.reason}\n"


@dataclass(frozen=True)
class Verifier:
    """A public key an auditor trusts, under the key name that signature lines carry."""

    name: str
    key_hash: bytes
    public: Ed25519PublicKey

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem:
            raise CheckpointError(f"invalid verifier key: {problem}")
        expected = _key_hash(self.name, self.public)
        if self.key_hash != expected:
            raise CheckpointError(
                f"invalid verifier key: key hash {_hex(self.key_hash)} does not match the name and public"
                f" key (expected {expected.hex()})"
            )

    def __hash__(self) -> int:
        # cryptography's public key objects compare by value but are not hashable.
        return hash((self.name, self.key_hash, _raw(self.public)))

    @classmethod
    def from_key(cls, name: str, public: Ed25519PublicKey) -> Verifier:
        problem = _name_problem(name)
        if problem:
            raise CheckpointError(f"invalid verifier key: {problem}")
        return cls(name, _key_hash(name, public), public)

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Read ``<name>+<8 hex key hash>+<base64(0x01 || public key)>``; the base64 may itself hold ``+``."""
        name, plus1, rest = text.partition("+")
        hash_hex, plus2, key_b64 = rest.partition("+")
        if not (plus1 and plus2):
            raise CheckpointError("not a verifier key: expected '<name>+<8 hex key hash>+<base64 key>'")
        problem = _name_problem(name)
        if problem:
            raise CheckpointError(f"not a verifier key: {problem}")
        if not _HEX8.fullmatch(hash_hex):
            raise CheckpointError(f"not a verifier key: key hash {_shown(hash_hex)} is not 8 hex digits")
        raw = _b64decode(key_b64)
        if raw is None:
            raise CheckpointError(
                "not a verifier key: the key is not canonical standard base64"
                " (wrong padding, nonzero unused bits, stray whitespace or newline?)"
            )
        if raw[:1] != _ALG_ED25519:
            alg = f"0x{raw[0]:02x}" if raw else "none"
            raise CheckpointError(
                f"not a verifier key: signature type {alg} is not supported; only Ed25519 (0x01) is"
            )
        if len(raw) != 33:
            raise CheckpointError(f"not a verifier key: the Ed25519 key is {len(raw) - 1} bytes, expected 32")
        public = Ed25519PublicKey.from_public_bytes(raw[1:])
        expected = _key_hash(name, public)
        if bytes.fromhex(hash_hex) != expected:
            raise CheckpointError(
                f"not a verifier key: key hash {hash_hex} does not match the name and key"
                f" (expected {expected.hex()})"
            )
        return cls(name, expected, public)

    def encode(self) -> str:
        key = base64.b64encode(_ALG_ED25519 + _raw(self.public)).decode("ascii")
        return f"{self.name}+{self.key_hash.hex()}+{key}"


@dataclass(frozen=True)
class _SignatureLine:
    name: str
    key_hash: bytes
    signature: bytes

    @property
    def label(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}"


def sign(checkpoint: Checkpoint, key: SigningKey) -> str:
    """The full note: the checkpoint's body, a blank line, one signature line named for its origin."""
    return sign_note(checkpoint.body(), checkpoint.origin, key.private)


def sign_note(text: str, name: str, private: Ed25519PrivateKey) -> str:
    """Sign any note text under key ``name``; byte-identical to Go's ``note.Sign`` for the same key."""
    problem = _name_problem(name)
    if problem:
        raise CheckpointError(f"cannot sign: {problem}")
    if not text.endswith("\n"):
        raise CheckpointError("cannot sign: the note text must end with a newline")
    control = _CONTROL.search(text)
    if control:
        raise CheckpointError(f"cannot sign: the note text contains {_describe(control.group())}")
    message = text.encode("utf-8")
    signature = private.sign(message)
    line = base64.b64encode(_key_hash(name, private.public_key()) + signature).decode("ascii")
    note = f"{text}\n{_SIG_PREFIX}{name} {line}\n"
    if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
        raise CheckpointError(f"cannot sign: the note would be larger than {MAX_NOTE_BYTES} bytes")
    return note


def parse_unverified(note: str | bytes) -> Checkpoint:
    """The checkpoint in ``note``, its structure checked and its signatures NOT: for display, never trust."""
    text, _ = _split_note(note)
    return _parse_body(text)


def open_note(note: str | bytes, verifiers: Sequence[Verifier]) -> Checkpoint:
    """The checkpoint in ``note``, once a known key named for its origin has a valid signature over it."""
    text, signers = _verify(note, verifiers)
    checkpoint = _parse_body(text)
    if not any(verifier.name == checkpoint.origin for verifier in signers):
        names = ", ".join(sorted({verifier.name for verifier in signers}))
        raise CheckpointError(
            f"origin mismatch: the checkpoint's origin is {_shown(checkpoint.origin)} but it is signed"
            f" only by {names}"
        )
    return checkpoint


def verify_note_signatures(note: str | bytes, verifiers: Sequence[Verifier]) -> str:
    """The signed-note layer alone: the note's text once a known key's signature over it verifies.

    Signature lines from unknown keys are ignored; every line from a known key (name and key hash both
    match) must verify, or the whole note is refused.
    """
    text, _ = _verify(note, verifiers)
    return text


def _verify(note: str | bytes, verifiers: Sequence[Verifier]) -> tuple[str, list[Verifier]]:
    text, lines = _split_note(note)
    known: dict[tuple[str, bytes], list[Verifier]] = {}
    for verifier in verifiers:
        same = known.setdefault((verifier.name, verifier.key_hash), [])
        if verifier not in same:
            same.append(verifier)
    message = text.encode("utf-8")
    signers: list[Verifier] = []
    unknown: list[str] = []
    for line in lines:
        candidates = known.get((line.name, line.key_hash))
        if candidates is None:
            if line.label not in unknown:
                unknown.append(line.label)
            continue
        if len(candidates) > 1:
            raise CheckpointError(
                f"ambiguous verifier key {line.label}: different public keys were given under that name and"
                " key hash"
            )
        verifier = candidates[0]
        try:
            if len(line.signature) != 64:
                raise InvalidSignature
            verifier.public.verify(line.signature, message)
        except InvalidSignature as exc:
            raise CheckpointError(f"signature does not verify: key {line.label}") from exc
        signers.append(verifier)
    if not signers:
        given = ", ".join(f"{name}+{key_hash.hex()}" for name, key_hash in known) or "none"
        raise CheckpointError(f"signed by an unknown key {', '.join(unknown)} (known keys: {given})")
    return text, signers


def _split_note(note: str | bytes) -> tuple[str, list[_SignatureLine]]:
    """Check a signed note's envelope as Go's ``note.Open`` does, and a little more strictly."""
    if len(note) > MAX_NOTE_BYTES:
        raise _malformed(f"larger than {MAX_NOTE_BYTES} bytes")
    try:
        if isinstance(note, bytes):
            data, text = note, note.decode("utf-8")
        else:
            data, text = note.encode("utf-8"), note
    except UnicodeError as exc:
        raise _malformed("not valid UTF-8") from exc
    if len(data) > MAX_NOTE_BYTES:
        raise _malformed(f"larger than {MAX_NOTE_BYTES} bytes")
    control = _CONTROL.search(text)
    if control:
        line = text.count("\n", 0, control.start()) + 1
        raise _malformed(f"line {line} contains {_describe(control.group())}")
    split = text.rfind("\n\n")
    if split < 0:
        raise _malformed("no blank line between the text and the signature lines")
    body, block = text[: split + 1], text[split + 2 :]
    if not block:
        raise _malformed("no signature lines after the last blank line")
    if not block.endswith("\n"):
        raise _malformed("the last line does not end in a newline")
    raw_lines = block[:-1].split("\n")
    if len(raw_lines) > MAX_SIGNATURES:
        raise _malformed(f"{len(raw_lines)} signature lines, more than the {MAX_SIGNATURES} allowed")
    return body, [_parse_signature_line(n, line) for n, line in enumerate(raw_lines, 1)]


def _parse_signature_line(n: int, line: str) -> _SignatureLine:
    if not line.startswith(_SIG_PREFIX):
        raise _malformed(
            f"signature line {n} does not start with an em dash (U+2014) and a space: {_shown(line)}"
        )
    name, space, b64 = line[len(_SIG_PREFIX) :].partition(" ")
    if not space or not b64:
        raise _malformed(f"signature line {n} is not '<em dash> <key name> <base64 signature>'")
    problem = _name_problem(name)
    if problem:
        raise _malformed(f"signature line {n}: {problem}")
    raw = _b64decode(b64)
    if raw is None:
        raise _malformed(f"signature line {n}: the signature is not canonical standard base64")
    if len(raw) < 5:
        raise _malformed(f"signature line {n}: the signature is shorter than a key hash and one byte")
    return _SignatureLine(name, raw[:4], raw[4:])


def _parse_body(text: str) -> Checkpoint:
    lines = text[:-1].split("\n")
    for n, line in enumerate(lines, 1):
        if not line:
            raise _malformed(f"line {n} is empty; every line of the text must have content")
    if len(lines) < len(_FIELDS):
        missing = ", ".join(_FIELDS[len(lines) :])
        raise _malformed(f"the text has {len(lines)} lines; missing {missing}")
    if len(lines) > len(_FIELDS):
        raise _malformed(
            f"unexpected line {len(_FIELDS) + 1} after the reason: {_shown(lines[len(_FIELDS)])}"
        )
    origin, size_text, root_text, timestamp_line, reason_line = lines
    if not _SIZE.fullmatch(size_text) or len(size_text) > 19:
        raise _malformed(
            f"tree size {_shown(size_text)} is not a decimal number without leading zeros, at most"
            f" {MAX_TREE_SIZE}"
        )
    root = _b64decode(root_text)
    if root is None:
        raise _malformed(f"root hash {_shown(root_text)} is not canonical standard base64")
    if timestamp_line[:10] != "timestamp ":
        raise _malformed(f"line 4 is not 'timestamp <RFC 3339 UTC time>': {_shown(timestamp_line)}")
    if reason_line[:7] != "reason ":
        raise _malformed(f"line 5 is not 'reason <word>': {_shown(reason_line)}")
    size, timestamp, reason = int(size_text), timestamp_line[10:], reason_line[7:]
    problem = _field_problem(origin, size, root, timestamp, reason)
    if problem:
        raise _malformed(problem)
    return Checkpoint(origin, size, root, timestamp, reason)


def _field_problem(origin: str, size: int, root: bytes, timestamp: str, reason: str) -> str | None:
    if not isinstance(origin, str):
        return "origin is not a string"
    problem = _name_problem(origin)
    if problem:
        return f"origin: {problem}"
    if not origin.isprintable():
        return f"origin {_shown(origin)} contains a non-printable character"
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        return f"tree size {size!r} is not an integer from 0 to {MAX_TREE_SIZE}"
    if not isinstance(root, bytes) or len(root) != 32:
        length = len(root) if isinstance(root, bytes) else type(root).__name__
        return f"root hash is {length} bytes, expected 32"
    if size == 0 and root != EMPTY_ROOT:
        return "an empty tree's root hash must be SHA-256 of nothing (RFC 6962)"
    if not isinstance(timestamp, str) or not _TIMESTAMP.fullmatch(timestamp):
        return (
            f"timestamp {_shown(timestamp)} is not RFC 3339 UTC with milliseconds (2026-11-25T10:00:00.123Z)"
        )
    try:
        datetime.fromisoformat(timestamp)
    except ValueError:
        return f"timestamp {_shown(timestamp)} is not a real date and time"
    if reason not in REASONS:
        return f"reason {_shown(reason)} is not one of {', '.join(sorted(REASONS))}"
    return None


def _name_problem(name: str) -> str | None:
    """signed-note's rule for key names, plus no control characters (notes cannot carry them)."""
    if not isinstance(name, str) or not name:
        return "the key name is empty"
    if "+" in name or any(ch.isspace() for ch in name) or _CONTROL.search(name):
        return f"key name {_shown(name)} contains a space, '+' or control character"
    return None


def _key_hash(name: str, public: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + _ALG_ED25519 + _raw(public)).digest()[:4]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64decode(text: str) -> bytes | None:
    """Standard base64 in its one canonical spelling (padding present, unused bits zero), else None."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def _malformed(why: str) -> CheckpointError:
    return CheckpointError(f"not a checkpoint: {why}")


def _describe(char: str) -> str:
    if char == "\r":
        return "a carriage return (U+000D); lines must end in a bare newline"
    if char == "\x00":
        return "a NUL character (U+0000)"
    return f"the control character U+{ord(char):04X}"


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _hex(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)
