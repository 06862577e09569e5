"""The OVF descriptor: its envelope, the File <-> Disk <-> HostResource chain and the virtual hardware.

Rules and their sources (DSP0243 1.1.0; OVF 1.x envelope namespace http://schemas.dmtf.org/ovf/envelope/1):
  ova.ovf-xml        7: the descriptor is XML whose root is the OVF 1.x ``Envelope``.
  ova.file-href      7.1: each References/File href is a member of the package (a plain name).
  ova.file-size      7.1: ovf:size is the file's size in bytes.
  ova.disk-fileref   9.1: each Disk's ovf:fileRef names a File's ovf:id.
  ova.disk-format    9.1: ovf:format is VMware's streamOptimized VMDK URI (the only VMDK flavour an OVA
                     carries: compressed grains, no random access needed while streaming).
  ova.host-resource  8.3 (virtual hardware, ``ovf:/disk/<id>``): each disk drive item names a Disk, and
                     every Disk is attached to some item.
  ova.hw-*           8.3 and the CIM RASD ResourceType values: System, one CPU (3), memory (4), a disk
                     controller (5 IDE, 6 SCSI, 20 other storage), the disk drive (17) under it, a NIC (10)
                     on a NetworkSection network (9.2), InstanceIDs unique (8.3).
Owns ``parse``, ``check_references``, ``check_disks``, ``check_hardware``. Reads only the descriptor text.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass

from checks.report import Report

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
CPU, MEMORY, NIC, DISK_DRIVE = "3", "4", "10", "17"
CONTROLLERS = {"5": "IDE", "6": "SCSI", "20": "other storage"}
_UNITS = re.compile(r"byte(?:\s*\*\s*(\d+)\s*\^\s*(\d+))?")
_HOST_DISK = re.compile(r"(?:ovf:)?/disk/(.+)")


@dataclass(frozen=True)
class Disk:
    disk_id: str
    file_id: str | None
    capacity: int | None  # bytes, None when the descriptor's figure cannot be read


def _q(tag: str, ns: str = OVF) -> str:
    return f"{{{ns}}}{tag}"


def _attr(element: ET.Element, name: str) -> str | None:
    """OVF 1.x attributes are namespace-qualified (ovf:href); tolerate the bare form some tools write."""
    return element.get(_q(name), element.get(name))


def parse(data: bytes, report: Report) -> ET.Element | None:
    try:
        # The descriptor is our own build's output and is only read, never served: expat suffices.
        root = ET.fromstring(data)  # noqa: S314
    except ET.ParseError as exc:
        report.fail("ova.ovf-xml", f"descriptor is not XML: {exc}")
        return None
    if root.tag != _q("Envelope"):
        report.fail("ova.ovf-xml", f"root element is {root.tag}, expected {_q('Envelope')}")
        return None
    report.ok("ova.ovf-xml", f"{len(data)} bytes of XML, root Envelope in {OVF}")
    return root


def check_references(root: ET.Element, sizes: dict[str, int], report: Report) -> dict[str, str]:
    """File id -> href, in References order; checks each href is a member and each size matches."""
    files: dict[str, str] = {}
    for element in root.iterfind(f"{_q('References')}/{_q('File')}"):
        file_id, href, size = _attr(element, "id"), _attr(element, "href") or "", _attr(element, "size")
        files[file_id or ""] = href
        if not report.check(href in sizes, "ova.file-href", f"File {file_id} href {href!r} is a member"):
            continue
        report.check(
            size is not None and size.isdigit() and int(size) == sizes[href],
            "ova.file-size",
            f"File {file_id} {href}: ovf:size {size} vs member {sizes[href]} bytes",
        )
    if not files:
        report.fail("ova.file-href", "References holds no File")
    return files


def check_disks(root: ET.Element, report: Report) -> dict[str, Disk]:
    file_ids = {_attr(f, "id") for f in root.iterfind(f"{_q('References')}/{_q('File')}")}
    disks: dict[str, Disk] = {}
    for element in root.iterfind(f"{_q('DiskSection')}/{_q('Disk')}"):
        disk_id, file_ref = _attr(element, "diskId") or "", _attr(element, "fileRef")
        report.check(
            file_ref in file_ids,
            "ova.disk-fileref",
            f"Disk {disk_id} fileRef {file_ref!r} "
            + ("names a File" if file_ref in file_ids else "names no File"),
        )
        fmt = _attr(element, "format")
        report.check(fmt == STREAM_OPTIMIZED, "ova.disk-format", f"Disk {disk_id} format {fmt}")
        disks[disk_id] = Disk(disk_id, file_ref, _capacity(element, disk_id, report))
    if not disks:
        report.fail("ova.disk-fileref", "DiskSection holds no Disk")
    return disks


def _capacity(element: ET.Element, disk_id: str, report: Report) -> int | None:
    capacity, units = _attr(element, "capacity") or "", _attr(element, "capacityAllocationUnits") or "byte"
    match = _UNITS.fullmatch(units.strip())
    if not capacity.isdigit() or match is None:
        report.fail("ova.capacity", f"Disk {disk_id} capacity {capacity!r} units {units!r} unreadable")
        return None
    base, power = match.groups()
    return int(capacity) * (int(base) ** int(power) if base else 1)


def _items(section: ET.Element) -> list[dict[str, list[str]]]:
    items = []
    for item in section.iterfind(_q("Item")):
        fields: dict[str, list[str]] = {}
        for child in item:
            if child.tag.startswith(f"{{{RASD}}}"):
                fields.setdefault(child.tag.split("}", 1)[1], []).append((child.text or "").strip())
        items.append(fields)
    return items


def _one(fields: dict[str, list[str]], name: str) -> str:
    return (fields.get(name) or [""])[0]


def check_hardware(root: ET.Element, disks: dict[str, Disk], report: Report) -> None:
    sections = list(root.iter(_q("VirtualHardwareSection")))
    if not sections:
        report.fail("ova.hw-system", "no VirtualHardwareSection")
        return
    networks = {_attr(n, "name") for n in root.iterfind(f"{_q('NetworkSection')}/{_q('Network')}")}
    used: set[str] = set()
    for section in sections:
        report.check(section.find(_q("System")) is not None, "ova.hw-system", "VirtualHardwareSection/System")
        items = _items(section)
        by_type = Counter(_one(i, "ResourceType") for i in items)
        ids = Counter(_one(i, "InstanceID") for i in items)
        repeated = sorted(k for k, n in ids.items() if n > 1 or not k)
        report.check(
            not repeated, "ova.hw-instance-ids", f"{len(items)} items, repeated or empty: {repeated}"
        )
        report.check(by_type[CPU] == 1, "ova.hw-cpu", f"{by_type[CPU]} CPU item(s) (ResourceType 3), need 1")
        report.check(
            by_type[MEMORY] >= 1, "ova.hw-memory", f"{by_type[MEMORY]} memory item(s) (ResourceType 4)"
        )
        controllers = {
            _one(i, "InstanceID"): CONTROLLERS[_one(i, "ResourceType")]
            for i in items
            if _one(i, "ResourceType") in CONTROLLERS
        }
        report.check(bool(controllers), "ova.hw-controller", f"disk controllers (5/6/20): {controllers}")
        for item in (i for i in items if _one(i, "ResourceType") == DISK_DRIVE):
            _check_drive(item, disks, controllers, used, report)
        nics = [i for i in items if _one(i, "ResourceType") == NIC]
        report.check(bool(nics), "ova.hw-nic", f"{len(nics)} NIC item(s) (ResourceType 10)")
        for nic in nics:
            connection, known = _one(nic, "Connection"), sorted(n or "" for n in networks)
            report.check(
                connection in networks,
                "ova.hw-nic",
                f"NIC {_one(nic, 'InstanceID')} Connection {connection!r}, NetworkSection has {known}",
            )
    unused = sorted(set(disks) - used)
    report.check(
        not unused, "ova.host-resource", f"Disks no item uses: {unused}" if unused else "every Disk used"
    )


def _check_drive(
    item: dict[str, list[str]],
    disks: dict[str, Disk],
    controllers: dict[str, str],
    used: set[str],
    report: Report,
) -> None:
    instance = _one(item, "InstanceID")
    for resource in item.get("HostResource", []) or [""]:
        match = _HOST_DISK.fullmatch(resource)
        disk_id = match.group(1) if match else None
        named = f"names Disk {disk_id}" if disk_id in disks else "names no Disk"
        if report.check(
            disk_id in disks, "ova.host-resource", f"disk item {instance} HostResource {resource!r} {named}"
        ):
            used.add(disk_id or "")
    parent = _one(item, "Parent")
    report.check(
        parent in controllers,
        "ova.hw-disk-parent",
        f"disk item {instance} Parent {parent!r} "
        + (
            f"is the {controllers[parent]} controller"
            if parent in controllers
            else "is no controller's InstanceID"
        ),
    )
