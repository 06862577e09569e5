"""The CPU backend's Windows path, simulated on Linux (``sys.platform`` set to win32, kernel32 replaced by
stand-ins, DLL names in a temporary folder): importing the module opens no C library, the variants are
``ggml-cpu-<v>.dll``, what Windows grants comes from ``IsProcessorFeaturePresent``, the probe is opened with
``winmode=0``, and file modes are not judged. The real DLLs never run here: see tests/local_models."""

from __future__ import annotations

import ctypes
import importlib.util
import stat
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance import errors
from local_models import cpu_backend
from local_models.cpu_backend import select_variants, windows_flags

SHIPPED_WINDOWS = ("haswell", "skylakex", "icelake", "alderlake", "zen4")  # build/windows: no AMX build
PF_AVX2, PF_AVX512F = 40, 41


def present(*features: int) -> Any:
    """A stand-in for ``kernel32.IsProcessorFeaturePresent`` on a CPU whose OS enabled ``features``."""
    return lambda feature: int(feature in features)


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")


def test_importing_the_module_opens_no_c_library(monkeypatch: pytest.MonkeyPatch) -> None:
    real_cdll = ctypes.CDLL

    def cdll(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name is None:
            raise TypeError("CDLL(None) is a TypeError on Windows")
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", "win32")
    spec = importlib.util.spec_from_file_location("cpu_backend_on_windows", cpu_backend.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)  # the module-level code, as `serve` imports it on Windows
    assert fresh.loaded_cpu_backend() is None
    assert fresh._amx_granted() is False  # no libc, no arch_prctl


def test_what_windows_grants_picks_the_variant() -> None:
    avx2 = windows_flags(present(PF_AVX2))
    avx512 = windows_flags(present(PF_AVX2, PF_AVX512F))
    assert not {flag for flag in avx512 if flag.startswith("amx")}
    # Alder Lake leads on an AVX2 machine by rank; its own CPUID score then decides (see below).
    assert select_variants(avx2, SHIPPED_WINDOWS, amx_granted=False).candidates == ("alderlake", "haswell")
    rejected = dict(select_variants(avx2, SHIPPED_WINDOWS, amx_granted=False).rejected)
    assert set(rejected) == {"skylakex", "icelake", "zen4"} and "avx512f" in rejected["skylakex"]
    best = select_variants(avx512, SHIPPED_WINDOWS, amx_granted=False).candidates
    assert best[0] == "zen4" and best[-1] == "haswell"
    # AVX-512 the OS has not enabled (ZMM state off) is not granted even if CPUID has it.
    assert "zen4" not in select_variants(avx2, SHIPPED_WINDOWS, amx_granted=False).candidates
    with pytest.raises(errors.Unavailable) as refused:
        select_variants(windows_flags(present()), SHIPPED_WINDOWS, amx_granted=False)
    assert refused.value.code == "cpu_unsupported" and "AVX2 (avx2)" in refused.value.message


def _lib(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in (
        *(f"ggml-cpu-{v}.dll" for v in SHIPPED_WINDOWS),
        "ggml.dll",
        "ggml-base.dll",
        "llama.dll",
        "libggml-cpu-sapphirerapids.so",
    ):
        (lib / name).write_bytes(b"")
    return lib


def test_the_variants_are_dlls_on_windows_and_shared_objects_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = _lib(tmp_path)
    assert set(cpu_backend._installed_variants(lib)) == {"sapphirerapids"}
    monkeypatch.setattr(sys, "platform", "win32")
    installed = cpu_backend._installed_variants(lib)
    assert set(installed) == set(SHIPPED_WINDOWS)
    assert installed["haswell"] == lib / "ggml-cpu-haswell.dll"


def test_on_windows_only_the_folder_is_checked_not_the_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = _lib(tmp_path)
    variant = lib / "ggml-cpu-haswell.dll"
    variant.chmod(0o666)  # what every file reports on Windows
    lib.chmod(0o777)
    try:
        with pytest.raises(errors.Unavailable, match="writable by every user"):
            cpu_backend._check_trusted(variant, lib)  # Linux: unchanged
        monkeypatch.setattr(sys, "platform", "win32")
        cpu_backend._check_trusted(variant, lib)
        elsewhere = tmp_path / "ggml-cpu-haswell.dll"
        elsewhere.write_bytes(b"")
        with pytest.raises(errors.Unavailable, match="not in"):
            cpu_backend._check_trusted(elsewhere, lib)
    finally:
        lib.chmod(stat.S_IRWXU)


class _FakeGgml:
    def __init__(self, lib_dir: Path) -> None:
        self.lib_dir = lib_dir
        self.loaded: list[bytes] = []

    def cpu_reg(self) -> int | None:
        return None

    def load(self, path: bytes) -> int:
        self.loaded.append(path)
        return 1

    def features(self, reg: int) -> tuple[str, ...]:
        return ("AVX2", "FMA")


def _choose_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, features: tuple[int, ...], cpuid_refuses: set[str]
) -> tuple[cpu_backend.CpuBackend, _FakeGgml, list[tuple[str, dict[str, Any]]]]:
    lib = _lib(tmp_path)
    opened: list[tuple[str, dict[str, Any]]] = []

    def cdll(name: str, **kwargs: Any) -> Any:
        opened.append((name, kwargs))
        variant = Path(name).name.removeprefix("ggml-cpu-").removesuffix(".dll")
        return {"ggml_backend_score": _Score(0 if variant in cpuid_refuses else 1)}

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(
        cpu_backend, "_kernel32", lambda: SimpleNamespace(IsProcessorFeaturePresent=present(*features))
    )
    monkeypatch.setattr(cpu_backend, "_windows_cpu_model", lambda: "Example CPU")
    monkeypatch.delenv(cpu_backend.OVERRIDE_ENV, raising=False)
    ggml = _FakeGgml(lib)
    return cpu_backend._choose_and_load(ggml), ggml, opened  # type: ignore[arg-type]


class _Score:
    def __init__(self, value: int) -> None:
        self.value = value
        self.restype: object = None
        self.argtypes: object = None

    def __call__(self) -> int:
        return self.value


def test_an_avx2_windows_machine_loads_haswell_after_alderlake_refuses_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, ggml, opened = _choose_on_windows(tmp_path, monkeypatch, (PF_AVX2,), cpuid_refuses={"alderlake"})
    assert backend.variant == "haswell" and backend.path.name == "ggml-cpu-haswell.dll"
    assert "alderlake: its own CPUID check refuses this CPU" in backend.reason
    assert backend.cpu == "Example CPU"
    assert [Path(name).name for name, _ in opened] == ["ggml-cpu-alderlake.dll", "ggml-cpu-haswell.dll"]
    assert all(kwargs == {"winmode": 0} for _, kwargs in opened)  # no RTLD_LOCAL on Windows
    assert ggml.loaded == [bytes(backend.path)]


def test_an_avx512_windows_machine_loads_zen4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _, opened = _choose_on_windows(tmp_path, monkeypatch, (PF_AVX2, PF_AVX512F), cpuid_refuses=set())
    assert backend.variant == "zen4" and len(opened) == 1


def test_ggml_on_windows_is_bound_from_the_loaded_dlls_in_llama_cpps_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stand-ins: the real libggml.so and libggml-base.so handles play ggml.dll and ggml-base.dll.
    lib_dir = Path(cpu_backend.llama_lib._base_path).resolve()
    handles = {
        "ggml.dll": ctypes.CDLL(str(lib_dir / "libggml.so"))._handle,
        "ggml-base.dll": ctypes.CDLL(str(lib_dir / "libggml-base.so"))._handle,
    }
    where = {handle: lib_dir / name for name, handle in handles.items()}
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(cpu_backend, "_kernel32", lambda: SimpleNamespace(GetModuleHandleW=handles.get))
    monkeypatch.setattr(cpu_backend, "_module_path", where.get)
    ggml = cpu_backend._Ggml()
    assert ggml.lib_dir == lib_dir
    assert ggml.registered().count("CPU") == 1  # the same registry llama.cpp uses
    reg = ggml.cpu_reg()
    assert reg and "AVX2" in ggml.features(reg)

    where[handles["ggml.dll"]] = Path.cwd() / "ggml.dll"  # a ggml.dll planted in the working directory
    with pytest.raises(errors.Unavailable, match=r"ggml\.dll was loaded from") as refused:
        cpu_backend._Ggml()
    assert refused.value.code == "cpu_backend_failed"
