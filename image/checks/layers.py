"""What an image's filesystem holds once its layers are stacked: no compilers, no secrets, no caches.

Layers are read lowest first. A layer's whiteouts (``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` empties the
directory) apply to the layers below it only (OCI image spec, "Whiteouts"), so a file a build step left
and a later step deleted does not count. A hard link (tar LNKTYPE) is the same file as its target: it takes
the target's findings when it is made, and a whiteout that deletes one name of a file moves that name's
findings to the names of it that survive (a key hard-linked under a harmless name outlives the deletion of
its first name). Rules:
  oci.no-compilers          gcc, g++, cc, c++, cpp, clang, ld, as, make, cmake, ninja (plain or
                            x86_64-linux-gnu- prefixed, -N suffixed) in a bin directory; cc1, collect2, lto1
                            under usr/lib/gcc or usr/libexec/gcc.
  oci.no-compiler-packages  var/lib/dpkg/status (the top-most copy) has no build-essential, gcc, g++, cpp,
                            clang, make, cmake or binutils package installed.
  oci.no-secrets            no PEM private key block in any file; no master.key, appliance.key, vault.db,
                            gateway.toml or tls/key.pem (a gateway home baked in); no API token
                            ``<caller-id>:<48 hex>`` in a text file under etc/ opt/ var/lib/ root/ home/.
  oci.no-caches             no pip cache (.cache/pip), apt archives (*.deb), apt pkgcache or apt lists.
Owns ``LayerScan``. Reads layer streams; never writes a file.
"""

from __future__ import annotations

import re
import tarfile
from typing import IO

from checks.report import Report

_BIN_DIRS = ("usr/bin/", "bin/", "usr/local/bin/", "usr/sbin/", "sbin/")
_COMPILER = re.compile(
    r"(?:x86_64-linux-gnu-)?(?:gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|ld|ld\.bfd|ld\.gold|ld\.lld|as"
    r"|make|gmake|cmake|ninja|tcc)(?:-\d+(?:\.\d+)*)?"
)
_GCC_INTERNALS = {"cc1", "cc1plus", "cc1obj", "collect2", "lto1", "lto-wrapper"}
_COMPILER_PACKAGE = re.compile(
    r"build-essential|gcc(?:-\d+)?|g\+\+(?:-\d+)?|cpp(?:-\d+)?|clang(?:-\d+)?|make|cmake|binutils(?:-.+)?"
)
_SECRET_NAMES = {"master.key", "appliance.key", "vault.db", "vault.db-wal", "vault.db-shm", "gateway.toml"}
_TOKEN_DIRS = ("etc/", "opt/", "var/lib/", "root/", "home/")
_PEM_HINT = b"PRIVATE KEY-----"
# A real block: the BEGIN line, optional RFC 1421 headers (encrypted keys), then base64 - not a source
# file that merely mentions the marker (cryptography's ssh.py does).
_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----\r?\n(?:[A-Za-z-]+:[^\n]*\n)*\r?\n?[A-Za-z0-9+/=]{40}"
)
_TOKEN = re.compile(rb"(?<![A-Za-z0-9._-])[A-Za-z0-9][A-Za-z0-9._-]{0,63}:[0-9a-f]{48}(?![0-9a-f])")
_DPKG_STATUS = "var/lib/dpkg/status"
_CHUNK, _OVERLAP = 1 << 20, 8192


def _normal(name: str) -> str:
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    return name.rstrip("/")


def _name_findings(path: str) -> list[tuple[str, str]]:
    base, found = path.rsplit("/", 1)[-1], []
    parent = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    if parent in _BIN_DIRS and _COMPILER.fullmatch(base):
        found.append(("oci.no-compilers", "compiler or build tool"))
    if path.startswith(("usr/lib/gcc/", "usr/libexec/gcc/")) and base in _GCC_INTERNALS:
        found.append(("oci.no-compilers", "gcc internals"))
    if base in _SECRET_NAMES or path.endswith("tls/key.pem"):
        found.append(("oci.no-secrets", "a gateway home file"))
    if "/.cache/pip/" in f"/{path}" or (path.startswith("var/cache/apt/archives/") and base.endswith(".deb")):
        found.append(("oci.no-caches", "package download cache"))
    if path in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin") or (
        path.startswith("var/lib/apt/lists/") and base != "lock"
    ):
        found.append(("oci.no-caches", "apt index cache"))
    return found


def _deleted(path: str, whiteouts: list[tuple[str, bool]]) -> bool:
    return any(
        path.startswith(f"{target}/") or (path == target and not opaque) for target, opaque in whiteouts
    )


def _carried(found: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    """Findings of a file as another name of it holds them: ``why`` says where they came from, once."""
    return [(rule, why if "hard link of " in why else f"{why}, hard link of {where}") for rule, why in found]


def _merge(into: list[tuple[str, str]], found: list[tuple[str, str]]) -> None:
    have = {(rule, why.split(", hard link of ")[0]) for rule, why in into}
    for rule, why in found:
        if (rule, why.split(", hard link of ")[0]) not in have:
            into.append((rule, why))
            have.add((rule, why.split(", hard link of ")[0]))


class LayerScan:
    """Findings per path across the layers read so far, whiteouts applied."""

    def __init__(self) -> None:
        self.findings: dict[str, list[tuple[str, str]]] = {}
        # path -> every name of that file (one shared set per hard-linked file; only linked files appear)
        self.links: dict[str, set[str]] = {}
        self.dpkg_status: bytes | None = None
        self.layers = self.files = self.bytes = self.whiteouts = self.hidden = 0

    def add_layer(self, stream: IO[bytes]) -> None:
        seen: dict[str, list[tuple[str, str]]] = {}
        made: list[tuple[str, str | None]] = []  # (path, hard link target or None), in archive order
        whiteouts: list[tuple[str, bool]] = []  # (path, opaque)
        status: bytes | None = None
        with tarfile.open(fileobj=stream, mode="r|") as layer:
            for member in layer:
                path = _normal(member.name)
                parent, _, base = path.rpartition("/")
                if base == ".wh..wh..opq":
                    whiteouts.append((parent, True))
                    continue
                if base.startswith(".wh."):
                    whiteouts.append((f"{parent}/{base[4:]}" if parent else base[4:], False))
                    continue
                found = [] if member.isdir() else _name_findings(path)
                target = _normal(member.linkname) if member.islnk() else None
                if target is not None:
                    # The target is earlier in this layer or in a layer below (whose findings are current).
                    _merge(found, _carried(seen.get(target, self.findings.get(target, [])), target))
                if member.isreg():
                    self.files += 1
                    self.bytes += member.size
                    data = self._scan_content(layer.extractfile(member), path, found)
                    if path == _DPKG_STATUS:
                        status = data
                seen[path] = found
                made.append((path, target))
        self.layers += 1
        self.whiteouts += len(whiteouts)
        doomed = {p for p in (*self.findings, *self.links) if _deleted(p, whiteouts)}
        for p in sorted(doomed):
            found = self.findings.pop(p, [])
            survivors = sorted(self.links.get(p, set()) - doomed)
            for other in survivors:  # the file lives on under its other names: so do its findings
                _merge(self.findings.setdefault(other, []), _carried(found, p))
            self.hidden += 0 if survivors else len(found)
            self._unlink(p)
        for target, opaque in whiteouts:
            if _DPKG_STATUS.startswith(f"{target}/") or (target == _DPKG_STATUS and not opaque):
                self.dpkg_status = None
        for path, target in made:
            self._unlink(path)  # replaced: no longer a name of the file it was
            if target is not None and (target in seen or not _deleted(target, whiteouts)):
                names = self.links.setdefault(target, {target})
                names.add(path)
                self.links[path] = names
        for path, found in seen.items():
            self.findings.pop(path, None)
            if found:
                self.findings[path] = found
        if status is not None:
            self.dpkg_status = status

    def _unlink(self, path: str) -> None:
        names = self.links.pop(path, None)
        if names is not None:
            names.discard(path)
            if len(names) == 1:
                self.links.pop(names.pop(), None)

    @staticmethod
    def _scan_content(f: IO[bytes] | None, path: str, found: list[tuple[str, str]]) -> bytes | None:
        """Scan the file in overlapping chunks; returns the whole content only for dpkg's status."""
        if f is None:
            return None
        keep = path == _DPKG_STATUS
        kept, tail, text = [], b"", None
        token_dir = path.startswith(_TOKEN_DIRS)
        pem = token = False
        while chunk := f.read(_CHUNK):
            if keep:
                kept.append(chunk)
            if text is None:
                text = b"\0" not in chunk[:8192]
            window = tail + chunk
            pem = pem or (_PEM_HINT in window and _PEM_BLOCK.search(window) is not None)
            token = token or (token_dir and bool(text) and _TOKEN.search(window) is not None)
            tail = window[-_OVERLAP:]
        if pem:
            found.append(("oci.no-secrets", "PEM private key block"))
        if token:
            found.append(("oci.no-secrets", "API token <caller-id>:<48 hex>"))
        return b"".join(kept) if keep else None

    def compiler_packages(self) -> list[str]:
        found = []
        for paragraph in (self.dpkg_status or b"").decode("utf-8", "replace").split("\n\n"):
            fields = dict(
                line.split(": ", 1)
                for line in paragraph.splitlines()
                if ": " in line and not line[:1].isspace()
            )
            state = fields.get("Status", "").split()
            if _COMPILER_PACKAGE.fullmatch(fields.get("Package", "")) and state[-1:] not in (
                ["not-installed"],
                ["config-files"],
            ):
                found.append(f"{fields['Package']} {fields.get('Version', '')}".strip())
        return found

    def report_to(self, report: Report) -> None:
        scanned = (
            f"{self.files} files ({self.bytes} bytes) in {self.layers} layer(s), {self.whiteouts} whiteout(s)"
            f" applied, {self.hidden} finding(s) deleted by them"
        )
        for rule in ("oci.no-compilers", "oci.no-secrets", "oci.no-caches"):
            hits = sorted(
                f"{p} ({why})" for p, found in self.findings.items() for r, why in found if r == rule
            )
            report.check(
                not hits, rule, f"{len(hits)} found in {scanned}" + (f": {hits[:20]}" if hits else "")
            )
        packages = self.compiler_packages()
        state = "no dpkg status" if self.dpkg_status is None else f"dpkg status {len(self.dpkg_status)} bytes"
        report.check(
            not packages, "oci.no-compiler-packages", f"{state}, compiler packages installed: {packages}"
        )
