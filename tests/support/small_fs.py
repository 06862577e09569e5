"""A file system that fills up on demand, for the disk-full tests and the faults drill (root only).

Owns: mounting a small tmpfs (``small_tmpfs``; ``MountFailed`` when it cannot be mounted), unmounting it
afterwards even when something still holds it open (lazily), and filling a file system to ENOSPC
(``fill``). Never: leaves a mount behind.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MountFailed(RuntimeError):
    """The tmpfs could not be mounted (not root, or no tmpfs support)."""


@contextmanager
def small_tmpfs(mount: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB at ``mount`` (created here), unmounted on exit."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        raise MountFailed(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=False)  # never leave a mount behind


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full (unbuffered: a partial write takes the
    last bytes); returns the file, whose removal frees the space. Any error but ENOSPC is raised."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler
