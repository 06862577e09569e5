"""The OVA's structure, fast (no rootfs build): the units' hardening and `systemd-analyze verify`, the
nftables ruleset (`nft -c`), and `image/ova/mkova` on a small streamOptimized VMDK made with qemu-img:
a USTAR archive with the .ovf first, a manifest whose hashes match, OVF references that hold together.
Real tools only (systemd-analyze, nft, qemu-img: the image build's packages), never skipped."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OVA_DIR = ROOT / "image" / "ova"
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
VSSD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData}"
VMW = "{http://www.vmware.com/schema/ovf}"
UNITS = ("phi-gateway.service", "phi-gateway-firstboot.service", "phi-gateway-banner.service")

HARDENING = {
    "User": "phi-gateway",
    "StateDirectory": "phi-gateway",
    "StateDirectoryMode": "0700",
    "Environment": "PHI_HOME=/var/lib/phi-gateway",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "LimitNOFILE": "16384",
    "LimitCORE": "0",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "ExecStart": "/opt/phi-gateway/bin/phi-gateway serve",
    "ExecReload": "/opt/phi-gateway/bin/phi-gateway policy reload",
}


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} is required (Debian: systemd, nftables, qemu-utils; see image/ova/build-rootfs)"
    return path


def test_service_is_hardened() -> None:
    d = directives(OVA_DIR / "phi-gateway.service")
    for key, value in HARDENING.items():
        assert value in d.get(key, []), f"phi-gateway.service: {key}={value} missing (has {d.get(key)})"
    assert int(d["LimitNOFILE"][0]) >= 8192
    # the stop timeout outlasts the drain (server.limits.drain_timeout_s, 30 s by default)
    assert int(d["TimeoutStopSec"][0]) > 30
    first = directives(OVA_DIR / "phi-gateway-firstboot.service")
    # The LAST thing first boot makes: a boot cut short after `init` runs it again (see below).
    assert first["ConditionPathExists"] == ["!/var/lib/phi-gateway/tls/cert.pem"]
    assert first["Before"] == ["phi-gateway.service"] and "network-online.target" in first["After"]


FIRSTBOOT = OVA_DIR / "rootfs/usr/local/lib/phi-gateway/firstboot"


def firstboot(home: Path) -> subprocess.CompletedProcess[str]:
    """The OVA's first-boot script for real, on ``home`` with this venv's phi-gateway."""
    phi_gateway = Path(sys.executable).parent / "phi-gateway"
    env = {**os.environ, "PHI_HOME": str(home), "PHI_GATEWAY_BIN": str(phi_gateway)}
    return subprocess.run(["bash", str(FIRSTBOOT)], env=env, capture_output=True, text=True, timeout=120)


def test_firstboot_cut_short_after_init_finishes_on_the_next_boot(tmp_path: Path) -> None:
    """Power lost between `init` and `tls self-signed`: the home is there, tls/ is not. The unit's
    condition (no tls/cert.pem) still holds, and the script skips `init` and makes the certificate."""
    home = tmp_path / "home"
    phi_gateway = Path(sys.executable).parent / "phi-gateway"
    env = {**os.environ, "PHI_HOME": str(home)}
    subprocess.run(
        [str(phi_gateway), "init", "--site", "s1"], env=env, check=True, capture_output=True, timeout=120
    )
    assert (home / "vault.db").is_file() and not (home / "tls").exists()
    key = (home / "master.key").read_bytes()
    condition = directives(OVA_DIR / "phi-gateway-firstboot.service")["ConditionPathExists"]
    assert condition == ["!/var/lib/phi-gateway/tls/cert.pem"]
    assert not (home / "tls/cert.pem").exists()  # so systemd runs the unit on this boot

    done = firstboot(home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "created" not in done.stdout  # init was not run again
    assert (home / "tls/cert.pem").is_file() and (home / "tls/key.pem").is_file()
    assert (home / "master.key").read_bytes() == key
    shown = subprocess.run(
        [str(phi_gateway), "tls", "show"], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr

    # Finished: a further run (the condition off, or by hand) changes nothing.
    cert = (home / "tls/cert.pem").read_bytes()
    again = firstboot(home)
    assert again.returncode == 0 and not again.stdout.strip(), again.stdout + again.stderr
    assert (home / "tls/cert.pem").read_bytes() == cert


def test_units_verify_clean(tmp_path: Path) -> None:
    # A root holding the units, the scripts they run and the gateway's entry point where the image puts
    # them, with the host's own system units (sysinit.target, ...) beside them.
    root = tmp_path / "root"
    shutil.copytree(OVA_DIR / "rootfs", root)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(OVA_DIR / unit, root / "etc/systemd/system" / unit)
    (root / "opt/phi-gateway/bin").mkdir(parents=True)
    shutil.copy(Path(sys.executable).parent / "phi-gateway", root / "opt/phi-gateway/bin/phi-gateway")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = [str(root / "etc/systemd/system" / u) for u in UNITS]
    r = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_nftables_ruleset_parses_and_only_opens_8080() -> None:
    conf = OVA_DIR / "nftables.conf"
    r = subprocess.run([tool("nft"), "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = conf.read_text()
    assert re.search(r"hook input priority filter; policy drop;", text)
    assert re.findall(r"tcp dport (\d+)", text) == ["8080"]


@pytest.fixture(scope="module")
def ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ova")
    raw, vmdk = work / "disk.raw", work / "disk.vmdk"
    qemu_img = tool("qemu-img")
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(raw), "64M"], check=True, timeout=30)
    with raw.open("r+b") as f:  # some data, so the VMDK has grains
        f.seek(1 << 20)
        f.write(b"phi" * 300_000)
    subprocess.run(
        [
            qemu_img,
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            str(raw),
            str(vmdk),
        ],
        check=True,
        timeout=60,
    )
    subprocess.run([qemu_img, "check", str(vmdk)], check=True, capture_output=True, timeout=30)
    out = work / "dist" / "phi-gateway-9.9.9.ova"
    subprocess.run(
        [sys.executable, str(OVA_DIR / "mkova"), str(vmdk), str(out), "--version", "9.9.9"],
        check=True,
        timeout=60,
    )
    return out


def members(ova: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(ova) as tar:
        return tar.getmembers()


def test_ova_is_ustar_with_the_ovf_first(ova: Path) -> None:
    names = [m.name for m in members(ova)]
    assert names == ["phi-gateway-9.9.9.ovf", "phi-gateway-9.9.9.mf", "phi-gateway-9.9.9-disk1.vmdk"]
    with ova.open("rb") as f:
        header = f.read(512)
    assert header[257:265] == b"ustar\x0000"  # POSIX USTAR magic and version
    assert all(m.isfile() and "/" not in m.name for m in members(ova))


def test_manifest_hashes_match(ova: Path) -> None:
    with tarfile.open(ova) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    lines = files.pop("phi-gateway-9.9.9.mf").decode().splitlines()
    listed = dict(re.fullmatch(r"SHA256\(([^)]+)\)= ([0-9a-f]{64})", line).groups() for line in lines)  # type: ignore[union-attr]
    assert listed == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_ovf_references_and_hardware(ova: Path) -> None:
    with tarfile.open(ova) as tar:
        ovf = tar.extractfile("phi-gateway-9.9.9.ovf").read()  # type: ignore[union-attr]
        vmdk_size = tar.getmember("phi-gateway-9.9.9-disk1.vmdk").size
    env = ET.fromstring(ovf)
    assert env.tag == f"{OVF}Envelope"
    (file_el,) = env.findall(f"{OVF}References/{OVF}File")
    (disk,) = env.findall(f"{OVF}DiskSection/{OVF}Disk")
    assert file_el.get(f"{OVF}href") == "phi-gateway-9.9.9-disk1.vmdk"
    assert int(file_el.get(f"{OVF}size", "-1")) == vmdk_size
    assert disk.get(f"{OVF}fileRef") == file_el.get(f"{OVF}id")
    assert (
        disk.get(f"{OVF}format")
        == "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
    )
    assert int(disk.get(f"{OVF}capacity", "0")) == 64 << 20
    assert disk.get(f"{OVF}capacityAllocationUnits") == "byte"
    assert 0 < int(disk.get(f"{OVF}populatedSize", "0")) <= 64 << 20
    (net,) = env.findall(f"{OVF}NetworkSection/{OVF}Network")

    vs = env.find(f"{OVF}VirtualSystem")
    assert vs is not None
    os_section = vs.find(f"{OVF}OperatingSystemSection")
    assert os_section is not None and os_section.get(f"{OVF}id") == "96"
    assert os_section.get(f"{VMW}osType") == "debian12_64Guest"
    assert vs.findtext(f"{OVF}ProductSection/{OVF}Version") == "9.9.9"
    hw = vs.find(f"{OVF}VirtualHardwareSection")
    assert hw is not None
    assert hw.findtext(f"{OVF}System/{VSSD}VirtualSystemType") == "vmx-14"
    items = {i.findtext(f"{RASD}ResourceType"): i for i in hw.findall(f"{OVF}Item")}
    assert sorted(items, key=int) == ["3", "4", "10", "17", "20"]
    assert items["3"].findtext(f"{RASD}VirtualQuantity") == "2"
    assert items["4"].findtext(f"{RASD}VirtualQuantity") == "4096"
    assert items["4"].findtext(f"{RASD}AllocationUnits") == "byte * 2^20"
    assert items["20"].findtext(f"{RASD}ResourceSubType") == "vmware.sata.ahci"
    assert items["17"].findtext(f"{RASD}HostResource") == f"ovf:/disk/{disk.get(f'{OVF}diskId')}"
    assert items["17"].findtext(f"{RASD}Parent") == items["20"].findtext(f"{RASD}InstanceID")
    assert items["10"].findtext(f"{RASD}ResourceSubType") == "E1000"
    assert items["10"].findtext(f"{RASD}Connection") == net.get(f"{OVF}name")
    ids = [i.findtext(f"{RASD}InstanceID") for i in hw.findall(f"{OVF}Item")]
    assert len(set(ids)) == len(ids)
    for item in hw.findall(f"{OVF}Item"):  # CIM's rasd schema: a sequence in alphabetical order
        tags = [child.tag for child in item]
        assert tags == sorted(tags) and f"{RASD}ElementName" in tags
