"""The appliance's trust anchors for policy bundles: ``<home>/trust.json``.

Owns: which public keys may sign policy bundles, the signature threshold, the scheme pinned to each key,
and the atomic rewrite of the file. Trust lives only here, never inside a bundle (TUF §5.3, §6.1): a
bundle's ``trust`` set is installed (``replace``) only after ``importer`` found it signed by a threshold
of the keys in this file and by its own threshold of the new keys.

Must never: verify a signature with any scheme but the one pinned to its key, trust a keyid that is not
the SHA-256 of its key, load an entry whose scheme it does not know, or leave a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.errors import OperatorError
from appliance.policy.schema import TrustSpec
from appliance.signing_keys import (
    check_stated_keyid,
    keyid_of,
    load_public_key,
    public_from_entry,
    public_json,
    short_keyid,
)
from appliance.timestamps import now_seconds

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    scheme: str
    public: Ed25519PublicKey
    added_at: str

    def verify(self, sig: bytes, message: bytes) -> bool:
        """Check ``sig`` with this key's pinned scheme only; the bundle cannot choose the algorithm."""
        if self.scheme != "ed25519" or len(sig) != 64:
            return False
        try:
            self.public.verify(sig, message)
        except InvalidSignature:
            return False
        return True


class TrustStore:
    """Trusted policy keys and threshold. Mutations stay in memory until ``save()``."""

    def __init__(self, path: Path, keys: Mapping[str, TrustedKey] | None = None, threshold: int = 1) -> None:
        self.path = path
        self._keys: dict[str, TrustedKey] = dict(keys or {})
        self._threshold = threshold

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        """Read ``trust.json``; a missing file means no trusted keys (every bundle is then refused)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # deep nesting exhausts the decoder's stack
            raise OperatorError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise OperatorError(f"{path}: expected a trust file with version {FORMAT_VERSION}")
        threshold = doc.get("threshold")
        entries = doc.get("keys")
        if type(threshold) is not int or threshold < 1:
            raise OperatorError(f"{path}: threshold must be an integer >= 1")
        if not isinstance(entries, dict):
            raise OperatorError(f"{path}: keys must be an object keyed by keyid")
        keys: dict[str, TrustedKey] = {}
        for keyid, entry in entries.items():
            where = f"{path}: key {short_keyid(keyid)}"
            if not isinstance(entry, dict):
                raise OperatorError(f"{where} must be an object")
            public = public_from_entry(entry, where)
            check_stated_keyid(entry, public, where)  # an entry pasted from a .pub keeps its keyid
            if keyid_of(public) != keyid:
                raise OperatorError(f"{where}: the keyid is not the SHA-256 of the key")
            keys[keyid] = TrustedKey(keyid, str(entry["scheme"]), public, str(entry.get("added_at", "")))
        return cls(path, keys, threshold)

    @classmethod
    def from_spec(cls, path: Path, spec: TrustSpec) -> TrustStore:
        """An in-memory store holding a bundle's trust set (checked by the schema: keyid = SHA-256)."""
        return cls(path, _keys_of(spec, {}, now_seconds()), spec.threshold)

    def replace(self, spec: TrustSpec) -> None:
        """Install a verified rotation: exactly ``spec``'s keys and threshold, saved atomically.

        Keys kept from the old set keep their ``added_at``. On a write error nothing changes.
        """
        previous = (self._keys, self._threshold)
        self._keys, self._threshold = _keys_of(spec, self._keys, now_seconds()), spec.threshold
        try:
            self.save()
        except BaseException:
            self._keys, self._threshold = previous
            raise

    def rotation_detail(self, spec: TrustSpec) -> str:
        """What installing ``spec`` over this set changes, as the admin record of the rotation says it:
        ``trust_rotation threshold=OLD->NEW keys=<every new key id> added=<ids> removed=<ids>`` (ids as
        16 hex digits, sorted; ``none`` where there are none)."""

        def ids(keyids: set[str] | list[str]) -> str:
            return ",".join(keyid[:16] for keyid in sorted(keyids)) or "none"

        new, old = set(spec.keys), set(self._keys)
        return (
            f"trust_rotation threshold={self._threshold}->{spec.threshold} keys={ids(list(new))} "
            f"added={ids(new - old)} removed={ids(old - new)}"
        )

    def matches(self, spec: TrustSpec) -> bool:
        """Whether ``spec`` names exactly the keys and threshold in force (a rotation changing nothing)."""
        return self._threshold == spec.threshold and set(self._keys) == set(spec.keys)

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def keys(self) -> Mapping[str, Ed25519PublicKey]:
        return MappingProxyType({k: v.public for k, v in self._keys.items()})

    def key(self, keyid: str) -> TrustedKey | None:
        return self._keys.get(keyid)

    def entries(self) -> list[TrustedKey]:
        return sorted(self._keys.values(), key=lambda k: (k.added_at, k.keyid))

    def add(self, pubfile: Path) -> str:
        """Trust the key in ``pubfile`` (``.pub`` JSON or PEM); adding a trusted key again changes nothing."""
        keyid, public = load_public_key(pubfile)
        if keyid not in self._keys:
            self._keys[keyid] = TrustedKey(keyid, "ed25519", public, now_seconds())
        return keyid

    def resolve(self, prefix: str) -> str:
        """The trusted key id that ``prefix`` (at least 8 hex digits, as printed elsewhere) names."""
        matches = (
            [keyid for keyid in self._keys if keyid.startswith(prefix.lower())] if len(prefix) >= 8 else []
        )
        if len(matches) != 1:
            reason = (
                "matches several trusted keys" if matches else "names no trusted key (give at least 8 digits)"
            )
            raise OperatorError(f"key id {prefix!r} {reason}")
        return matches[0]

    def remove(self, keyid: str) -> None:
        if keyid not in self._keys:
            raise OperatorError(f"key {short_keyid(keyid)} is not trusted")
        left = len(self._keys) - 1
        if 0 < left < self._threshold:
            raise OperatorError(
                f"removing key {short_keyid(keyid)} would leave {left} key(s) for threshold "
                f"{self._threshold}; lower the threshold first"
            )
        del self._keys[keyid]
        if not self._keys:
            self._threshold = 1

    def set_threshold(self, n: int) -> None:
        if not 1 <= n <= len(self._keys):
            raise OperatorError(
                f"threshold must be between 1 and the number of trusted keys ({len(self._keys)})"
            )
        self._threshold = n

    def to_json(self) -> dict[str, object]:
        keys: dict[str, object] = {}
        for keyid, key in sorted(self._keys.items()):
            entry: dict[str, object] = dict(public_json(key.public))
            del entry["keyid"]
            entry["scheme"] = key.scheme
            entry["added_at"] = key.added_at
            keys[keyid] = entry
        return {"version": FORMAT_VERSION, "threshold": self._threshold, "keys": keys}

    def save(self) -> None:
        """Atomically replace the file: temp file in the same folder, fsync, rename, fsync the folder."""
        data = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".trust-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if os.name == "posix":  # make the rename itself durable
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise OperatorError(f"cannot write {self.path}: {exc.strerror or exc}") from exc


def _keys_of(spec: TrustSpec, old: Mapping[str, TrustedKey], now: str) -> dict[str, TrustedKey]:
    keys: dict[str, TrustedKey] = {}
    for keyid, entry in spec.keys.items():
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry.public))
        if keyid_of(public) != keyid:  # the schema checked this; a trust anchor is worth checking twice
            raise OperatorError(
                f"trust set key {short_keyid(keyid)}: the keyid is not the SHA-256 of the key"
            )
        kept = old.get(keyid)
        keys[keyid] = TrustedKey(keyid, entry.scheme, public, kept.added_at if kept else now)
    return keys
