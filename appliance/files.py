"""Reading a file an operator names (a bundle, a key, a checkpoint, a proof): a regular file only, at most
the cap of its kind, within a deadline; every refusal is an ``OperatorError`` naming the file and why.

Owns: ``Input`` (what a kind of file is called and how large it may be), ``read_bytes`` and ``read_text``
(the one way the command line and the keys it loads read a file), and ``require_regular`` (the same
check, for a path handed on to code that opens it itself).

Must never: open a path so that the open can block (a FIFO with no writer): the open is non-blocking (on
Windows, which has no ``O_NONBLOCK`` and no FIFO a path can name, a plain open cannot block) and
the kind of file is judged on the opened descriptor (``fstat``), never on the name, so a path swapped
between the check and the read cannot slip through; read a device, a FIFO or a directory; read more than
``cap + 1`` bytes of anything (``/dev/zero`` never ends, a file may grow while it is read); or raise
anything but ``OperatorError`` for a problem with the file.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import OperatorError

DEADLINE_S = 10.0
"""How long one file may take to read: a regular file on a local disk takes milliseconds."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Input:
    """A kind of file an operator gives: its name in messages, and the most bytes it may hold."""

    what: str
    cap: int

    def describe_cap(self) -> str:
        cap = self.cap
        for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if cap >= size and cap % size == 0:
                return f"{cap // size} {unit}"
        return f"{cap} bytes"


KEY_FILE = Input("key file", 64 << 10)
"""An Ed25519 ``.key`` or ``.pub`` file (a few hundred bytes; ``signing_keys`` reads at most 64 KiB)."""
SETTINGS_FILE = Input("settings or trust file", 1 << 20)
"""``gateway.toml`` or ``trust.json`` in a home: a few KiB."""


def read_bytes(path: Path, kind: Input, *, deadline_s: float = DEADLINE_S) -> bytes:
    """The bytes of ``path``, a regular file of at most ``kind.cap`` bytes, read within ``deadline_s``."""
    fd = _open_regular(path, kind)
    try:
        size = os.fstat(fd).st_size
        if size > kind.cap:
            raise _too_large(path, kind, size)
        if _nonblocking_flag():  # Windows has neither the flag nor (before 3.12) os.set_blocking
            os.set_blocking(fd, True)  # no effect on a regular file; read() below must not see EAGAIN
        deadline = time.monotonic() + deadline_s
        chunks: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise OperatorError(f"cannot read {path}: the {kind.what} took over {deadline_s:g} s to read")
            chunk = os.read(fd, min(_CHUNK, kind.cap + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > kind.cap:  # it grew while it was read
                raise _too_large(path, kind, total)
    except OSError as exc:
        raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_text(path: Path, kind: Input, *, deadline_s: float = DEADLINE_S) -> str:
    """``read_bytes`` decoded as UTF-8; text that is not UTF-8 is refused with a message."""
    data = read_bytes(path, kind, deadline_s=deadline_s)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OperatorError(f"{path}: the {kind.what} is not UTF-8 text") from None


def require_regular(path: Path, kind: Input) -> None:
    """Refuse ``path`` unless it is a regular file within ``kind.cap`` (for code that opens it itself)."""
    fd = _open_regular(path, kind)
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > kind.cap:
        raise _too_large(path, kind, size)


def _open_regular(path: Path, kind: Input) -> int:
    """An open descriptor of ``path``, which fstat says is a regular file; closed on every refusal."""
    flags = os.O_RDONLY | _nonblocking_flag() | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise OperatorError(f"{path}: no such file (expected {_a(kind.what)})") from None
    except OSError as exc:
        raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OperatorError(f"{path} is not a regular file ({_kind_of(mode)}); expected {_a(kind.what)}")
    return fd


def _nonblocking_flag() -> int:
    """``os.O_NONBLOCK``, or 0 on Windows (no such flag; no FIFO there can make an open wait)."""
    flag: int = getattr(os, "O_NONBLOCK", 0)
    return flag


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _a(what: str) -> str:
    return f"an {what}" if what[:1] in "aeiou" else f"a {what}"


def _too_large(path: Path, kind: Input, size: int) -> OperatorError:
    return OperatorError(
        f"{path} is too large for {_a(kind.what)}: {size} bytes, over the cap of {kind.describe_cap()}"
    )
