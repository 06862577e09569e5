"""The OVA package: tar format, member order, the manifest and its hashes, nothing unnamed.

Rules and their sources (DSP0243 1.1.0, "Open Virtualization Format Specification"):
  ova.ustar     5.3: the TAR format "shall comply with the USTAR" format (POSIX 1003.1); GNU long-name
                and PAX extended headers are other formats, so every header must carry ``ustar\\0`` ``00``.
  ova.names     5.3/7.1: files are referenced by relative hrefs next to the descriptor; an OVA made for
                VMware holds plain names, no directories.
  ova.order     5.3: the descriptor first, then the manifest (VMware reads the .ovf, then the .mf, before
                streaming the disks), then the files in References order; a certificate, if any, last.
  ova.manifest  5.1: one ``SHA256(name)= hex`` line per file of the package (ESXi refuses the
                ``SHA1 (name) = hex`` spacing); SHA1 is accepted and noted as weaker.
  ova.hash      5.1: each digest matches the member's bytes.
  ova.extra     7.1: every member other than the .ovf and .mf is a References/File.
The one member the manifest and References leave out is the package's certificate (5.2, 5.3): at most one,
named after the descriptor (``<ovf basename>.cert``), and the last member. Any other ``.cert`` is a file like
any other: unlisted or unreferenced, it fails ova.manifest and ova.extra; ``<ovf basename>.cert`` anywhere
but last fails ova.order.
Owns ``check_ova``; the descriptor's own rules are in ``ovf``, the disk's in ``vmdk``.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from checks import ovf, vmdk
from checks.report import Report
from checks.ustar import Member, TarFormatError, member_chunks, read_members

_MF_LINE = re.compile(r"(SHA1|SHA256|SHA512)\(([^()]+)\)= ([0-9a-fA-F]+)")
_HASHES = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


def check_ova(path: Path, report: Report) -> None:
    report.section(f"OVA {path} ({path.stat().st_size} bytes)")
    try:
        members = read_members(path)
    except TarFormatError as exc:
        report.fail("ova.ustar", f"not a readable tar: {exc}")
        return
    _check_format(members, report)
    files = [m for m in members if m.typeflag in "0" and m.header != "pax"]
    _check_names(members, report)
    by_name = {m.name: m for m in files}
    if not _check_order(files, report):
        return
    cert = _package_cert(files, report)
    descriptor = ovf.parse(b"".join(member_chunks(path, files[0])), report)
    if descriptor is None:
        return
    _check_manifest(path, files, by_name, cert, report)
    referenced = ovf.check_references(descriptor, {n: m.size for n, m in by_name.items()}, report)
    _check_order_of_references(files, referenced, report)
    hrefs = set(referenced.values())
    extra = [m.name for m in files[2:] if m.name not in hrefs and m is not cert]
    report.check(
        not extra,
        "ova.extra",
        f"members not named by References: {extra}"
        if extra
        else f"all {len(files) - 2} other member(s) named by References/File",
    )
    disks = ovf.check_disks(descriptor, report)
    ovf.check_hardware(descriptor, disks, report)
    with tempfile.TemporaryDirectory(prefix="image-check-") as tmp:
        for disk in disks.values():
            member = by_name.get(referenced.get(disk.file_id or "", ""))
            if member is None:
                continue
            extracted = Path(tmp) / Path(member.name).name
            with extracted.open("wb") as out:
                for chunk in member_chunks(path, member):
                    out.write(chunk)
            vmdk.check_disk(extracted, disk, report)
            extracted.unlink()


def _check_format(members: list[Member], report: Report) -> None:
    other = [f"{m.name or '(extended header)'}: {m.header}" for m in members if m.header != "ustar"]
    report.check(
        not other,
        "ova.ustar",
        f"headers not POSIX ustar: {other}" if other else f"{len(members)} members, every header ustar 00",
    )


def _check_names(members: list[Member], report: Report) -> None:
    bad = [m.name for m in members if m.typeflag not in "0" or "/" in m.name or m.name in ("", ".", "..")]
    report.check(
        not bad,
        "ova.names",
        f"directories, links or paths in the archive: {bad}" if bad else "plain file names only",
    )


def _check_order(files: list[Member], report: Report) -> bool:
    names = [m.name for m in files]
    ovfs = [n for n in names if n.endswith(".ovf")]
    mfs = [n for n in names if n.endswith(".mf")]
    if len(ovfs) != 1 or len(mfs) != 1:
        report.fail("ova.order", f"need exactly one .ovf and one .mf, found {ovfs} and {mfs}")
        return False
    if names[0] != ovfs[0]:
        report.fail("ova.order", f"first member is {names[0]!r}, the descriptor {ovfs[0]!r} must be first")
        return False
    if names[1] != mfs[0]:
        report.fail(
            "ova.order", f"second member is {names[1]!r}, the manifest {mfs[0]!r} must follow the .ovf"
        )
        return False
    report.ok("ova.order", f"{names[0]} first, {names[1]} second, then {len(names) - 2} file(s)")
    return True


def _package_cert(files: list[Member], report: Report) -> Member | None:
    """The package's certificate: ``<ovf basename>.cert`` as the last member (5.2, 5.3), or None."""
    name = files[0].name.removesuffix(".ovf") + ".cert"
    at = [i for i, m in enumerate(files) if m.name == name]
    early = [i for i in at if i != len(files) - 1]
    if early:
        report.fail(
            "ova.order",
            f"certificate {name!r} is member {early[0] + 1} of {len(files)}: the certificate must be last",
        )
    return files[-1] if len(files) > 2 and files[-1].name == name else None


def _check_order_of_references(files: list[Member], referenced: dict[str, str], report: Report) -> None:
    in_tar = [m.name for m in files[2:] if m.name in referenced.values()]
    in_refs = [href for href in referenced.values() if href in in_tar]
    report.check(
        in_tar == in_refs,
        "ova.order",
        f"files follow References order: {in_tar}"
        if in_tar == in_refs
        else f"tar {in_tar} != References {in_refs}",
    )


def _check_manifest(
    path: Path, files: list[Member], by_name: dict[str, Member], cert: Member | None, report: Report
) -> None:
    text = b"".join(member_chunks(path, files[1])).decode("utf-8", "replace")
    listed: dict[str, list[tuple[str, str]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MF_LINE.fullmatch(line.strip())
        if match is None:
            report.fail("ova.manifest", f"line {number} is not 'SHA256(name)= hex': {line!r}")
            continue
        algorithm, name, digest = match.groups()
        listed.setdefault(name, []).append((algorithm, digest.lower()))
    expected = [m.name for m in files if m is not files[1] and m is not cert]
    missing = [n for n in expected if n not in listed]
    twice = [n for n, entries in listed.items() if len(entries) > 1]
    unknown = [n for n in listed if n not in by_name]
    problems = [f"not listed: {missing}"] * bool(missing) + [f"listed twice: {twice}"] * bool(twice)
    problems += [f"not in the archive: {unknown}"] * bool(unknown)
    report.check(
        not problems,
        "ova.manifest",
        "; ".join(problems)
        if problems
        else f"{files[1].name} lists each of the {len(expected)} file(s) once",
    )
    for name, entries in listed.items():
        member = by_name.get(name)
        if member is None:
            continue
        for algorithm, digest in entries:
            hasher = hashlib.new(_HASHES[algorithm])
            for chunk in member_chunks(path, member):
                hasher.update(chunk)
            actual = hasher.hexdigest()
            report.check(
                actual == digest,
                "ova.hash",
                f"{name} ({member.size} bytes) {algorithm} {actual}"
                + ("" if actual == digest else f" != manifest {digest}"),
            )
            if algorithm == "SHA1":
                report.note("ova.hash", f"{name}: SHA1 is weaker than SHA256 (ovftool >= 4.2 writes SHA256)")
