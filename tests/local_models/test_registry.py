"""The local model registry: pinned files, hash checks, unsafe paths and the hash cache."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import errors
from appliance.policy.schema import LocalModelSpec
from local_models import registry
from local_models.registry import LocalModel, ModelRegistry, file_identity

CONTENT = b"GGUF" + bytes(range(256)) * 9000  # a little over 2 MiB: several 1 MiB reads
DIGEST = hashlib.sha256(CONTENT).hexdigest()
OTHER = hashlib.sha256(b"another file").hexdigest()

needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")


@dataclass(frozen=True)
class Spec:
    """A stand-in for LocalModelSpec that skips its name validation (the registry must not rely on it)."""

    file: str
    sha256: str
    n_ctx: int = 2048
    slots: int | None = None


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "home" / "models"
    d.mkdir(parents=True)
    (d / "demo.gguf").write_bytes(CONTENT)
    return d


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every file hashed (by descriptor) through the registry."""
    calls: list[int] = []
    real = registry.hash_file

    def counting(fd: int) -> str:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(registry, "hash_file", counting)
    return calls


def make(models_dir: Path, **specs: Spec | LocalModelSpec) -> ModelRegistry:
    return ModelRegistry(models_dir, {f"local/{name}": spec for name, spec in specs.items()})


def test_names_sorted_and_get_by_full_or_bare_name(models_dir: Path) -> None:
    reg = make(
        models_dir,
        zeta=LocalModelSpec(file="z.gguf", sha256=OTHER),
        demo=LocalModelSpec(file="demo.gguf", sha256=DIGEST, n_ctx=512),
    )
    assert reg.names() == ["local/demo", "local/zeta"]
    expected = LocalModel(name="demo", path=models_dir / "demo.gguf", sha256=DIGEST, n_ctx=512)
    assert reg.get("local/demo") == expected
    assert reg.get("demo") == expected
    assert expected.model == "local/demo"


@pytest.mark.parametrize("model", ["local/nope", "nope", "openai/demo", "", "local/"])
def test_unknown_model_is_not_found(models_dir: Path, model: str) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", DIGEST))
    with pytest.raises(errors.NotFound) as info:
        reg.get(model)
    assert info.value.code == "model_not_found"
    assert info.value.status == 404
    with pytest.raises(errors.NotFound):
        reg.verify(model)


def test_good_file_verifies_to_its_real_path(models_dir: Path) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", DIGEST, 1024))
    model = reg.verify("local/demo")
    assert model.path == (models_dir / "demo.gguf").resolve()
    assert (model.name, model.sha256, model.n_ctx, model.model) == ("demo", DIGEST, 1024, "local/demo")


def test_verified_entry_carries_the_identity_of_the_file_hashed(models_dir: Path, hashes: list[int]) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", DIGEST))
    path = models_dir / "demo.gguf"
    assert reg.get("demo").identity == ()
    hashed = reg.verify("demo")
    assert hashed.identity == file_identity(os.stat(path))
    assert reg.verify("demo").identity == hashed.identity and len(hashes) == 1  # from the cache: the same
    # Rewritten with the same bytes: the pin still matches, but a loader holding the old identity sees
    # that the file is not the one that was checked.
    os.utime(path, ns=(1, 1))
    assert file_identity(os.stat(path)) != hashed.identity
    assert reg.verify("demo").identity == file_identity(os.stat(path))


def test_hash_mismatch_is_refused_with_both_hashes(models_dir: Path) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", OTHER))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    err = info.value
    assert err.code == "model_hash_mismatch"
    assert err.status == 503
    assert err.message == (
        f"model local/demo: demo.gguf has sha256 {DIGEST[:16]}…, the policy pins {OTHER[:16]}…: "
        "refusing to load it (copy the right file, or import a policy that pins this one)"
    )


def test_missing_file_names_the_file_and_the_folder(models_dir: Path) -> None:
    reg = make(models_dir, gone=Spec("gone.gguf", DIGEST))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("local/gone")
    assert info.value.code == "model_file_missing"
    assert "gone.gguf" in info.value.message
    assert str(models_dir) in info.value.message


def test_missing_models_folder_is_a_missing_file(tmp_path: Path) -> None:
    reg = make(tmp_path / "no-such-dir", demo=Spec("demo.gguf", DIGEST))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    assert info.value.code == "model_file_missing"


@needs_symlinks
def test_symlink_escaping_the_models_folder_is_refused(models_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(CONTENT)  # even the right bytes: the file itself is outside the pinned folder
    (models_dir / "escape.gguf").symlink_to(outside)
    reg = make(models_dir, escape=Spec("escape.gguf", DIGEST))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("escape")
    assert info.value.code == "model_file_unsafe"
    assert "outside the models folder" in info.value.message


@needs_symlinks
def test_symlink_within_the_models_folder_is_followed(models_dir: Path) -> None:
    (models_dir / "alias.gguf").symlink_to("demo.gguf")
    reg = make(models_dir, alias=Spec("alias.gguf", DIGEST))
    assert reg.verify("alias").path == (models_dir / "demo.gguf").resolve()


@needs_symlinks
def test_models_folder_itself_may_be_a_symlink(models_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "models-link"
    link.symlink_to(models_dir, target_is_directory=True)
    reg = make(link, demo=Spec("demo.gguf", DIGEST))
    assert reg.verify("demo").path == (models_dir / "demo.gguf").resolve()


@pytest.mark.parametrize(
    "file", ["../demo.gguf", "../models/demo.gguf", "sub/demo.gguf", "/etc/passwd", "..", ".", "", "a\\b"]
)
def test_path_traversal_names_are_refused(models_dir: Path, file: str) -> None:
    (models_dir / "sub").mkdir()
    (models_dir / "sub" / "demo.gguf").write_bytes(CONTENT)
    reg = make(models_dir, demo=Spec(file, DIGEST))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    assert info.value.code == "model_file_unsafe"


def test_a_folder_is_not_a_model_file(models_dir: Path) -> None:
    (models_dir / "dir.gguf").mkdir()
    reg = make(models_dir, demo=Spec("dir.gguf", DIGEST))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    assert info.value.code == "model_file_unsafe"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(models_dir: Path) -> None:
    os.mkfifo(models_dir / "pipe.gguf")
    reg = make(models_dir, demo=Spec("pipe.gguf", DIGEST))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    assert info.value.code == "model_file_unsafe"


def test_unchanged_file_is_hashed_once(models_dir: Path, hashes: list[int]) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", DIGEST))
    first = reg.verify("demo")
    assert reg.verify("demo") == first
    # A registry built for the next policy shares the process-wide cache.
    assert make(models_dir, again=Spec("demo.gguf", DIGEST)).verify("again").path == first.path
    assert len(hashes) == 1


def test_a_mismatch_is_not_rehashed_either(models_dir: Path, hashes: list[int]) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", OTHER))
    for _ in range(3):
        with pytest.raises(errors.Unavailable):
            reg.verify("demo")
    assert len(hashes) == 1
    # A new policy that pins the file's real hash accepts it from the cache.
    make(models_dir, demo=Spec("demo.gguf", DIGEST)).verify("demo")
    assert len(hashes) == 1


def test_changed_file_is_rehashed_and_refused(models_dir: Path, hashes: list[int]) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", DIGEST))
    reg.verify("demo")
    path = models_dir / "demo.gguf"
    before = path.stat()
    with path.open("r+b") as f:  # same size, same inode, different bytes
        f.seek(100)
        f.write(b"X")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    assert info.value.code == "model_hash_mismatch"
    assert len(hashes) == 2


def test_replaced_file_is_rehashed(models_dir: Path, hashes: list[int]) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", DIGEST))
    reg.verify("demo")
    path = models_dir / "demo.gguf"
    stat = path.stat()
    fresh = models_dir / "fresh.tmp"
    fresh.write_bytes(CONTENT)  # the same bytes under a new inode: still verifies, after a re-hash
    os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(fresh, path)
    assert reg.verify("demo").sha256 == DIGEST
    assert len(hashes) == 2


def test_hash_file_reads_in_one_mib_pieces(models_dir: Path) -> None:
    fd = os.open(models_dir / "demo.gguf", os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        assert registry.hash_file(fd) == DIGEST
    finally:
        os.close(fd)
    assert registry.READ_SIZE == 1 << 20
    assert len(CONTENT) > 2 * registry.READ_SIZE


def test_verify_all_and_listing(models_dir: Path, tmp_path: Path) -> None:
    (models_dir / "wrong.gguf").write_bytes(b"not the pinned bytes")
    reg = make(
        models_dir,
        demo=Spec("demo.gguf", DIGEST, 4096),
        wrong=Spec("wrong.gguf", OTHER),
        gone=Spec("gone.gguf", OTHER),
        bad=Spec("../demo.gguf", DIGEST),
    )
    results = dict(reg.verify_all())
    assert list(results) == ["local/bad", "local/demo", "local/gone", "local/wrong"]
    assert results["local/demo"] == "ok"
    assert "has sha256" in results["local/wrong"]
    assert "is not in the models folder" in results["local/gone"]
    assert "bare file name" in results["local/bad"]

    rows = {row["name"]: row for row in reg.listing()}
    assert rows["local/demo"] == {
        "name": "local/demo",
        "file": "demo.gguf",
        "size_bytes": len(CONTENT),
        "sha256": DIGEST[:16] + "…",
        "n_ctx": 4096,
        "slots": 4,
        "present": True,
    }
    assert rows["local/wrong"]["present"] is True
    assert rows["local/wrong"]["size_bytes"] == len(b"not the pinned bytes")
    assert rows["local/gone"]["present"] is False
    assert rows["local/gone"]["size_bytes"] is None
    assert rows["local/bad"]["present"] is False


def test_listing_never_hashes(models_dir: Path, hashes: list[int]) -> None:
    make(models_dir, demo=Spec("demo.gguf", DIGEST)).listing()
    assert hashes == []


def test_policy_specs_are_accepted(models_dir: Path) -> None:
    spec = LocalModelSpec(file="demo.gguf", sha256=DIGEST, n_ctx=256)
    reg = ModelRegistry(models_dir, {"local/demo": spec})
    assert reg.verify("local/demo").n_ctx == 256


def test_errors_render_as_openai_bodies(models_dir: Path) -> None:
    reg = make(models_dir, demo=Spec("demo.gguf", OTHER))
    with pytest.raises(errors.Unavailable) as info:
        reg.verify("demo")
    body = info.value.to_dict()["error"]
    assert isinstance(body, dict)
    assert body["type"] == "service_unavailable"
    assert body["code"] == "model_hash_mismatch"
