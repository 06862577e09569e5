"""A file that says "tokens or provider keys changed", so a running gateway may answer from memory.

Owns: bumping the mark after a change is committed (by whichever process made it: the CLI beside the
server) and reading it, one ``stat`` per request. A cache may answer from memory while the mark is
unchanged since it filled; no cached entry is older than ``MAX_AGE_S`` either, which bounds how long a
change goes unseen if a process died between its commit and its bump.
Never: holds or names a secret; replaces the database as the record (the mark carries no content).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

MAX_AGE_S = 5.0

Mark = tuple[int, int] | None


class ChangeMark:
    def __init__(self, vault_path: Path) -> None:
        self.path = vault_path.with_name(vault_path.name + ".changes")

    def bump(self) -> None:
        """A new file each time (new inode and mtime), replaced atomically: readers never see half of one."""
        temp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.monotonic_ns()}")
        try:
            temp.write_text(f"{time.time_ns()}\n", encoding="ascii")
            os.replace(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def read(self) -> Mark:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)
