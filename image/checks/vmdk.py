"""The OVA's disk, extracted: the VMDK's own header, its capacity against the descriptor, ``qemu-img``.

Rules and their sources:
  ova.vmdk-header    VMware "Virtual Disk Format 1.1" (sparse extent header: magic ``KDMV``, capacity in
                     sectors at byte 12, descriptor offset/size in sectors at 28/36): the embedded
                     descriptor says ``createType="streamOptimized"``, matching the OVF's format URI.
  ova.capacity       DSP0243 9.1: ovf:capacity x capacityAllocationUnits >= the disk's virtual size.
  ova.qemu-img       ``qemu-img info`` detects vmdk and ``qemu-img check -f vmdk`` finds no errors (it walks
                     the grain directory and tables: an offset past the end of the file fails it).
Owns ``check_disk``. Needs qemu-img (Debian qemu-utils); a missing qemu-img is a failure, not a skip.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

from checks.ovf import Disk
from checks.report import Report

SECTOR = 512
_CREATE_TYPE = re.compile(rb'createType\s*=\s*"([^"]*)"')


def _header(path: Path) -> tuple[str, int | None]:
    """(createType, virtual size in bytes) from the extent header and its embedded descriptor."""
    with path.open("rb") as f:
        head = f.read(SECTOR)
        if head[:4] == b"KDMV":
            capacity, _grain, desc_offset, desc_size = struct.unpack_from("<QQQQ", head, 12)
            f.seek(desc_offset * SECTOR)
            descriptor = f.read(min(desc_size, 2048) * SECTOR)
        elif head.startswith(b"# Disk DescriptorFile"):
            capacity, descriptor = None, head
        else:
            return f"not a VMDK (magic {head[:4]!r})", None
    match = _CREATE_TYPE.search(descriptor)
    return (match.group(1).decode() if match else "(no createType)"), (
        capacity * SECTOR if capacity is not None else None
    )


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=600, check=False)


def check_disk(path: Path, disk: Disk, report: Report) -> None:
    create_type, header_size = _header(path)
    report.check(
        create_type == "streamOptimized",
        "ova.vmdk-header",
        f"{path.name}: createType={create_type}, header capacity {header_size} bytes",
    )
    if shutil.which("qemu-img") is None:
        report.fail("ova.qemu-img", "qemu-img not found (Debian package qemu-utils)")
        return
    info = _qemu_img("info", "--output=json", str(path))
    if info.returncode != 0:
        report.fail("ova.qemu-img", f"qemu-img info {path.name}: {info.stderr.strip()[-300:]}")
        return
    facts = json.loads(info.stdout)
    virtual = int(facts.get("virtual-size", 0))
    report.check(
        facts.get("format") == "vmdk",
        "ova.qemu-img",
        f"qemu-img info {path.name}: format {facts.get('format')}, virtual size {virtual} bytes",
    )
    check = _qemu_img("check", "-f", "vmdk", str(path))
    said = (check.stdout + check.stderr).strip().replace("\n", " | ")[-300:]
    report.check(
        check.returncode == 0, "ova.qemu-img", f"qemu-img check {path.name} (rc {check.returncode}): {said}"
    )
    needed = max(virtual, header_size or 0)
    if disk.capacity is not None:
        report.check(
            disk.capacity >= needed,
            "ova.capacity",
            f"Disk {disk.disk_id} capacity {disk.capacity} bytes >= virtual size {needed} bytes",
        )
