"""llama.cpp's CPU backend: which build of the CPU code runs, chosen from what the CPU *and the kernel* grant.

Owns: ``ensure_cpu_backend`` — before any model is loaded, loading exactly one of the CPU backend variants
that image/build-llama ships beside ``libggml.so`` (``libggml-cpu-<variant>.so``, each compiled for one
x86-64 feature level), by absolute path, through ``ggml_backend_load``; the choice itself
(``select_variants``: pure, flags in, ranked candidates out, every refusal with its reason); and what
``/health`` shows of it (``CpuBackend.describe``).

Why not llama.cpp's own choice: with ``GGML_BACKEND_DL`` no CPU backend is linked in, and
``llama_backend_init`` (which ``Llama()`` calls) then runs ``ggml_backend_load_all``, which

- searches the *current directory* and the *python executable's directory* for ``libggml-*.so`` files
  (BLAS, CUDA, … and CPU) and loads what it finds there: a planted library would run inside the gateway;
- scores the CPU variants from CPUID alone ("FIXME: this does not check for OS support"): a VM whose CPU
  advertises AMX (or AVX-512) without the hypervisor granting its register state gets the AMX build, and
  the first Q8_0 matrix product dies with SIGILL.

Linux clears a feature's ``/proc/cpuinfo`` flag when its XSAVE state is not enabled (``amx_tile`` and
``amx_int8`` without XTILEDATA, ``avx512f`` and its kin without the ZMM state, ``avx`` without YMM), so the
flags there are what the kernel grants; AMX additionally needs this process's permission
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, which kernels before 5.16 refuse). The chosen
variant's own ``ggml_backend_score`` must agree too; only granted variants are ever opened.

On Windows the variants are ``ggml-cpu-<variant>.dll`` beside ``ggml.dll`` in the directory llama_cpp
loads ``llama.dll`` from (``llama_cpp/lib``, or ``LLAMA_CPP_LIB_PATH``), and there the explicit load is
required, not only safer: ggml's own search there looks only beside python.exe and in the current directory.
What Windows grants comes from ``IsProcessorFeaturePresent`` (AVX2 and AVX-512F as the OS has enabled their
register state); the features without state of their own (FMA, F16C, BMI2, VNNI, BF16, …) are left to each
variant's own CPUID check (``ggml_backend_score``), and AMX is never granted (no AMX variant ships there).
File modes mean nothing on Windows (every file reports 0o666): the ACL of the install folder under
Program Files is what keeps the variants from being replaced, and only the folder check applies.

Once a CPU backend is registered, ``llama_backend_init`` no longer searches (it does only when none is):
so ``ensure_cpu_backend`` must run before the first ``Llama`` (or ``llama_backend_init``,
``llama_supports_gpu_offload``, ``llama_supports_rpc``) in the process.

Must never: load a variant that needs a feature the kernel does not grant (``PHI_CPU_VARIANT`` cannot
force one either), load a library from anywhere but the directory of the ``libggml.so`` llama_cpp itself
uses, let a CPU below the floor reach a SIGILL instead of ``errors.Unavailable`` (``cpu_unsupported``),
or touch a build whose CPU backend is linked in (a developer's own ``-march=native`` wheel: "builtin").
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama_lib

from appliance import errors
from local_models.llama_log import quiet_llama_logs

__all__ = [
    "CPUINFO_FLAGS",
    "OVERRIDE_ENV",
    "VARIANT_FEATURES",
    "CpuBackend",
    "Selection",
    "cpuinfo_flags",
    "ensure_cpu_backend",
    "select_variants",
    "variant_rank",
    "windows_flags",
]

log = logging.getLogger("phi.local_models")

OVERRIDE_ENV = "PHI_CPU_VARIANT"
"""An operator's choice of variant (e.g. ``haswell`` to rule AVX-512 out); still refused if not granted."""

# llama.cpp's x86 variants and the features each is compiled for (ggml/src/CMakeLists.txt,
# GGML_CPU_ALL_VARIANTS); image/build-llama ships those from haswell up.
VARIANT_FEATURES: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "cannonlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"),
    "cascadelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"),
    "icelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": (
        "SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
    ),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
    "sapphirerapids": (
        "SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
        "AMX_TILE", "AMX_INT8",
    ),
}  # fmt: skip

# Each llama.cpp feature as the kernel's /proc/cpuinfo flags (arch/x86/include/asm/cpufeatures.h); AVX512
# is the five extensions the variants are compiled with (-mavx512f, -mavx512cd, -mavx512vl, -mavx512dq and
# -mavx512bw).
CPUINFO_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
}

# ggml_backend_cpu_x86_score (ggml-cpu/arch/x86/cpu-feats.cpp): 1 plus one bit per feature compiled in.
_SCORE_BITS = {
    "FMA": 1 << 0,
    "F16C": 1 << 1,
    "SSE42": 1 << 2,
    "BMI2": 1 << 3,
    "AVX": 1 << 4,
    "AVX2": 1 << 5,
    "AVX_VNNI": 1 << 6,
    "AVX512": 1 << 7,
    "AVX512_VBMI": 1 << 8,
    "AVX512_BF16": 1 << 9,
    "AVX512_VNNI": 1 << 10,
    "AMX_INT8": 1 << 11,
}

_AMX_FEATURES = frozenset({"AMX_TILE", "AMX_INT8"})
_SUPPORTED = "x86-64 with AVX2, FMA, F16C and BMI2 (Intel Haswell, AMD Excavator and Zen, and newer)"
_VARIANT_FILE = re.compile(r"libggml-cpu-([A-Za-z0-9_.]+)\.so")
_VARIANT_FILE_WINDOWS = re.compile(r"ggml-cpu-([A-Za-z0-9_.]+)\.dll", re.IGNORECASE)

# What Windows grants (IsProcessorFeaturePresent, winnt.h PF_*), as the /proc/cpuinfo flags the variants are
# judged by. Both report the OS-enabled state (the XSAVE YMM, resp. ZMM and opmask, state), which is what
# CPUID alone gets wrong; the VEX and EVEX extensions that need no state of their own ride on them.
_PF_AVX2_INSTRUCTIONS_AVAILABLE = 40
_PF_AVX512F_INSTRUCTIONS_AVAILABLE = 41
_WINDOWS_STATELESS = ("sse4_2", "bmi2")
"""No register state of their own: left to each variant's CPUID check (``ggml_backend_score``)."""
_WINDOWS_GRANTS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (_PF_AVX2_INSTRUCTIONS_AVAILABLE, ("avx", "avx2", "f16c", "fma", "avx_vnni")),
    (
        _PF_AVX512F_INSTRUCTIONS_AVAILABLE,
        (*CPUINFO_FLAGS["AVX512"], "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    ),
)


def _variant_file() -> re.Pattern[str]:
    """The file name of a variant on this OS; its group is the variant."""
    return _VARIANT_FILE_WINDOWS if sys.platform == "win32" else _VARIANT_FILE


def variant_rank(variant: str) -> int:
    """llama.cpp's score for the variant on a CPU that has all its features: higher is preferred."""
    return 1 + sum(_SCORE_BITS.get(feature, 0) for feature in VARIANT_FEATURES[variant])


@dataclass(frozen=True)
class Selection:
    """The variants this machine may run, best first, and why each other one shipped may not."""

    candidates: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]
    """(variant, reason) for each shipped variant that is not a candidate."""
    reason: str
    """Why the first candidate leads, for the log line and ``/health``."""


def _missing(variant: str, flags: frozenset[str], amx_granted: bool) -> list[str]:
    """What the kernel does not grant of the variant's features, each as 'FEATURE (flags)'."""
    missing = []
    for feature in VARIANT_FEATURES[variant]:
        absent = [flag for flag in CPUINFO_FLAGS[feature] if flag not in flags]
        if absent:
            missing.append(f"{feature} ({', '.join(absent)})")
    if not missing and _AMX_FEATURES & set(VARIANT_FEATURES[variant]) and not amx_granted:
        missing.append("AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM refused)")
    return missing


def select_variants(
    flags: Iterable[str], available: Iterable[str], *, amx_granted: bool, override: str | None = None
) -> Selection:
    """Rank the shipped variants (``available``) this machine grants: ``flags`` are /proc/cpuinfo's,
    ``amx_granted`` whether the kernel let this process use AMX tile data. ``override`` (PHI_CPU_VARIANT)
    narrows the choice to one variant. Raises ``errors.Unavailable``: ``cpu_unsupported`` when no shipped
    variant is granted, ``cpu_variant_refused`` when the override names one that is not shipped or not
    granted. Unknown file names in ``available`` are rejected, never chosen."""
    flag_set = frozenset(flags)
    shipped = sorted(set(available))
    rejected: list[tuple[str, str]] = []
    granted: list[str] = []
    lacks: dict[str, str] = {}
    for variant in shipped:
        if variant not in VARIANT_FEATURES:
            rejected.append((variant, "not a variant this gateway knows the features of"))
            continue
        missing = _missing(variant, flag_set, amx_granted)
        if missing:
            lacks[variant] = "; ".join(missing)
            rejected.append((variant, f"the kernel does not grant {lacks[variant]}"))
        else:
            granted.append(variant)
    granted.sort(key=variant_rank, reverse=True)
    known = [v for v in shipped if v in VARIANT_FEATURES]

    if override is not None:
        if override not in known:
            raise errors.Unavailable(
                f"{OVERRIDE_ENV}={override}: no such CPU backend variant is installed "
                f"(installed: {', '.join(known) or 'none'})",
                code="cpu_variant_refused",
            )
        if override not in granted:
            reason = dict(rejected)[override]
            raise errors.Unavailable(
                f"{OVERRIDE_ENV}={override} is refused: {reason}", code="cpu_variant_refused"
            )
        others = tuple((v, f"not chosen: {OVERRIDE_ENV}={override}") for v in granted if v != override)
        return Selection((override,), tuple(rejected) + others, f"{OVERRIDE_ENV}={override}")

    if not granted:
        if not known:
            raise errors.Unavailable(
                "no CPU backend variant of llama.cpp is installed (rebuild the environment: ./dev)",
                code="cpu_unsupported",
            )
        floor = min(known, key=variant_rank)
        raise errors.Unavailable(
            f"this CPU cannot run the local models: the least demanding CPU backend installed, {floor}, "
            f"needs {lacks[floor]}, which the kernel does not grant (/proc/cpuinfo flags); "
            f"supported: {_SUPPORTED}",
            code="cpu_unsupported",
        )
    best = variant_rank(granted[0])
    better = sorted((v for v, _ in rejected if v in known and variant_rank(v) > best), key=variant_rank)
    reason = f"the best of {len(known)} installed variants that the kernel grants"
    if better:
        reason += f" (not granted: {', '.join(reversed(better))})"
    return Selection(tuple(granted), tuple(rejected), reason)


def cpuinfo_flags(text: str) -> frozenset[str]:
    """The flags every processor in /proc/cpuinfo's text has (a feature one core lacks is not granted)."""
    per_cpu = [
        frozenset(line.split(":", 1)[1].split())
        for line in text.splitlines()
        if line.startswith("flags") and ":" in line
    ]
    return frozenset.intersection(*per_cpu) if per_cpu else frozenset()


def windows_flags(is_processor_feature_present: Callable[[int], int]) -> frozenset[str]:
    """What Windows grants, as /proc/cpuinfo flags, from ``kernel32.IsProcessorFeaturePresent`` (passed
    in): never an AMX flag."""
    flags = set(_WINDOWS_STATELESS)
    for feature, granted in _WINDOWS_GRANTS:
        if is_processor_feature_present(feature):
            flags.update(granted)
    return frozenset(flags)


def _cpu_model(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return None


@dataclass(frozen=True)
class CpuBackend:
    """The CPU backend llama.cpp runs in this process."""

    variant: str
    """``haswell``, ``skylakex``, …, or ``builtin`` (a build with its CPU backend linked in)."""
    path: Path
    """The library that implements it."""
    features: tuple[str, ...]
    """As llama.cpp reports them (``ggml_backend_get_features``): ``AVX2``, ``AVX512``, ``AMX_INT8``, …"""
    reason: str
    cpu: str | None = None
    """The CPU's model name (/proc/cpuinfo)."""

    def describe(self) -> dict[str, object]:
        """For ``/health``: no full path (the file name says which library)."""
        return {
            "variant": self.variant,
            "library": self.path.name,
            "features": list(self.features),
            "reason": self.reason,
            "cpu": self.cpu,
        }


# ---- the loaded libraries -------------------------------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_GetFeatures = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)


@functools.cache
def _libc() -> Any:
    """This process's C library, bound on first use: ``CDLL(None)`` is POSIX only (a TypeError on
    Windows), so nothing of it may run when the module is imported."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    libc.dladdr.restype = ctypes.c_int
    return libc


_GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT = 0x2
_GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS = 0x4


@functools.cache
def _kernel32() -> Any:
    """kernel32, as a handle of our own (the argtypes set on it touch no one else's function objects),
    bound once like ``_libc``."""
    if sys.platform != "win32":
        raise OSError("kernel32 exists on Windows only")
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.IsProcessorFeaturePresent.argtypes = [ctypes.c_uint32]
    kernel32.IsProcessorFeaturePresent.restype = ctypes.c_int
    kernel32.GetModuleHandleExW.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    kernel32.GetModuleHandleExW.restype = ctypes.c_int
    kernel32.GetModuleFileNameW.argtypes = [ctypes.c_void_p, ctypes.c_wchar_p, ctypes.c_uint32]
    kernel32.GetModuleFileNameW.restype = ctypes.c_uint32
    kernel32.GetModuleHandleW.argtypes = [ctypes.c_wchar_p]
    kernel32.GetModuleHandleW.restype = ctypes.c_void_p
    return kernel32


def _library_of(address: int | None) -> Path | None:
    """The file of the loaded library that holds this address."""
    if not address:
        return None
    if sys.platform == "win32":
        return _module_of(address)
    info = _DlInfo()
    if not _libc().dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return Path(os.fsdecode(info.dli_fname)).resolve()


def _module_of(address: int) -> Path | None:
    """Windows' ``dladdr``: the DLL that holds the address (its reference count left as it is)."""
    module = ctypes.c_void_p()
    flags = _GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | _GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT
    if not _kernel32().GetModuleHandleExW(flags, ctypes.c_void_p(address), ctypes.byref(module)):
        return None
    return _module_path(module.value)


def _module_path(module: int | None) -> Path | None:
    """The file of a loaded DLL (``GetModuleFileNameW``)."""
    if not module:
        return None
    name = ctypes.create_unicode_buffer(32768)  # the longest path Windows has
    length = _kernel32().GetModuleFileNameW(module, name, len(name))
    if not 0 < length < len(name):
        return None
    return Path(name.value).resolve()


def _loaded_dll(name: str, lib_dir: Path) -> Any:
    """The DLL of that name already in the process (the one llama.dll was bound to when it was loaded),
    refused unless it is llama_cpp's own: Windows looks for llama.dll's imports beside python.exe and in
    the current directory before the PATH entry llama_cpp adds."""
    module = _kernel32().GetModuleHandleW(name)
    path = _module_path(module)
    if path is None or path.parent != lib_dir:
        raise errors.Unavailable(
            f"llama.cpp's {name} was loaded from {path or 'nowhere known'}, not from {lib_dir}",
            code="cpu_backend_failed",
        )
    return ctypes.CDLL(str(path), handle=module)  # the loaded module itself: nothing is loaded again


def _llama_lib_dir() -> Path:
    """The directory llama_cpp loaded ``llama.dll`` from (``llama_cpp/lib`` or ``LLAMA_CPP_LIB_PATH``):
    ``ggml.dll`` and the variants sit beside it."""
    return Path(llama_lib._base_path).resolve()


class _Ggml:
    """The backend registry of the libggml that llama_cpp's libllama is linked to (symbols looked up
    through libllama's own handle: the very instance ``Llama`` will use, whatever LD_LIBRARY_PATH says).
    On Windows a DLL exports only its own symbols: there they come from the ggml.dll and ggml-base.dll
    loaded for llama.dll, both checked to be in llama_cpp's library directory."""

    def __init__(self) -> None:
        if sys.platform == "win32":
            lib_dir = _llama_lib_dir()
            ggml, base = _loaded_dll("ggml.dll", lib_dir), _loaded_dll("ggml-base.dll", lib_dir)
        else:
            ggml = base = llama_lib._lib  # llama-cpp-python's handle of libllama (pinned: see pyproject)

        def bind(lib: Any, name: str, restype: object, *argtypes: object) -> Any:
            func = lib[name]  # [] makes a new function object: llama_cpp's own are left untouched
            func.restype = restype
            func.argtypes = list(argtypes)
            return func

        self.reg_count = bind(ggml, "ggml_backend_reg_count", ctypes.c_size_t)
        self.reg_get = bind(ggml, "ggml_backend_reg_get", ctypes.c_void_p, ctypes.c_size_t)
        self.reg_name = bind(base, "ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
        self.reg_by_name = bind(ggml, "ggml_backend_reg_by_name", ctypes.c_void_p, ctypes.c_char_p)
        self.proc_address = bind(
            base, "ggml_backend_reg_get_proc_address", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p
        )
        self.load = bind(ggml, "ggml_backend_load", ctypes.c_void_p, ctypes.c_char_p)
        if sys.platform == "win32":
            self.lib_dir = lib_dir
            return
        libggml = _library_of(ctypes.cast(self.load, ctypes.c_void_p).value)
        if libggml is None:
            raise errors.Unavailable("cannot locate llama.cpp's libggml", code="cpu_backend_failed")
        self.lib_dir = libggml.parent

    def registered(self) -> list[str]:
        return [(self.reg_name(self.reg_get(i)) or b"?").decode() for i in range(self.reg_count())]

    def cpu_reg(self) -> int | None:
        reg: int | None = self.reg_by_name(b"CPU")
        return reg

    def features(self, reg: int) -> tuple[str, ...]:
        address = self.proc_address(reg, b"ggml_backend_get_features")
        if not address:
            return ()
        array = _GetFeatures(address)(reg)
        names = []
        i = 0
        while array[i].name is not None:
            names.append(array[i].name.decode())
            i += 1
        return tuple(names)


# ---- the choice, once per process ----------------------------------------------------------------------

_lock = threading.Lock()
_chosen: CpuBackend | None = None

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def _amx_granted() -> bool:
    """Ask the kernel for AMX tile data in this process (what ggml's AMX code does before its first tile
    instruction); refused on kernels and VMs that do not enable XTILEDATA. Harmless when granted. Never on
    Windows (no AMX variant ships there)."""
    if sys.platform == "win32":
        return False
    result = _libc().syscall(
        ctypes.c_long(_SYS_ARCH_PRCTL),
        ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
        ctypes.c_long(_XFEATURE_XTILEDATA),
    )
    if result != 0:
        log.info(
            "AMX tile data not permitted: arch_prctl: %s", os.strerror(ctypes.get_errno() or errno.EINVAL)
        )
    return bool(result == 0)


def _check_trusted(path: Path, lib_dir: Path) -> None:
    """A variant is loaded only from llama.cpp's own directory (a link out of it is refused), and only if
    not every user could have replaced it. On Windows every file's mode says 0o666 whoever may write it:
    there the install folder's ACL (Program Files) is the protection, and only the folder is checked."""
    if path.parent != lib_dir:
        raise errors.Unavailable(
            f"refusing the CPU backend {path}: it is not in {lib_dir}", code="cpu_backend_failed"
        )
    if sys.platform == "win32":
        return
    for where in (path, path.parent):
        mode = where.stat().st_mode
        if mode & stat.S_IWOTH and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
            raise errors.Unavailable(
                f"refusing the CPU backend {path.name}: {where} is writable by every user",
                code="cpu_backend_failed",
            )


def _installed_variants(lib_dir: Path) -> dict[str, Path]:
    variants = {}
    pattern = _variant_file()
    for entry in sorted(lib_dir.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            variants[match.group(1)] = entry
    return variants


def _open_variant(path: Path) -> Any:
    """The variant's library, for its own ``ggml_backend_score`` (no ``RTLD_LOCAL`` on Windows: there
    ``winmode=0`` is llama_cpp's own way of loading, and ggml-base.dll is found already loaded)."""
    if sys.platform == "win32":
        return ctypes.CDLL(str(path), winmode=0)
    return ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)


@dataclass(frozen=True)
class _Machine:
    """What the OS grants this process (as /proc/cpuinfo flags) and the CPU's name."""

    flags: frozenset[str]
    cpu: str | None


def _this_machine() -> _Machine:
    if sys.platform == "win32":
        return _Machine(windows_flags(_kernel32().IsProcessorFeaturePresent), _windows_cpu_model())
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    return _Machine(cpuinfo_flags(text), _cpu_model(text))


def _windows_cpu_model() -> str | None:
    if sys.platform != "win32":
        return None
    import winreg  # Windows only

    try:
        with winreg.OpenKey(
            winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
        ) as key:
            name, _ = winreg.QueryValueEx(key, "ProcessorNameString")
    except OSError:
        return None
    return str(name).strip() or None


def _already_registered(ggml: _Ggml, lib_dir: Path, machine: _Machine) -> CpuBackend | None:
    """The CPU backend registered before our first call: linked in (builtin), or a variant something else
    loaded — accepted only if it is one of ours and granted, since it runs from now on whatever we say."""
    reg = ggml.cpu_reg()
    if not reg:
        return None
    path = _library_of(reg)
    if path is None or path.parent != lib_dir:
        raise errors.Unavailable(
            f"a CPU backend was loaded from {path or 'an unknown library'}, outside {lib_dir}: not ours; "
            "ensure_cpu_backend() must run before llama.cpp is first used",
            code="cpu_backend_failed",
        )
    features = ggml.features(reg)
    match = _variant_file().fullmatch(path.name)
    if match is None:
        return CpuBackend("builtin", path, features, "linked into llama.cpp's libraries", machine.cpu)
    variant = match.group(1)
    known = variant in VARIANT_FEATURES
    amx = known and bool(_AMX_FEATURES & set(VARIANT_FEATURES[variant])) and _amx_granted()
    missing = _missing(variant, machine.flags, amx) if known else []
    if not known or missing:
        raise errors.Unavailable(
            f"llama.cpp loaded the CPU backend {variant} on its own, which this machine does not grant "
            f"({'; '.join(missing) or 'unknown variant'}); ensure_cpu_backend() must run first",
            code="cpu_backend_failed",
        )
    return CpuBackend(variant, path, features, "loaded before ensure_cpu_backend; granted", machine.cpu)


def _choose_and_load(ggml: _Ggml) -> CpuBackend:
    lib_dir = ggml.lib_dir
    machine = _this_machine()
    found = _already_registered(ggml, lib_dir, machine)
    if found is not None:
        return found
    installed = _installed_variants(lib_dir)
    if not installed:
        files = "ggml-cpu-*.dll" if sys.platform == "win32" else "libggml-cpu-*.so"
        raise errors.Unavailable(
            f"llama.cpp has no CPU backend: none is linked in and {lib_dir} holds no {files} "
            "(rebuild the environment: ./dev)",
            code="cpu_unsupported",
        )
    if platform.machine() not in ("x86_64", "AMD64"):
        raise errors.Unavailable(
            f"CPU backend variants are built for x86-64 only, not {platform.machine()}",
            code="cpu_unsupported",
        )
    flags = machine.flags
    wants_amx = any(_AMX_FEATURES <= set(VARIANT_FEATURES.get(v, ())) for v in installed)
    amx = wants_amx and {"amx_tile", "amx_int8"} <= flags and _amx_granted()
    override = os.environ.get(OVERRIDE_ENV) or None
    selection = select_variants(flags, installed, amx_granted=amx, override=override)
    refusals = []
    for variant in selection.candidates:
        path = installed[variant].resolve()
        _check_trusted(path, lib_dir)
        # Its own CPUID check, opened only now that the kernel is known to grant what it was built for.
        try:
            score = _open_variant(path)["ggml_backend_score"]
        except (OSError, AttributeError) as exc:
            refusals.append(f"{variant}: cannot be opened ({exc})")
            continue
        score.restype, score.argtypes = ctypes.c_int, []
        if score() <= 0:
            refusals.append(f"{variant}: its own CPUID check refuses this CPU")
            continue
        reg = ggml.load(os.fsencode(path))
        if not reg:
            refusals.append(f"{variant}: ggml_backend_load failed")
            continue
        reason = selection.reason if not refusals else f"{selection.reason}; {'; '.join(refusals)}"
        return CpuBackend(variant, path, ggml.features(reg), reason, machine.cpu)
    raise errors.Unavailable(
        f"no CPU backend could be loaded: {'; '.join(refusals)}; supported: {_SUPPORTED}",
        code="cpu_unsupported",
    )


def loaded_cpu_backend() -> CpuBackend | None:
    """The backend ``ensure_cpu_backend`` chose, or None before the first model load (never loads one)."""
    return _chosen


def ensure_cpu_backend() -> CpuBackend:
    """Load llama.cpp's CPU backend for this machine, once per process (later calls return the same
    answer at once); call it before any ``Llama``. Raises ``errors.Unavailable`` (``cpu_unsupported``,
    ``cpu_variant_refused``, ``cpu_backend_failed``) when no backend can safely run here."""
    global _chosen
    if _chosen is not None:
        return _chosen
    with _lock:
        if _chosen is None:
            quiet_llama_logs()  # llama.cpp's own lines go to Python logging at DEBUG, not to stderr
            backend = _choose_and_load(_Ggml())
            log.info(
                "llama.cpp CPU backend: %s (%s): %s; features %s",
                backend.variant,
                backend.path,
                backend.reason,
                " ".join(backend.features) or "none reported",
            )
            _chosen = backend
        return _chosen
