"""Signed checkpoints: C2SP tlog-checkpoint text in a C2SP signed note, checked against published vectors."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.ledger.merkle import EMPTY_ROOT
from appliance.ledger.signed_note import (
    MAX_NOTE_BYTES,
    REASONS,
    Checkpoint,
    CheckpointError,
    Verifier,
    open_note,
    parse_unverified,
    sign,
    sign_note,
    verify_note_signatures,
)
from appliance.signing_keys import SigningKey, keyid_of
from appliance.timestamps import now as timestamp_now

ORIGIN = "phi-gateway.example-hospital/node-a"
ROOT = hashlib.sha256(b"some tree").digest()
EM = "\u2014"

# Vectors from Go's golang.org/x/mod/sumdb/note (note.go package docs and note_test.go).
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
PETER_SIG = (
    f"{EM} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
    "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    f"{EM} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01"
    "oOTGwnWLox33WWd1RvMc+QQ=\n"
)

# A real checkpoint of Go's checksum database (a tlog-checkpoint whose origin differs from its key name),
# and sum.golang.org's published verifier key: its base64 contains '+'.
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_TEXT = "go.sum database tree\n49189689\nftjbAOzaupaIvaPo/G+Dk63nxOZ2s1OPOKIaPtXs7S4=\n"
SUMDB_NOTE = (
    SUMDB_TEXT + f"\n{EM} sum.golang.org Az3grlKZssqRoMNPpZfKt0TphbbcF+pzXqElURJKRNFKfaUAgqeI5k2AORH0QAhg"
    "/ebRwyIqD/OqP4oLtLnNumvOBAM=\n"
)


def _key() -> SigningKey:
    private = Ed25519PrivateKey.generate()
    return SigningKey(keyid_of(private.public_key()), private)


def _raw(key: SigningKey) -> bytes:
    return key.public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _checkpoint(**changes: object) -> Checkpoint:
    fields: dict[str, object] = {
        "origin": ORIGIN,
        "size": 1234,
        "root": ROOT,
        "timestamp": "2026-11-25T10:00:00.123Z",
        "reason": "schedule",
    }
    fields.update(changes)
    return Checkpoint(**fields)  # type: ignore[arg-type]


@pytest.fixture
def key() -> SigningKey:
    return _key()


@pytest.fixture
def verifier(key: SigningKey) -> Verifier:
    return Verifier.from_key(ORIGIN, key.public)


@pytest.fixture
def note(key: SigningKey) -> str:
    return sign(_checkpoint(), key)


def _spec_key_hash(name: str, raw_public: bytes) -> bytes:
    """signed-note: key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte Ed25519 public key)[:4]."""
    return hashlib.sha256(name.encode() + bytes([0x0A, 0x01]) + raw_public).digest()[:4]


def _sig_line(name: str, payload: bytes) -> str:
    return f"{EM} {name} {base64.b64encode(payload).decode()}\n"


# --- signing and opening -------------------------------------------------------------------------


def test_sign_writes_the_documented_note(key: SigningKey, note: str) -> None:
    body = (
        f"{ORIGIN}\n1234\n{base64.b64encode(ROOT).decode()}\n"
        "timestamp 2026-11-25T10:00:00.123Z\nreason schedule\n"
    )
    assert _checkpoint().body() == body
    assert note.startswith(body + "\n")
    sig_line = note[len(body) + 1 :]
    assert sig_line.startswith(f"{EM} {ORIGIN} ") and sig_line.endswith("\n") and sig_line.count("\n") == 1
    payload = base64.b64decode(sig_line[:-1].split(" ")[2], validate=True)
    assert len(payload) == 4 + 64
    assert payload[:4] == _spec_key_hash(ORIGIN, _raw(key))
    key.public.verify(payload[4:], body.encode())


def test_sign_then_open_round_trips(note: str, verifier: Verifier) -> None:
    assert open_note(note, [verifier]) == _checkpoint()
    assert open_note(note.encode(), [verifier]) == _checkpoint()
    assert parse_unverified(note) == _checkpoint()


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_reason_round_trips(key: SigningKey, verifier: Verifier, reason: str) -> None:
    checkpoint = _checkpoint(reason=reason, size=0, root=EMPTY_ROOT)
    assert open_note(sign(checkpoint, key), [verifier]) == checkpoint


def test_timestamp_now_is_accepted_rfc3339_utc_milliseconds() -> None:
    stamp = timestamp_now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    assert _checkpoint(timestamp=stamp).timestamp == stamp


# --- verifier keys -------------------------------------------------------------------------------


def test_verifier_encode_parse_round_trip(key: SigningKey, verifier: Verifier) -> None:
    encoded = verifier.encode()
    name, hash_hex, key_b64 = encoded.split("+", 2)
    assert name == ORIGIN
    assert hash_hex == _spec_key_hash(ORIGIN, _raw(key)).hex()
    assert base64.b64decode(key_b64) == b"\x01" + _raw(key)
    parsed = Verifier.parse(encoded)
    assert parsed == verifier
    assert hash(parsed) == hash(verifier)
    assert parsed.encode() == encoded


def test_key_hash_matches_the_spec_formula(key: SigningKey, verifier: Verifier) -> None:
    assert verifier.key_hash == _spec_key_hash(ORIGIN, _raw(key))


@pytest.mark.parametrize("vkey", [PETER_VKEY, ENOCH_VKEY, SUMDB_VKEY])
def test_published_verifier_keys_parse_and_re_encode(vkey: str) -> None:
    parsed = Verifier.parse(vkey)
    assert parsed.encode() == vkey
    raw = base64.b64decode(vkey.split("+", 2)[2])[1:]
    assert parsed.key_hash == _spec_key_hash(parsed.name, raw) == bytes.fromhex(vkey.split("+")[1])


def test_every_mangled_published_verifier_key_is_refused() -> None:
    """Go's TestNewVerifier: every proper substring and every one-byte change of the key fails."""
    for i in range(len(PETER_VKEY) + 1):
        for j in range(i + 1, len(PETER_VKEY) + 1):
            if (i, j) != (0, len(PETER_VKEY)):
                with pytest.raises(CheckpointError):
                    Verifier.parse(PETER_VKEY[i:j])
    for i in range(len(PETER_VKEY)):
        mangled = PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1 :]
        with pytest.raises(CheckpointError):
            Verifier.parse(mangled)


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        (PETER_VKEY + "\n", "whitespace or newline"),
        (" " + PETER_VKEY, "contains a space"),
        ("PeterNeumann+c74f20a3", "expected '<name>+<8 hex key hash>+<base64 key>'"),
        ("PeterNeumann+c74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "not 8 hex digits"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "empty"),
        # From Go's tests: wrong key length and unknown algorithm, each with a matching key hash.
        ("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==", "not canonical"),
        ("PeterNeumann+00000000+" + base64.b64encode(bytes(34)).decode(), "only Ed25519"),
        (
            "PeterNeumann+00000000+" + base64.b64encode(b"\x01" + bytes(33)).decode(),
            "is 33 bytes, expected 32",
        ),
        ("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "only Ed25519"),
    ],
)
def test_bad_verifier_keys_say_why(vkey: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=r"^not a verifier key: ") as info:
        Verifier.parse(vkey)
    assert message in str(info.value)


def test_verifier_construction_checks_its_key_hash(key: SigningKey) -> None:
    with pytest.raises(CheckpointError, match=r"does not match the name and public key"):
        Verifier(ORIGIN, b"\x00\x00\x00\x00", key.public)
    with pytest.raises(CheckpointError, match=r"invalid verifier key"):
        Verifier.from_key("bad+name", key.public)


# --- what verification refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "replacement"),
    [
        (0, "phi-gateway.example-hospital/node-b"),
        (1, "1233"),
        (2, base64.b64encode(hashlib.sha256(b"other tree").digest()).decode()),
        (3, "timestamp 2026-11-25T10:00:00.124Z"),
        (4, "reason manual"),
    ],
    ids=["origin", "size", "root", "timestamp", "reason"],
)
def test_tampering_with_any_field_breaks_the_signature(
    note: str, verifier: Verifier, line: int, replacement: str
) -> None:
    lines = note.split("\n")
    lines[line] = replacement
    tampered = "\n".join(lines)
    parse_unverified(tampered)  # still well formed: only the signature can tell
    with pytest.raises(CheckpointError, match=rf"^signature does not verify: key {re.escape(ORIGIN)}\+"):
        open_note(tampered, [verifier])


def test_a_note_signed_by_another_key_is_from_an_unknown_key(verifier: Verifier) -> None:
    other = sign(_checkpoint(origin="phi-gateway.example-hospital/node-b"), _key())
    with pytest.raises(
        CheckpointError, match=r"^signed by an unknown key phi-gateway.example-hospital/node-b\+"
    ):
        open_note(other, [verifier])


def test_same_name_but_a_different_key_is_rejected(verifier: Verifier) -> None:
    impostor = _key()
    forged = sign(_checkpoint(), impostor)
    expected = _spec_key_hash(ORIGIN, _raw(impostor)).hex()
    with pytest.raises(CheckpointError, match=rf"^signed by an unknown key {re.escape(ORIGIN)}\+{expected}"):
        open_note(forged, [verifier])


def test_no_verifiers_means_unknown_key(note: str) -> None:
    with pytest.raises(CheckpointError, match=r"^signed by an unknown key .*\(known keys: none\)"):
        open_note(note, [])


def test_unknown_key_signature_lines_are_tolerated(note: str, verifier: Verifier) -> None:
    body = _checkpoint().body()
    witness = _key()
    witness_line = sign_note(body, "witness.example/w1", witness.private).split("\n\n")[1]
    garbage = _sig_line("other.example/log", b"\x01\x02\x03\x04" + b"\x00" * 64)
    ml_dsa_sized = _sig_line(ORIGIN, b"\xff\xff\xff\xff" + b"\x07" * 2420)
    own_line = note.split("\n\n")[1]
    extended = body + "\n" + garbage + witness_line + own_line + ml_dsa_sized
    assert open_note(extended, [verifier]) == _checkpoint()
    both = [verifier, Verifier.from_key("witness.example/w1", witness.public)]
    assert open_note(extended, both) == _checkpoint()


def test_a_bad_signature_from_a_known_key_rejects_the_note_even_if_another_verifies(
    note: str, verifier: Verifier
) -> None:
    witness = _key()
    witness_verifier = Verifier.from_key("witness.example/w1", witness.public)
    bad = _sig_line("witness.example/w1", witness_verifier.key_hash + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"^signature does not verify: key witness.example/w1\+"):
        open_note(note + bad, [verifier, witness_verifier])


def test_a_known_key_signature_of_the_wrong_length_does_not_verify(note: str, verifier: Verifier) -> None:
    short = _sig_line(ORIGIN, verifier.key_hash + b"\x00" * 63)
    with pytest.raises(CheckpointError, match=r"^signature does not verify"):
        open_note(note + short, [verifier])


def test_checkpoint_signed_only_by_a_key_not_named_for_its_origin(key: SigningKey) -> None:
    body = _checkpoint().body()
    other = Verifier.from_key("phi-gateway.example-hospital/node-b", key.public)
    note = sign_note(body, other.name, key.private)
    assert verify_note_signatures(note, [other]) == body
    with pytest.raises(
        CheckpointError, match=r"^origin mismatch: .*signed only by phi-gateway.example-hospital/node-b"
    ):
        open_note(note, [other])


def test_different_public_keys_under_one_name_and_hash_are_ambiguous(note: str, verifier: Verifier) -> None:
    twin = object.__new__(Verifier)  # a hash collision cannot be made for real; fake one past validation
    object.__setattr__(twin, "name", verifier.name)
    object.__setattr__(twin, "key_hash", verifier.key_hash)
    object.__setattr__(twin, "public", _key().public)
    with pytest.raises(CheckpointError, match=r"^ambiguous verifier key"):
        open_note(note, [verifier, twin])
    assert open_note(note, [verifier, verifier]) == _checkpoint()  # the same key twice is harmless


# --- malformed notes -----------------------------------------------------------------------------


def _mangle_body(note: str, line: int, value: str | None) -> str:
    body, sigs = note.split("\n\n")
    lines = body.split("\n")
    if value is None:
        del lines[line]
    else:
        lines[line] = value
    return "\n".join(lines) + "\n\n" + sigs


MALFORMED_BODIES = [
    ("root not base64", 2, "not!base64", "root hash 'not!base64' is not canonical standard base64"),
    ("root unpadded", 2, base64.b64encode(ROOT).decode().rstrip("="), "not canonical standard base64"),
    ("root 31 bytes", 2, base64.b64encode(ROOT[:31]).decode(), "root hash is 31 bytes, expected 32"),
    ("root 33 bytes", 2, base64.b64encode(ROOT + b"x").decode(), "root hash is 33 bytes, expected 32"),
    ("size leading zero", 1, "01234", "tree size '01234' is not a decimal number without leading zeros"),
    ("size negative", 1, "-1", "is not a decimal number"),
    ("size hex", 1, "0x10", "is not a decimal number"),
    ("size with space", 1, " 1234", "is not a decimal number"),
    ("size arabic-indic digits", 1, "\u0661\u0662", "is not a decimal number"),
    ("size over int64", 1, str(1 << 63), f"tree size {1 << 63} is not an integer from 0 to {(1 << 63) - 1}"),
    ("size 20 digits", 1, "1" * 20, "is not a decimal number without leading zeros, at most"),
    ("size empty", 1, "", "line 2 is empty"),
    ("missing reason", 4, None, "the text has 4 lines; missing reason"),
    ("unknown reason", 4, "reason because", "reason 'because' is not one of archive, export, head, manual"),
    ("reason label", 4, "why schedule", "line 5 is not 'reason <word>'"),
    ("timestamp label", 3, "time 2026-11-25T10:00:00.123Z", "line 4 is not 'timestamp <RFC 3339 UTC time>'"),
    ("timestamp no ms", 3, "timestamp 2026-11-25T10:00:00Z", "is not RFC 3339 UTC with milliseconds"),
    ("timestamp offset", 3, "timestamp 2026-11-25T10:00:00.123+00:00", "is not RFC 3339 UTC"),
    ("timestamp month 13", 3, "timestamp 2026-13-25T10:00:00.123Z", "is not a real date and time"),
    ("timestamp leap second", 3, "timestamp 2026-12-31T23:59:60.000Z", "is not a real date and time"),
    ("origin with plus", 0, "phi+gateway", "origin: key name 'phi+gateway' contains a space, '+'"),
    ("origin with nbsp", 0, "phi\u00a0gateway", "contains a space"),
    ("origin with BOM", 0, "\ufeff" + ORIGIN, "contains a non-printable character"),
]


@pytest.mark.parametrize(
    ("line", "value", "message"),
    [case[1:] for case in MALFORMED_BODIES],
    ids=[case[0] for case in MALFORMED_BODIES],
)
def test_malformed_checkpoint_text_says_why(
    note: str, verifier: Verifier, line: int, value: str | None, message: str
) -> None:
    bad = _mangle_body(note, line, value)
    with pytest.raises(CheckpointError, match=r"^not a checkpoint: ") as info:
        parse_unverified(bad)
    assert message in str(info.value)


def test_timestamp_and_reason_both_missing(note: str) -> None:
    bad = _mangle_body(_mangle_body(note, 4, None), 3, None)
    with pytest.raises(
        CheckpointError, match=r"^not a checkpoint: the text has 3 lines; missing timestamp, reason$"
    ):
        parse_unverified(bad)


def test_only_signed_content_is_interpreted(key: SigningKey, verifier: Verifier) -> None:
    """A malformed body under a valid signature is still refused; a tampered one fails on its signature."""
    signed_junk = sign_note(f"{ORIGIN}\n01\n", ORIGIN, key.private)
    assert verify_note_signatures(signed_junk, [verifier]) == f"{ORIGIN}\n01\n"
    with pytest.raises(CheckpointError, match=r"^not a checkpoint: "):
        open_note(signed_junk, [verifier])


SIG_LINE_TAIL = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="


def _malformed_notes(note: str) -> list[tuple[str, str | bytes, str]]:
    body, sigs = note.split("\n\n")
    return [
        ("too large", note + " " * MAX_NOTE_BYTES, f"larger than {MAX_NOTE_BYTES} bytes"),
        ("too large bytes", note.encode() + b"\n" * MAX_NOTE_BYTES, "larger than"),
        ("too large multibyte", note[:-1] + "\u00e9" * (MAX_NOTE_BYTES // 2) + "\n", "larger than"),
        ("crlf", note.replace("\n", "\r\n"), "line 1 contains a carriage return (U+000D)"),
        ("nul", note.replace("schedule", "sched\x00ule"), "line 5 contains a NUL character"),
        ("tab", note.replace("reason ", "reason\t"), "the control character U+0009"),
        ("non-utf8", note.encode().replace(b"schedule", b"sched\xffule"), "not valid UTF-8"),
        ("lone surrogate", note.replace("schedule", "sched\udcffule"), "not valid UTF-8"),
        ("missing final newline", note[:-1], "the last line does not end in a newline"),
        ("no signature block", body, "no blank line between the text and the signature lines"),
        ("trailing blank line", note + "\n", "no signature lines after the last blank line"),
        (
            "trailing junk line",
            note + "Unexpected line.\n",
            "signature line 2 does not start with an em dash",
        ),
        (
            "extra body line",
            body + "\nextra line\n\n" + sigs,
            "unexpected line 6 after the reason: 'extra line'",
        ),
        (
            "empty body line",
            body.replace("\nreason", "\n\nreason") + "\n\n" + sigs,
            "line 5 is empty",
        ),
        ("hyphen dash", body + "\n\n" + sigs.replace(EM, "--"), "does not start with an em dash"),
        ("en dash", body + "\n\n" + sigs.replace(EM, "\u2013"), "does not start with an em dash"),
        ("no signature", f"{body}\n\n{EM} {ORIGIN}\n", "is not '<em dash> <key name> <base64 signature>'"),
        ("name with plus", f"{body}\n\n{EM} a+b {SIG_LINE_TAIL}\n", "signature line 1: key name 'a+b'"),
        (
            "two spaces",
            f"{body}\n\n{EM} {ORIGIN}  {SIG_LINE_TAIL}\n",
            "signature is not canonical standard base64",
        ),
        ("bad sig base64", f"{body}\n\n{EM} {ORIGIN} abc$\n", "signature is not canonical standard base64"),
        ("short sig", f"{body}\n\n{EM} {ORIGIN} AAAAAA==\n", "shorter than a key hash and one byte"),
        ("101 signatures", note + sigs * 100, "101 signature lines, more than the 100 allowed"),
    ]


@pytest.mark.parametrize("case", range(22))
def test_malformed_notes_say_why(note: str, verifier: Verifier, case: int) -> None:
    cases = _malformed_notes(note)
    assert len(cases) == 22
    name, bad, message = cases[case]
    with pytest.raises(CheckpointError, match=r"^not a checkpoint: ") as info:
        parse_unverified(bad)
    assert message in str(info.value), name
    with pytest.raises(CheckpointError) as info:
        open_note(bad, [verifier])
    if name in ("extra body line", "empty body line"):
        # open_note reads no text before its signature verifies: an edited body fails there first.
        assert str(info.value).startswith("signature does not verify: "), name
    else:
        assert str(info.value).startswith("not a checkpoint: ") and message in str(info.value), name


def test_one_hundred_signature_lines_are_still_accepted(note: str, verifier: Verifier) -> None:
    sigs = note.split("\n\n")[1]
    assert open_note(note + sigs * 99, [verifier]) == _checkpoint()


# --- constructing checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reason": "because"}, "reason 'because' is not one of"),
        ({"size": -1}, "tree size -1 is not an integer"),
        ({"size": True}, "tree size True is not an integer"),
        ({"size": 1 << 63}, "is not an integer from 0 to"),
        ({"root": ROOT[:16]}, "root hash is 16 bytes"),
        ({"root": ROOT.hex()}, "root hash is str bytes"),
        ({"size": 0}, "an empty tree's root hash must be SHA-256 of nothing"),
        ({"timestamp": "2026-11-25 10:00:00.123Z"}, "is not RFC 3339 UTC with milliseconds"),
        ({"origin": ""}, "the key name is empty"),
        ({"origin": "phi gateway"}, "contains a space"),
        ({"origin": "phi\ngateway"}, "contains a space"),
    ],
)
def test_invalid_checkpoints_cannot_be_built(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CheckpointError, match=r"^invalid checkpoint: ") as info:
        _checkpoint(**changes)
    assert message in str(info.value)


def test_sign_note_refuses_text_it_could_not_parse_back(key: SigningKey) -> None:
    with pytest.raises(CheckpointError, match=r"^cannot sign: the note text must end with a newline"):
        sign_note("no newline", ORIGIN, key.private)
    with pytest.raises(CheckpointError, match=r"^cannot sign: the note text contains a carriage return"):
        sign_note("crlf\r\n", ORIGIN, key.private)
    with pytest.raises(CheckpointError, match=r"^cannot sign: key name"):
        sign_note("text\n", "two words", key.private)


# --- known answers: Go's golang.org/x/mod/sumdb/note vectors and a real sum.golang.org checkpoint ---


def _peter_private() -> Ed25519PrivateKey:
    seed = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert seed[0] == 0x01
    return Ed25519PrivateKey.from_private_bytes(seed[1:])


def test_signing_matches_go_note_sign_byte_for_byte() -> None:
    private = _peter_private()
    assert sign_note(GO_TEXT, "PeterNeumann", private) == GO_TEXT + "\n" + PETER_SIG
    assert Verifier.from_key("PeterNeumann", private.public_key()).encode() == PETER_VKEY


def test_go_doubly_signed_note_verifies() -> None:
    peter, enoch = Verifier.parse(PETER_VKEY), Verifier.parse(ENOCH_VKEY)
    note = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert verify_note_signatures(note, [peter]) == GO_TEXT
    assert verify_note_signatures(note, [enoch]) == GO_TEXT
    assert verify_note_signatures(note, [peter, enoch]) == GO_TEXT
    with pytest.raises(
        CheckpointError, match=r"^signed by an unknown key PeterNeumann\+c74f20a3, EnochRoot\+af0cfe78"
    ):
        verify_note_signatures(note, [])


def test_go_invalid_signature_vector_is_refused() -> None:
    corrupted = GO_TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(CheckpointError, match=r"^signature does not verify: key PeterNeumann\+c74f20a3$"):
        verify_note_signatures(corrupted, [Verifier.parse(PETER_VKEY)])


@pytest.mark.parametrize(
    "bad",
    [
        GO_TEXT,
        GO_TEXT + "\n",
        GO_TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + GO_TEXT + "\n" + PETER_SIG,
        ("\xff" + GO_TEXT + "\n" + PETER_SIG).encode("latin-1", "ignore") + b"\xff",
        GO_TEXT + "\n" + f"{EM} Bad Name {SIG_LINE_TAIL}",
        GO_TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        GO_TEXT + "\n" + PETER_SIG * 101,
    ],
)
def test_go_malformed_note_vectors_are_refused(bad: str | bytes) -> None:
    with pytest.raises(CheckpointError, match=r"^not a checkpoint: "):
        verify_note_signatures(bad, [Verifier.parse(PETER_VKEY)])


def test_real_sum_golang_org_checkpoint_verifies() -> None:
    assert verify_note_signatures(SUMDB_NOTE, [Verifier.parse(SUMDB_VKEY)]) == SUMDB_TEXT
    with pytest.raises(CheckpointError, match=r"^signature does not verify"):
        verify_note_signatures(SUMDB_NOTE.replace("49189689", "49189690"), [Verifier.parse(SUMDB_VKEY)])
    # Structurally a checkpoint, but without our timestamp and reason lines (and its origin has spaces).
    with pytest.raises(
        CheckpointError, match=r"^not a checkpoint: the text has 3 lines; missing timestamp, reason"
    ):
        parse_unverified(SUMDB_NOTE)
