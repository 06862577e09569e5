"""``image/check`` against small real artifacts built here: an OVA around a qemu-img streamOptimized VMDK,
a docker archive and an OCI layout written by hand, an NSIS installer compiled by makensis.

Each artifact first passes as built, then one broken variant per rule must fail naming that rule (the
``FAIL  <rule>`` line) with exit status 1. Real tools only (qemu-img, 7z, makensis): never skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "image" / "check"
sys.path.insert(0, str(CHECK.parent))  # image/checks is a stdlib-only package beside the launcher
from checks.cli import main  # noqa: E402

STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
DISK = "phi-gateway-1.0-disk1.vmdk"


def run_check(*args: str | Path) -> tuple[int, str]:
    """In this process (each run through the launcher costs a Python start-up, about 0.3 s here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


def run_script(*args: str | Path) -> tuple[int, str]:
    """Through ``image/check`` itself, as ``./dev image-check`` runs it."""
    done = subprocess.run(
        [sys.executable, str(CHECK), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode, done.stdout + done.stderr


def assert_fails(rule: str, *args: str | Path) -> str:
    rc, out = run_check(*args)
    assert rc == 1, out
    assert re.search(rf"^FAIL\s+{re.escape(rule)}\s", out, re.M), out
    return out


def assert_passes(*args: str | Path, script: bool = False) -> str:
    rc, out = (run_script if script else run_check)(*args)
    assert rc == 0 and "FAIL" not in out, out
    return out


# ---- OVA ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vmdks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """streamOptimized, monolithicSparse and a truncated (corrupt) streamOptimized VMDK of a 2 MiB disk."""
    tmp = tmp_path_factory.mktemp("vmdk")
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "2M"], check=True)
    with raw.open("r+b") as f:
        f.seek(70000)
        f.write(b"phi-gateway")  # one allocated grain
    made = {}
    for sub in ("streamOptimized", "monolithicSparse"):
        out = tmp / f"{sub}.vmdk"
        subprocess.run(
            ["qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={sub}", str(raw), str(out)], check=True
        )
        made[sub] = out.read_bytes()
    # Cutting the file in half leaves the grain table pointing past the end: qemu-img check reports it.
    made["corrupt"] = made["streamOptimized"][: len(made["streamOptimized"]) // 2]
    return made


def _rasd(**fields: str) -> str:
    inner = "".join(f"<rasd:{k}>{v}</rasd:{k}>" for k, v in sorted(fields.items()))
    return f"      <Item>{inner}</Item>\n"


def ovf_text(size: int) -> str:
    items = (
        _rasd(
            AllocationUnits="hertz * 10^6",
            ElementName="2 virtual CPUs",
            InstanceID="1",
            ResourceType="3",
            VirtualQuantity="2",
        )
        + _rasd(
            AllocationUnits="byte * 2^20",
            ElementName="2048 MB",
            InstanceID="2",
            ResourceType="4",
            VirtualQuantity="2048",
        )
        + _rasd(ElementName="SCSI controller 0", InstanceID="3", ResourceSubType="lsilogic", ResourceType="6")
        + _rasd(
            AddressOnParent="0",
            ElementName="Hard disk 1",
            HostResource="ovf:/disk/vmdisk1",
            InstanceID="4",
            Parent="3",
            ResourceType="17",
        )
        + _rasd(
            AutomaticAllocation="true",
            Connection="nat",
            ElementName="Ethernet 1",
            InstanceID="5",
            ResourceSubType="VmxNet3",
            ResourceType="10",
        )
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
    <File ovf:id="file1" ovf:href="{DISK}" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^20"
      ovf:format="{STREAM}"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks</Info>
    <Network ovf:name="nat"><Description>The appliance network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="phi-gateway">
    <Info>Phi Gateway appliance</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
{items}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def _member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
    archive.addfile(info, io.BytesIO(data))


def make_ova(
    tmp: Path,
    vmdk: bytes,
    *,
    edits: tuple[tuple[str, str], ...] = (),
    order: tuple[str, ...] = ("ovf", "mf", "vmdk"),
    fmt: int = tarfile.USTAR_FORMAT,
    mf: Callable[[list[str]], list[str]] = lambda lines: lines,
    extra: dict[str, bytes] | None = None,
) -> Path:
    descriptor = ovf_text(len(vmdk))
    for old, new in edits:
        assert old in descriptor, old
        descriptor = descriptor.replace(old, new, 1)
    files = {"phi-gateway-1.0.ovf": descriptor.encode(), DISK: vmdk, **(extra or {})}
    lines = [f"SHA256({name})= {hashlib.sha256(data).hexdigest()}" for name, data in files.items()]
    files["phi-gateway-1.0.mf"] = ("\n".join(mf(lines)) + "\n").encode()
    by_kind = {"ovf": "phi-gateway-1.0.ovf", "mf": "phi-gateway-1.0.mf", "vmdk": DISK}
    names = [by_kind[k] for k in order] + list(extra or {})
    path = tmp / "phi-gateway-1.0.ova"
    with tarfile.open(path, "w", format=fmt) as archive:
        for name in names:
            _member(archive, name, files[name])
    return path


def test_a_valid_ova_passes_with_its_figures(tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    out = assert_passes("--ova", make_ova(tmp_path, vmdks["streamOptimized"]), script=True)
    sha = hashlib.sha256(vmdks["streamOptimized"]).hexdigest()
    assert f"{DISK} ({len(vmdks['streamOptimized'])} bytes) SHA256 {sha}" in out
    assert "createType=streamOptimized" in out and "No errors were found" in out
    assert "capacity 2097152 bytes >= virtual size 2097152 bytes" in out


def test_sha1_lines_pass_with_a_note(tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    vmdk = vmdks["streamOptimized"]

    def sha1(lines: list[str]) -> list[str]:
        return [f"SHA1({DISK})= {hashlib.sha1(vmdk).hexdigest()}" if DISK in ln else ln for ln in lines]

    out = assert_passes("--ova", make_ova(tmp_path, vmdk, mf=sha1))
    assert re.search(r"^note\s+ova.hash\s+.*SHA1 is weaker", out, re.M), out


OVA_BREAKS: dict[str, tuple[str, dict]] = {
    "ovf-not-first": ("ova.order", {"order": ("mf", "ovf", "vmdk")}),
    "mf-after-disk": ("ova.order", {"order": ("ovf", "vmdk", "mf")}),
    "gnu-tar": ("ova.ustar", {"fmt": tarfile.GNU_FORMAT}),
    "pax-tar": ("ova.ustar", {"fmt": tarfile.PAX_FORMAT, "extra": {"n" * 120 + ".txt": b"x"}}),
    "wrong-hash": ("ova.hash", {"mf": lambda ls: [re.sub(r"= \w+$", "= " + "0" * 64, ln) for ln in ls]}),
    "missing-manifest-line": ("ova.manifest", {"mf": lambda ls: [ln for ln in ls if DISK not in ln]}),
    "spaced-manifest-line": ("ova.manifest", {"mf": lambda ls: [ln.replace(")= ", ") = ") for ln in ls]}),
    "extra-member": ("ova.extra", {"extra": {"notes.txt": b"not named by the OVF\n"}}),
    "path-in-name": ("ova.names", {"extra": {"sub/notes.txt": b"x"}}),
    "file-size-wrong": ("ova.file-size", {"edits": (('ovf:size="', 'ovf:size="1'),)}),
    "file-href-dangling": ("ova.file-href", {"edits": ((f'ovf:href="{DISK}"', 'ovf:href="other.vmdk"'),)}),
    "fileref-dangling": ("ova.disk-fileref", {"edits": (('ovf:fileRef="file1"', 'ovf:fileRef="file9"'),)}),
    "hostresource-dangling": ("ova.host-resource", {"edits": (("ovf:/disk/vmdisk1", "ovf:/disk/vmdisk9"),)}),
    "disk-without-controller-parent": (
        "ova.hw-disk-parent",
        {"edits": (("<rasd:Parent>3<", "<rasd:Parent>9<"),)},
    ),
    "disk-format-not-stream": ("ova.disk-format", {"edits": (("#streamOptimized", "#sparse"),)}),
    "capacity-too-small": ("ova.capacity", {"edits": (('ovf:capacity="2"', 'ovf:capacity="1"'),)}),
    "two-cpus": (
        "ova.hw-cpu",
        {
            "edits": (
                ("<rasd:InstanceID>2<", "<rasd:InstanceID>2<"),
                ("<rasd:ResourceType>4<", "<rasd:ResourceType>3<"),
            )
        },
    ),
    "nic-on-unknown-network": (
        "ova.hw-nic",
        {"edits": (("<rasd:Connection>nat<", "<rasd:Connection>bridged<"),)},
    ),
    "instance-id-repeated": (
        "ova.hw-instance-ids",
        {"edits": (("<rasd:InstanceID>5<", "<rasd:InstanceID>4<"),)},
    ),
    "not-ovf-1-namespace": (
        "ova.ovf-xml",
        {
            "edits": (
                (
                    '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"',
                    '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2"',
                ),
            )
        },
    ),
}


@pytest.mark.parametrize("case", list(OVA_BREAKS))
def test_a_broken_ova_fails_its_rule(case: str, tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    rule, changes = OVA_BREAKS[case]
    assert_fails(rule, "--ova", make_ova(tmp_path, vmdks["streamOptimized"], **changes))


@pytest.mark.parametrize(
    ("disk", "rule"), [("monolithicSparse", "ova.vmdk-header"), ("corrupt", "ova.qemu-img")]
)
def test_a_bad_disk_fails_its_rule(disk: str, rule: str, tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    assert_fails(rule, "--ova", make_ova(tmp_path, vmdks[disk]))


CERT = (
    b"SHA256(phi-gateway-1.0.mf)= "
    + b"ab" * 256
    + b"\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
)


def _without(name: str) -> Callable[[list[str]], list[str]]:
    """The manifest as a signer writes it: no line for the certificate, which signs the manifest."""
    return lambda lines: [ln for ln in lines if f"({name})" not in ln]


def test_the_package_certificate_last_is_exempt(tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    """DSP0243 5.2/5.3: ``<ovf basename>.cert``, last, is in neither the manifest nor References."""
    ova = make_ova(
        tmp_path,
        vmdks["streamOptimized"],
        extra={"phi-gateway-1.0.cert": CERT},
        mf=_without("phi-gateway-1.0.cert"),
    )
    out = assert_passes("--ova", ova)
    assert "lists each of the 2 file(s) once" in out, out


def test_a_cert_named_otherwise_is_a_file_like_any_other(tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    """Only the package's own certificate is exempt: an unlisted, unreferenced ``payload.cert`` is not."""
    extra = {"payload.cert": b"#!/bin/sh\nanything at all\n"}
    ova = make_ova(tmp_path, vmdks["streamOptimized"], extra=extra, mf=_without("payload.cert"))
    out = assert_fails("ova.manifest", "--ova", ova)
    assert re.search(r"^FAIL\s+ova\.manifest\s+not listed: \['payload\.cert'\]", out, re.M), out
    assert re.search(r"^FAIL\s+ova\.extra\s+.*'payload\.cert'", out, re.M), out


def test_the_package_certificate_not_last_fails(tmp_path: Path, vmdks: dict[str, bytes]) -> None:
    extra = {"phi-gateway-1.0.cert": CERT, "notes.txt": b"named by nothing\n"}
    ova = make_ova(tmp_path, vmdks["streamOptimized"], extra=extra, mf=_without("phi-gateway-1.0.cert"))
    out = assert_fails("ova.order", "--ova", ova)
    assert "certificate 'phi-gateway-1.0.cert' is member 4 of 5" in out, out
    assert re.search(r"^FAIL\s+ova\.manifest\s+not listed: \['phi-gateway-1\.0\.cert'\]", out, re.M), out


# ---- OCI: docker archive and OCI layout -----------------------------------------------------------------

PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    + "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n" * 3
    + "-----END PRIVATE KEY-----\n"
).encode()
DPKG = b"Package: libgomp1\nStatus: install ok installed\nVersion: 12.2.0-14\n\n"
DPKG += b"Package: gcc-12-base\nStatus: install ok installed\nVersion: 12.2.0-14\n\n"
DPKG += b"Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n"
BASE = {
    "etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
    "usr/bin/python3.11": b"\x7fELF\0\0 not really",
    "var/lib/dpkg/status": DPKG,
    "opt/phi-gateway/bin/phi-gateway": b"#!/opt/phi-gateway/bin/python\n",
    # a library that names the marker in code, as cryptography's ssh.py does: not key material
    "opt/phi-gateway/lib/ssh.py": b'_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n',
}
CONFIG = {
    "User": "phi-gateway",
    "ExposedPorts": {"8080/tcp": {}},
    "Volumes": {"/var/lib/phi-gateway": {}},
    "Entrypoint": ["/usr/local/bin/phi-gateway-entrypoint"],
    "Healthcheck": {"Test": ["CMD", "/opt/phi-gateway/bin/python", "-m", "appliance.probe", "/health"]},
}


class Link(NamedTuple):
    """A hard link (tar LNKTYPE) to ``target``, a file earlier in the layer or in a layer below."""

    target: str


def layer_tar(files: dict[str, bytes | Link | None]) -> bytes:
    """A layer; a None value writes a directory, a Link a hard link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif isinstance(data, Link):
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, data.target, 0o644
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_docker_archive(
    tmp: Path,
    upper: tuple[dict[str, bytes | Link | None], ...] = (),
    config: dict | None = None,
    diff_id: str = "",
) -> Path:
    layers = [layer_tar(BASE), *(layer_tar(u) for u in upper)]
    digests = [hashlib.sha256(layer).hexdigest() for layer in layers]
    body = {
        "architecture": "amd64",
        "os": "linux",
        "config": CONFIG if config is None else config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id or f"sha256:{d}" for d in digests]},
    }
    config_bytes = json.dumps(body).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [
        {"Config": config_name, "RepoTags": ["phi-gateway:1.0"], "Layers": [f"{d}.tar" for d in digests]}
    ]
    path = tmp / "phi-gateway-1.0.docker.tar"
    with tarfile.open(path, "w") as archive:
        for digest, layer in zip(digests, layers, strict=True):
            _member(archive, f"{digest}.tar", layer)
        _member(archive, config_name, config_bytes)
        _member(archive, "manifest.json", json.dumps(manifest).encode())
    return path


def test_a_valid_docker_archive_passes(tmp_path: Path) -> None:
    out = assert_passes("--oci", make_docker_archive(tmp_path), script=True)
    assert "User 'phi-gateway'" in out and "5 files" in out


WHITED_OUT = {
    "file-deleted-by-whiteout": (
        {"usr/bin/gcc-12": b"\x7fELF", "etc/ssl/private/build.key": PEM},
        {"usr/bin/.wh.gcc-12": b"", "etc/ssl/.wh.private": b""},
    ),
    "directory-emptied-by-opaque-whiteout": (
        {"root/.cache/pip/http/ab/cd": b"cached wheel", "root/.cache/pip/selfcheck.json": b"{}"},
        {"root/.cache/.wh..wh..opq": b""},
    ),
}


@pytest.mark.parametrize("case", list(WHITED_OUT))
def test_what_an_upper_layer_deletes_does_not_count(case: str, tmp_path: Path) -> None:
    out = assert_passes("--oci", make_docker_archive(tmp_path, WHITED_OUT[case]))
    assert "finding(s) deleted by them" in out and not re.search(r" 0 finding\(s\) deleted", out), out


def test_a_hard_link_keeps_a_deleted_key(tmp_path: Path) -> None:
    """A whiteout deletes a name, not the file: a hard link under a harmless name keeps the key."""
    layers = (
        {"opt/build/signing.key": PEM, "opt/phi-gateway/share/notes.txt": Link("opt/build/signing.key")},
        {"opt/build/.wh.signing.key": b""},
    )
    out = assert_fails("oci.no-secrets", "--oci", make_docker_archive(tmp_path, layers))
    assert (
        "opt/phi-gateway/share/notes.txt (PEM private key block, hard link of opt/build/signing.key)" in out
    )


def test_a_hard_link_keeps_a_deleted_home_file(tmp_path: Path) -> None:
    """The name is the finding (master.key): deleting that name moves it to the file's surviving name."""
    layers = (
        {
            "opt/phi-gateway/share/blob": b"k" * 32,
            "var/lib/phi-gateway/master.key": Link("opt/phi-gateway/share/blob"),
        },
        {"var/lib/phi-gateway/.wh.master.key": b""},
    )
    out = assert_fails("oci.no-secrets", "--oci", make_docker_archive(tmp_path, layers))
    assert (
        "opt/phi-gateway/share/blob (a gateway home file, hard link of var/lib/phi-gateway/master.key)" in out
    )


def test_a_key_deleted_with_its_hard_links_does_not_count(tmp_path: Path) -> None:
    layers = (
        {"opt/build/signing.key": PEM},
        {"opt/phi-gateway/share/notes.txt": Link("opt/build/signing.key")},  # a link to a lower layer's file
        {"opt/build/.wh.signing.key": b"", "opt/phi-gateway/share/.wh.notes.txt": b""},
    )
    out = assert_passes("--oci", make_docker_archive(tmp_path, layers))
    assert "2 finding(s) deleted by them" in out, out


TOKEN = b"[client]\ntoken = ops-bot:" + b"0123456789abcdef" * 3 + b"\n"
DOCKER_BREAKS: dict[str, tuple[str, dict]] = {
    "root-user": ("oci.user", {"config": {**CONFIG, "User": "root"}}),
    "uid-0-user": ("oci.user", {"config": {**CONFIG, "User": "0:0"}}),
    "no-user": ("oci.user", {"config": {k: v for k, v in CONFIG.items() if k != "User"}}),
    "no-healthcheck": (
        "oci.healthcheck",
        {"config": {k: v for k, v in CONFIG.items() if k != "Healthcheck"}},
    ),
    "no-8080": ("oci.port", {"config": {**CONFIG, "ExposedPorts": {"9090/tcp": {}}}}),
    "no-volume": ("oci.volume", {"config": {**CONFIG, "Volumes": {}}}),
    "no-entrypoint": ("oci.entrypoint", {"config": {**CONFIG, "Entrypoint": None}}),
    "compiler-in-a-layer": (
        "oci.no-compilers",
        {"upper": ({"usr/bin/x86_64-linux-gnu-gcc-12": b"\x7fELF"},)},
    ),
    "cc1-in-a-layer": ("oci.no-compilers", {"upper": ({"usr/lib/gcc/x86_64-linux-gnu/12/cc1": b"\x7fELF"},)}),
    "gcc-package-installed": (
        "oci.no-compiler-packages",
        {"upper": ({"var/lib/dpkg/status": DPKG + b"\nPackage: gcc-12\nStatus: install ok installed\n"},)},
    ),
    "private-key-file": ("oci.no-secrets", {"upper": ({"etc/phi-gateway/tls.pem": PEM},)}),
    "gateway-home-baked-in": ("oci.no-secrets", {"upper": ({"var/lib/phi-gateway/master.key": b"k" * 32},)}),
    "api-token-in-etc": ("oci.no-secrets", {"upper": ({"etc/phi-gateway/client.ini": TOKEN},)}),
    "apt-cache-left": (
        "oci.no-caches",
        {"upper": ({"var/cache/apt/archives/gcc-12_12.2.0-14_amd64.deb": b"!"},)},
    ),
    "pip-cache-left": ("oci.no-caches", {"upper": ({"root/.cache/pip/http/a/b": b"wheel"},)}),
    "layer-digest-wrong": ("oci.layer-digest", {"diff_id": "sha256:" + "0" * 64}),
}


@pytest.mark.parametrize("case", list(DOCKER_BREAKS))
def test_a_broken_docker_archive_fails_its_rule(case: str, tmp_path: Path) -> None:
    rule, changes = DOCKER_BREAKS[case]
    assert_fails(rule, "--oci", make_docker_archive(tmp_path, **changes))


def make_oci_layout(tmp: Path) -> Path:
    root = tmp / "phi-gateway-1.0.oci"
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    layer = layer_tar(BASE)
    oci_config = {k: v for k, v in CONFIG.items() if k != "Healthcheck"}  # the OCI format has none
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": oci_config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(gzip.compress(layer, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode(), manifest["mediaType"])]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def test_an_oci_layout_passes_and_notes_the_missing_healthcheck(tmp_path: Path) -> None:
    out = assert_passes("--oci", make_oci_layout(tmp_path))
    assert re.search(r"^note\s+oci.healthcheck\s", out, re.M), out
    assert out.count("ok    oci.blob-digest") == 3, out


def test_an_oci_layout_with_a_corrupt_blob_fails(tmp_path: Path) -> None:
    root = make_oci_layout(tmp_path)
    index = json.loads((root / "index.json").read_text())
    manifest_blob = root / "blobs" / "sha256" / index["manifests"][0]["digest"].removeprefix("sha256:")
    layer = json.loads(manifest_blob.read_text())["layers"][0]["digest"].removeprefix("sha256:")
    (root / "blobs" / "sha256" / layer).write_bytes(gzip.compress(layer_tar({"etc/x": b"tampered"}), mtime=0))
    out = assert_fails("oci.blob-digest", "--oci", root)
    assert re.search(r"^FAIL\s+oci.layer-digest\s", out, re.M), out


# ---- Windows installer ----------------------------------------------------------------------------------

PAYLOAD = {  # one small stand-in for each member the check requires
    "python/python.exe": b"MZ python",
    "python/python311.dll": b"MZ dll",
    "python/Lib/site-packages/appliance/__init__.py": b"",
    "python/Lib/site-packages/llama_cpp/lib/llama.dll": b"MZ llama",
    "python/Lib/site-packages/llama_cpp/lib/ggml-base.dll": b"MZ ggml",
    "python/Lib/site-packages/llama_cpp/lib/ggml-cpu-haswell.dll": b"MZ cpu",
    "python/Lib/site-packages/win32/win32service.pyd": b"MZ pyd",
    "python/Lib/site-packages/winloop/__init__.py": b"",
    "phi_service.py": b"# service host\n",
    "phi-gateway.cmd": b"@echo off\n",
}


def make_installer(tmp: Path, payload: dict[str, bytes], target: str = "") -> Path:
    for name, data in payload.items():
        (tmp / "payload" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "payload" / name).write_bytes(data)
    (tmp / "payload").mkdir(exist_ok=True)
    (tmp / "setup.nsi").write_text(
        (f"Target {target}\n" if target else "")
        + 'OutFile "phi-gateway-1.0-setup.exe"\nInstallDir "$PROGRAMFILES64\\PhiGateway"\n'
        + 'Section\nSetOutPath "$INSTDIR"\nFile /r "payload\\*"\nWriteUninstaller "$INSTDIR\\uninstall.exe"\n'
        + 'SectionEnd\nSection "Uninstall"\nDelete "$INSTDIR\\uninstall.exe"\nSectionEnd\n'
    )
    subprocess.run(["makensis", "-V1", "setup.nsi"], cwd=tmp, check=True, capture_output=True)
    return tmp / "phi-gateway-1.0-setup.exe"


@pytest.mark.parametrize(("target", "machine"), [("", "0x14c"), ("amd64-unicode", "0x8664")])
def test_an_nsis_installer_passes_and_lists_its_members(target: str, machine: str, tmp_path: Path) -> None:
    out = assert_passes("--windows", make_installer(tmp_path, PAYLOAD, target))
    assert f"machine {machine}" in out and "7z reads it as Nsis" in out
    for name in [*PAYLOAD, "uninstall.exe"]:
        assert re.search(rf"^\s+\S+\s+{re.escape(name)}$", out, re.M), out
    assert ("32-bit NSIS stub" in out) == (machine == "0x14c")


def test_an_installer_missing_a_member_fails(tmp_path: Path) -> None:
    payload = {k: v for k, v in PAYLOAD.items() if "llama" not in k}
    out = assert_fails("win.members", "--windows", make_installer(tmp_path, payload))
    assert "python/Lib/site-packages/llama_cpp/lib/llama.dll: no member matches" in out


def test_a_file_that_is_no_pe_fails(tmp_path: Path) -> None:
    fake = tmp_path / "phi-gateway-1.0-setup.exe"
    fake.write_bytes(b"#!/bin/sh\necho not an installer\n")
    out = assert_fails("win.pe", "--windows", fake)
    assert re.search(r"^FAIL\s+win.nsis\s", out, re.M), out


# ---- discovery under dist/ ------------------------------------------------------------------------------


def test_dist_with_every_artifact_passes_and_a_missing_kind_fails(
    tmp_path: Path, vmdks: dict[str, bytes]
) -> None:
    dist = tmp_path / "dist"
    for sub in ("oci", "ova", "windows", "work"):
        (dist / sub).mkdir(parents=True)
    make_docker_archive(dist / "oci")
    make_oci_layout(dist / "oci")
    make_ova(dist / "ova", vmdks["streamOptimized"])
    make_installer(dist / "work", PAYLOAD).rename(dist / "windows" / "phi-gateway-1.0-setup.exe")
    out = assert_passes("--dist", dist)
    assert out.count("\n== ") + out.startswith("== ") == 4, out
    (dist / "windows" / "phi-gateway-1.0-setup.exe").unlink()
    out = assert_fails("artifact", "--dist", dist)
    assert "no Windows installer" in out
    assert_passes("--dist", dist, "--ova", dist / "ova" / "phi-gateway-1.0.ova")
