"""The pinned local model files: which GGUF file each ``local/<name>`` is, and whether it is the one pinned.

Owns: mapping the policy's ``models`` entries to files under ``<home>/models/``, checking that a file is a
regular file inside that folder, hashing it (SHA-256, streamed) against the pin, the in-process cache of
hashes, and the rows shown by ``phi-gateway models list|verify``.

Never: hands out a path for loading that has not just been verified; follows a file name or a symlink out
of the models folder; opens anything but a regular file (a FIFO would block the caller for ever); trusts a
cached hash once the file's size, times or inode changed. Hashing blocks for seconds on a large file:
``verify`` must be called on a worker thread, never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gguf

from appliance import errors

READ_SIZE = 1 << 20  # 1 MiB per read: few syscalls, little memory


def kv_bytes_per_token(path: Path) -> int:
    """Bytes of (f16) KV cache one token of context takes in this GGUF, from its metadata; 0 when the
    metadata does not say (the memory budget then counts the file alone). Reads the header only.
    Blocking: not on the loop."""
    try:
        reader = gguf.GGUFReader(path)
        arch = str(reader.fields["general.architecture"].contents())

        def number(key: str, default: int | None = None) -> Any:
            field = reader.fields.get(f"{arch}.{key}")
            return default if field is None else field.contents()

        layers = int(number("block_count"))
        embd, heads = int(number("embedding_length")), number("attention.head_count")
        heads_kv = number("attention.head_count_kv", heads)
        head_max = max(heads) if isinstance(heads, list) else int(heads)
        per_layer_kv = heads_kv if isinstance(heads_kv, list) else [int(heads_kv)] * layers
        k_dim = int(number("attention.key_length", embd // max(head_max, 1)))
        v_dim = int(number("attention.value_length", k_dim))
    except Exception:  # an unusual or damaged header: llama.cpp's load is the judge of the file
        return 0
    return sum(int(n) * (k_dim + v_dim) * 2 for n in per_layer_kv[:layers])


def default_slots(n_ctx: int) -> int:
    """Sequence slots when the policy sets none: 16k tokens of cache in all, 1 to 8 slots."""
    return max(1, min(8, 16384 // max(n_ctx, 1)))


class LocalModelSpecLike(Protocol):
    """What the registry needs from a policy ``models`` entry (``appliance.policy.schema.LocalModelSpec``)."""

    @property
    def file(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def slots(self) -> int | None: ...


@dataclass(frozen=True)
class LocalModel:
    name: str
    """The model part of the id: ``demo`` for ``local/demo``."""
    path: Path
    """After ``verify``: the resolved path of the file that was hashed; load this one."""
    sha256: str
    """The pinned SHA-256 (64 lowercase hex)."""
    n_ctx: int
    model: str = ""
    """The full id as the policy spells it (``local/demo``); defaults to ``local/<name>``."""
    slots: int | None = None
    """Requests decoded together (None: the engine's default for ``n_ctx``)."""
    identity: tuple[int, ...] = ()
    """After ``verify``: ``file_identity`` of the file as it was hashed (empty before). Whoever loads the
    file re-stats it after loading and refuses it if the identity differs: it changed after the check."""

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", f"local/{self.name}")


# Process-wide: a registry is rebuilt on each policy import, and the new one must not re-hash unchanged
# files. One entry per resolved path (the newest state seen), so the cache cannot grow past the files.
_StatKey = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
_hash_cache: dict[str, tuple[_StatKey, str]] = {}
_hash_cache_lock = threading.Lock()


def file_identity(st: os.stat_result) -> _StatKey:
    """``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``: equal only while the file is unchanged."""
    # ctime as well as mtime: mtime can be set back by anyone who can write the file, ctime cannot.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(fd: int) -> str:
    """SHA-256 of an open file descriptor, read from its current position in 1 MiB pieces."""
    digest = hashlib.sha256()
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _is_bare_file_name(file: str) -> bool:
    return (
        bool(file)
        and file not in (".", "..")
        and not any(c in file for c in "/\\\0:")
        and Path(file).name == file
    )


class ModelRegistry:
    """The local models of the policy in force, keyed ``local/<name>``; immutable once built."""

    def __init__(self, models_dir: Path, specs: Mapping[str, LocalModelSpecLike]) -> None:
        self.models_dir = models_dir
        self._specs: dict[str, LocalModelSpecLike] = dict(specs)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def _key(self, model: str) -> str:
        if model in self._specs:
            return model
        # A bare name ("demo") stands for the one model whose part after the route is that name.
        matches = [key for key in self._specs if key.partition("/")[2] == model]
        if len(matches) == 1:
            return matches[0]
        raise errors.NotFound(
            f"model {model!r} is not a local model of the policy in force", code="model_not_found"
        )

    def get(self, model: str) -> LocalModel:
        """The entry for ``local/demo`` (or ``demo``), unverified: its path is the nominal one."""
        key = self._key(model)
        spec = self._specs[key]
        return LocalModel(
            name=key.partition("/")[2],
            path=self.models_dir / spec.file,
            sha256=spec.sha256,
            n_ctx=spec.n_ctx,
            slots=spec.slots,
            model=key,
        )

    def _resolve(self, entry: LocalModel, file: str) -> tuple[Path, os.stat_result]:
        """The real path of a model file and its stat; refuses anything outside the models folder."""
        if not _is_bare_file_name(file):
            raise errors.Unavailable(
                f"model {entry.model}: file {file!r} is not a bare file name under {self.models_dir}",
                code="model_file_unsafe",
            )
        missing = errors.Unavailable(
            f"model {entry.model}: file {file} is not in the models folder {self.models_dir} "
            f"(copy the file pinned by sha256 {entry.sha256[:16]}… there)",
            code="model_file_missing",
        )
        try:
            root = self.models_dir.resolve(strict=True)
            real = entry.path.resolve(strict=True)
            st = os.stat(real)
        except FileNotFoundError as exc:
            raise missing from exc
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise errors.Unavailable(
                f"model {entry.model}: cannot read {entry.path}: {exc.__class__.__name__}",
                code="model_file_unsafe",
            ) from exc
        if real == root or not real.is_relative_to(root):
            raise errors.Unavailable(
                f"model {entry.model}: {entry.path} leads outside the models folder {self.models_dir} "
                f"(to {real}); model files must lie inside that folder",
                code="model_file_unsafe",
            )
        if not stat.S_ISREG(st.st_mode):
            raise errors.Unavailable(
                f"model {entry.model}: {entry.path} is not a regular file", code="model_file_unsafe"
            )
        return real, st

    def _digest(self, entry: LocalModel, real: Path, before: os.stat_result) -> str:
        key = file_identity(before)
        with _hash_cache_lock:
            cached = _hash_cache.get(str(real))
        if cached is not None and cached[0] == key:
            return cached[1]
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_NONBLOCK", 0)  # should a FIFO be swapped in after the check, never block
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            raise errors.Unavailable(
                f"model {entry.model}: cannot open {real}: {exc.strerror or exc.__class__.__name__}",
                code="model_file_unsafe",
            ) from exc
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or file_identity(opened) != key:
                raise self._changed(entry)
            digest = hash_file(fd)
            if file_identity(os.fstat(fd)) != key:
                raise self._changed(entry)
        finally:
            os.close(fd)
        with _hash_cache_lock:
            _hash_cache[str(real)] = (key, digest)
        return digest

    @staticmethod
    def _changed(entry: LocalModel) -> errors.Unavailable:
        return errors.Unavailable(
            f"model {entry.model}: {entry.path.name} changed while it was being checked; try again",
            code="model_file_changed",
        )

    def verify(self, model: str) -> LocalModel:
        """Check the file against its pin (hashing it unless unchanged since a check in this process).

        Returns the entry with ``path`` resolved to the file that was hashed. Blocking: not on the loop.
        """
        entry = self.get(model)
        real, before = self._resolve(entry, self._specs[entry.model].file)
        digest = self._digest(entry, real, before)
        if digest != entry.sha256.lower():
            raise errors.Unavailable(
                f"model {entry.model}: {entry.path.name} has sha256 {digest[:16]}…, the policy pins "
                f"{entry.sha256[:16]}…: refusing to load it "
                "(copy the right file, or import a policy that pins this one)",
                code="model_hash_mismatch",
            )
        return LocalModel(
            name=entry.name,
            path=real,
            sha256=entry.sha256,
            n_ctx=entry.n_ctx,
            slots=entry.slots,
            model=entry.model,
            identity=file_identity(before),
        )

    def verify_all(self) -> list[tuple[str, str]]:
        """``(model, "ok" | the reason it is refused)`` for each model, for ``phi-gateway models verify``."""
        results = []
        for name in self.names():
            try:
                self.verify(name)
            except errors.GatewayError as exc:
                results.append((name, exc.message))
            else:
                results.append((name, "ok"))
        return results

    def listing(self) -> list[dict[str, object]]:
        """One row per model for ``phi-gateway models list``; never hashes."""
        rows: list[dict[str, object]] = []
        for name in self.names():
            entry = self.get(name)
            spec = self._specs[name]
            try:
                _, st = self._resolve(entry, spec.file)
            except errors.Unavailable:
                size: int | None = None
            else:
                size = st.st_size
            rows.append(
                {
                    "name": name,
                    "file": spec.file,
                    "size_bytes": size,
                    "sha256": spec.sha256[:16] + "…",
                    "n_ctx": spec.n_ctx,
                    "slots": spec.slots or default_slots(spec.n_ctx),
                    "present": size is not None,
                }
            )
        return rows
