"""Raw tar headers, read block by block, for the OVA: which header format each member has, in what order.

``tarfile`` hides exactly what the OVA rules need (the magic of each header, GNU long-name and PAX extended
headers as members of their own), so this reads the 512-byte headers itself (POSIX.1-1988 ustar layout:
name 0-100, size 124-136, chksum 148-156, typeflag 156, magic 257-263, version 263-265, prefix 345-500).
Owns: ``read_members`` and ``member_chunks``. Never extracts anything to disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
_ZERO = bytes(BLOCK)


class TarFormatError(Exception):
    """The archive is not a readable tar (truncated, bad checksum, bad number field)."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    offset: int  # where the member's data starts in the archive
    typeflag: str
    header: str  # "ustar", "gnu", "pax" or "v7": the format this member's header is written in


def _number(field: bytes, what: str) -> tuple[int, bool]:
    """An octal field, or GNU's base-256 form (high bit set): (value, was_gnu)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big"), True
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return (int(text, 8) if text else 0), False
    except ValueError as exc:
        raise TarFormatError(f"bad {what} field {field!r}") from exc


def _header(block: bytes, offset: int) -> Member:
    stored, _ = _number(block[148:156], "checksum")
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise TarFormatError(f"header at byte {offset - BLOCK}: checksum {stored} != {computed}")
    size, gnu_size = _number(block[124:136], "size")
    typeflag = chr(block[156]) if block[156] else "0"
    magic, version = block[257:263], block[263:265]
    name = block[0:100].split(b"\0", 1)[0]
    if magic == b"ustar\0" and version == b"00":
        header = "ustar"
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    elif magic == b"ustar " and version == b" \0":
        header = "gnu"
    else:
        header = "v7"
    if typeflag in "xg":
        header = "pax"
    elif typeflag in "LKMNSV" or gnu_size:
        header = "gnu"
    return Member(name.decode("utf-8", "replace"), size, offset, typeflag, header)


def read_members(path: Path) -> list[Member]:
    """Every header in archive order, extended headers (PAX ``x``/``g``, GNU ``L``/``K``) included."""
    members: list[Member] = []
    with path.open("rb") as f:
        while True:
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                raise TarFormatError(f"truncated at byte {f.tell() - len(block)} (no end-of-archive blocks)")
            if block == _ZERO:
                return members
            member = _header(block, f.tell())
            members.append(member)
            f.seek(member.offset + (member.size + BLOCK - 1) // BLOCK * BLOCK)


def member_chunks(path: Path, member: Member, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The member's data, streamed."""
    with path.open("rb") as f:
        f.seek(member.offset)
        left = member.size
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise TarFormatError(f"{member.name}: archive ends inside the member")
            left -= len(data)
            yield data
