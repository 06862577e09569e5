"""The OCI image in both shapes: the docker archive (``buildah push docker-archive:``) and the OCI layout.

Rules and their sources:
  oci.archive-manifest  docker-archive format (as ``docker save`` / buildah write it): manifest.json with
                        one entry naming Config and Layers, each a member of the archive.
  oci.config-digest     the config's name (docker archive) or descriptor (OCI) is sha256 of its bytes.
  oci.layer-digest      each layer's uncompressed sha256 is the config's rootfs.diff_ids entry, in order.
  oci.layout            OCI image-layout spec: ``oci-layout`` with imageLayoutVersion, index.json -> manifest.
  oci.blob-digest       OCI image-layout spec: every blob under blobs/sha256 hashes to its own name, and a
                        descriptor's size is its blob's size.
  oci.user / oci.healthcheck / oci.port / oci.volume / oci.entrypoint
                        the image config (docker image spec ``config``): a non-root User, a Healthcheck
                        probing /health (docker format only: the OCI config has no Healthcheck field, so its
                        absence there is a note), ExposedPorts 8080/tcp, Volumes /var/lib/phi-gateway,
                        an Entrypoint.
  oci.no-*              see ``layers``.
Owns ``check_docker_archive`` and ``check_oci_layout``. Never unpacks a layer to disk.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import IO, Any

from checks.layers import LayerScan
from checks.report import Report

PORT, HOME = "8080/tcp", "/var/lib/phi-gateway"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return f"sha256:{self.sha.hexdigest()}"


def check_config(config: dict[str, Any], report: Report, *, docker: bool) -> None:
    cfg = config.get("config") or {}
    user = str(cfg.get("User") or "")
    name = user.split(":", 1)[0]
    report.check(
        bool(name) and name not in ("root", "0"), "oci.user", f"User {user!r} (not empty, not root/0)"
    )
    health = cfg.get("Healthcheck")
    test = " ".join((health or {}).get("Test") or [])
    if health is None and not docker:
        report.note(
            "oci.healthcheck", "no Healthcheck: the OCI config format has no such field (docker only)"
        )
    else:
        good = "/health" in test and not test.startswith("NONE")
        report.check(good, "oci.healthcheck", f"Healthcheck test {test!r} probes /health")
    ports = sorted((cfg.get("ExposedPorts") or {}).keys())
    report.check(PORT in ports, "oci.port", f"ExposedPorts {ports} include {PORT}")
    volumes = sorted((cfg.get("Volumes") or {}).keys())
    report.check(HOME in volumes, "oci.volume", f"Volumes {volumes} include {HOME}")
    entrypoint = cfg.get("Entrypoint") or []
    report.check(bool(entrypoint), "oci.entrypoint", f"Entrypoint {entrypoint}")


def _scan_layer(raw: IO[bytes], scan: LayerScan, report: Report, label: str) -> str | None:
    """Scan one layer (plain or gzip), returning the sha256 of its uncompressed tar (its diff_id)."""
    head = raw.read(4)
    raw.seek(0)  # both callers hand a seekable file: a tar member or a blob
    if head.startswith(_ZSTD):
        report.fail("oci.layer-digest", f"{label}: zstd layer, which Python 3.11's stdlib cannot read")
        return None
    plain = _Hashing(gzip.GzipFile(fileobj=raw) if head.startswith(_GZIP) else raw)
    scan.add_layer(plain)  # type: ignore[arg-type]  # tarfile's stream mode only calls read()
    return plain.drain()


def _check_diff_ids(config: dict[str, Any], digests: list[str | None], report: Report) -> None:
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != len(digests):
        report.fail(
            "oci.layer-digest", f"{len(digests)} layers but config rootfs has {len(diff_ids)} diff_ids"
        )
    for index, (want, got) in enumerate(zip(diff_ids, digests, strict=False)):
        if got is not None:
            report.check(
                want == got,
                "oci.layer-digest",
                f"layer {index} diff_id {got}" + ("" if want == got else f" != config {want}"),
            )


def check_docker_archive(path: Path, report: Report) -> None:
    report.section(f"OCI docker archive {path} ({path.stat().st_size} bytes)")
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        report.fail("oci.archive-manifest", f"not a tar: {exc}")
        return
    with archive:
        try:
            entries = json.loads(_member(archive, "manifest.json"))
            entry = entries[0]
            config_name, layer_names = entry["Config"], list(entry["Layers"])
            config_bytes = _member(archive, config_name)
            config = json.loads(config_bytes)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            report.fail("oci.archive-manifest", f"manifest.json or its config unreadable: {exc!r}")
            return
        report.check(
            len(entries) == 1,
            "oci.archive-manifest",
            f"{len(entries)} image(s), config {config_name}, {len(layer_names)} layer(s)"
            f", tags {entry.get('RepoTags')}",
        )
        stem = Path(config_name).stem
        if _HEX64.fullmatch(stem):
            actual = hashlib.sha256(config_bytes).hexdigest()
            report.check(
                actual == stem, "oci.config-digest", f"config {len(config_bytes)} bytes sha256 {actual}"
            )
        check_config(config, report, docker=True)
        scan, digests = LayerScan(), []
        for name in layer_names:
            try:
                raw = archive.extractfile(name)
            except KeyError:
                raw = None
            if raw is None:
                report.fail("oci.archive-manifest", f"layer {name} is not in the archive")
                digests.append(None)
                continue
            digests.append(_scan_layer(raw, scan, report, name))
        _check_diff_ids(config, digests, report)
        scan.report_to(report)


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    f = archive.extractfile(name)
    if f is None:
        raise KeyError(name)
    return f.read()


def check_oci_layout(path: Path, report: Report) -> None:
    report.section(f"OCI image layout {path}")
    try:
        layout = json.loads((path / "oci-layout").read_text())
        index = json.loads((path / "index.json").read_text())
    except (OSError, ValueError) as exc:
        report.fail("oci.layout", f"oci-layout / index.json unreadable: {exc}")
        return
    report.check(
        bool(layout.get("imageLayoutVersion")),
        "oci.layout",
        f"imageLayoutVersion {layout.get('imageLayoutVersion')}"
        f", {len(index.get('manifests') or [])} manifest(s)",
    )
    blobs = path / "blobs" / "sha256"
    for blob in sorted(blobs.iterdir()) if blobs.is_dir() else []:
        sha = hashlib.sha256()
        with blob.open("rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        report.check(
            sha.hexdigest() == blob.name,
            "oci.blob-digest",
            f"blob {blob.name[:16]}… {blob.stat().st_size} bytes",
        )
    for descriptor in index.get("manifests") or []:
        try:
            manifest = json.loads(_blob(path, descriptor, report))
            config = json.loads(_blob(path, manifest["config"], report))
        except (KeyError, OSError, ValueError) as exc:
            report.fail(
                "oci.layout", f"manifest {descriptor.get('digest')} or its config unreadable: {exc!r}"
            )
            continue
        check_config(config, report, docker=False)
        scan, digests = LayerScan(), []
        for layer in manifest.get("layers") or []:
            _blob(path, layer, report, read=False)
            with _blob_path(path, layer).open("rb") as raw:
                digests.append(_scan_layer(raw, scan, report, layer.get("digest", "?")))
        _check_diff_ids(config, digests, report)
        scan.report_to(report)


def _blob_path(root: Path, descriptor: dict[str, Any]) -> Path:
    algorithm, _, hexdigest = str(descriptor["digest"]).partition(":")
    return root / "blobs" / algorithm / hexdigest


def _blob(root: Path, descriptor: dict[str, Any], report: Report, *, read: bool = True) -> bytes:
    blob = _blob_path(root, descriptor)
    size = blob.stat().st_size
    if size != descriptor.get("size"):
        report.fail(
            "oci.blob-digest", f"{descriptor['digest']}: descriptor size {descriptor.get('size')} != {size}"
        )
    return blob.read_bytes() if read else b""
