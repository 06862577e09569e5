"""llama.cpp's CPU backend: the choice of variant from what the kernel grants (pure, on made-up machines),
and on this machine: the variant loaded, what llama.cpp reports of it, and that nothing is loaded from the
current directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from appliance import errors
from local_models import cpu_backend
from local_models.cpu_backend import (
    CPUINFO_FLAGS,
    VARIANT_FEATURES,
    CpuBackend,
    cpuinfo_flags,
    ensure_cpu_backend,
    select_variants,
    variant_rank,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("haswell", "skylakex", "icelake", "alderlake", "zen4", "sapphirerapids")

# x86-64 baseline and what every variant's compiler may assume besides its own features.
BASE = set("fpu cx8 cmov mmx fxsr sse sse2 ssse3 sse4_1 sse4_2 popcnt xsave".split())
SANDY_BRIDGE = BASE | {"avx"}
HASWELL = SANDY_BRIDGE | {"avx2", "fma", "f16c", "bmi1", "bmi2"}
ZEN3 = HASWELL | {"vaes", "vpclmulqdq", "sha_ni"}  # no AVX-512 (this sandbox's kind of CPU)
ALDER_LAKE = HASWELL | {"avx_vnni"}
AVX512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
SKYLAKE_X = HASWELL | AVX512
ZEN4 = SKYLAKE_X | {"avx512vbmi", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}


def choose(flags: set[str], *, amx: bool = False, override: str | None = None) -> str:
    return select_variants(flags, SHIPPED, amx_granted=amx, override=override).candidates[0]


def rejected(flags: set[str], *, amx: bool = False) -> dict[str, str]:
    return dict(select_variants(flags, SHIPPED, amx_granted=amx).rejected)


# --- the choice (pure) ------------------------------------------------------------------------------


def test_sapphire_rapids_with_amx_granted_gets_the_amx_build() -> None:
    selection = select_variants(SAPPHIRE_RAPIDS, SHIPPED, amx_granted=True)
    assert selection.candidates == ("sapphirerapids", "zen4", "icelake", "skylakex", "alderlake", "haswell")
    assert selection.rejected == ()


def test_amx_advertised_but_not_granted_falls_back_to_avx512() -> None:
    # The broken VM: CPUID (and so /proc/cpuinfo on an old kernel) shows AMX, the kernel refuses the
    # tile data permission. llama.cpp's own score would pick sapphirerapids here.
    assert choose(SAPPHIRE_RAPIDS, amx=False) == "zen4"
    assert "ARCH_REQ_XCOMP_PERM" in rejected(SAPPHIRE_RAPIDS, amx=False)["sapphirerapids"]


def test_amx_flags_cleared_by_the_kernel_fall_back_to_avx512() -> None:
    # A kernel without XTILEDATA in XCR0 clears amx_tile (and amx_int8 with it) from /proc/cpuinfo.
    flags = SAPPHIRE_RAPIDS - {"amx_tile", "amx_int8", "amx_bf16"}
    assert choose(flags, amx=True) == "zen4"
    assert rejected(flags, amx=True)["sapphirerapids"] == (
        "the kernel does not grant AMX_TILE (amx_tile); AMX_INT8 (amx_int8)"
    )


def test_avx512_absent_or_partial_gives_an_avx2_build() -> None:
    assert choose(ZEN3) == "haswell"
    reasons = rejected(ZEN3)
    assert set(reasons) == {"skylakex", "icelake", "zen4", "sapphirerapids", "alderlake"}
    assert "AVX512 (avx512f, avx512cd, avx512vl, avx512dq, avx512bw)" in reasons["skylakex"]
    # The kernel clears avx512bw and its kin when ZMM state is off; one missing is enough.
    assert choose(SKYLAKE_X - {"avx512bw"}) == "haswell"
    assert "AVX512 (avx512bw)" in rejected(SKYLAKE_X - {"avx512bw"})["skylakex"]


def test_ranking_follows_llama_cpp_scores() -> None:
    # ggml_backend_cpu_x86_score on a CPU with every feature of the variant.
    assert {v: variant_rank(v) for v in SHIPPED} == {
        "haswell": 64,
        "alderlake": 128,
        "skylakex": 192,
        "icelake": 1472,
        "zen4": 1984,
        "sapphirerapids": 4032,
    }
    assert choose(ALDER_LAKE) == "alderlake"
    assert choose(SKYLAKE_X) == "skylakex"
    assert choose(ZEN4) == "zen4"
    assert choose(ZEN4 | {"avx_vnni"}) == "zen4"


def test_below_avx2_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(errors.Unavailable) as refused:
        select_variants(SANDY_BRIDGE, SHIPPED, amx_granted=False)
    assert refused.value.code == "cpu_unsupported" and refused.value.status == 503
    message = refused.value.message
    assert "haswell" in message
    for missing in ("F16C (f16c)", "FMA (fma)", "AVX2 (avx2)", "BMI2 (bmi2)"):
        assert missing in message
    assert "AVX (avx)" not in message and "Haswell" in message


def test_nothing_installed_is_refused() -> None:
    with pytest.raises(errors.Unavailable, match=r"\./dev") as refused:
        select_variants(ZEN4, [], amx_granted=False)
    assert refused.value.code == "cpu_unsupported"


def test_override_narrows_the_choice_but_never_past_the_kernel() -> None:
    selection = select_variants(SAPPHIRE_RAPIDS, SHIPPED, amx_granted=True, override="haswell")
    assert selection.candidates == ("haswell",) and "PHI_CPU_VARIANT=haswell" in selection.reason
    for override, flags, amx in (
        ("sapphirerapids", SAPPHIRE_RAPIDS, False),
        ("skylakex", ZEN3, False),
        ("cooperlake", ZEN4, False),  # granted, but not installed
        ("nonsense", ZEN4, False),
    ):
        with pytest.raises(errors.Unavailable) as refused:
            select_variants(flags, SHIPPED, amx_granted=amx, override=override)
        assert refused.value.code == "cpu_variant_refused"
        assert f"PHI_CPU_VARIANT={override}" in refused.value.message


def test_unknown_library_names_are_never_chosen() -> None:
    selection = select_variants(ZEN4, [*SHIPPED, "zzz-evil"], amx_granted=False)
    assert selection.candidates[0] == "zen4" and "zzz-evil" not in selection.candidates
    assert dict(selection.rejected)["zzz-evil"].startswith("not a variant")


def test_cpuinfo_flags_are_those_every_processor_has() -> None:
    text = textwrap.dedent(
        """\
        processor\t: 0
        model name\t: Example CPU
        flags\t\t: fpu sse2 avx2 avx512f
        bugs\t\t: spectre_v1

        processor\t: 1
        flags\t\t: fpu sse2 avx2
        """
    )
    assert cpuinfo_flags(text) == {"fpu", "sse2", "avx2"}
    assert cpuinfo_flags("") == frozenset()


def test_tables_cover_every_feature_and_the_variants_the_build_ships() -> None:
    for variant, features in VARIANT_FEATURES.items():
        assert set(features) <= set(CPUINFO_FLAGS), variant
    build = (REPO / "image" / "build-llama").read_text()
    match = re.search(r"^VARIANTS=\(([^)]*)\)", build, re.MULTILINE)
    assert match, "image/build-llama must list VARIANTS=(...)"
    assert tuple(match.group(1).split()) == SHIPPED


def test_describe_is_for_health() -> None:
    backend = CpuBackend("haswell", Path("/x/lib/libggml-cpu-haswell.so"), ("AVX2", "FMA"), "why", "Example")
    assert backend.describe() == {
        "variant": "haswell",
        "library": "libggml-cpu-haswell.so",
        "features": ["AVX2", "FMA"],
        "reason": "why",
        "cpu": "Example",
    }


def test_a_variant_outside_the_library_folder_or_writable_by_anyone_is_refused(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    good = lib / "libggml-cpu-haswell.so"
    good.write_bytes(b"")
    good.chmod(0o755)
    cpu_backend._check_trusted(good, lib)
    elsewhere = tmp_path / "libggml-cpu-haswell.so"
    elsewhere.write_bytes(b"")
    with pytest.raises(errors.Unavailable, match="not in") as outside:
        cpu_backend._check_trusted(elsewhere, lib)
    assert outside.value.code == "cpu_backend_failed"
    good.chmod(0o757)
    with pytest.raises(errors.Unavailable, match="writable by every user"):
        cpu_backend._check_trusted(good, lib)
    good.chmod(0o755)
    lib.chmod(0o777)
    with pytest.raises(errors.Unavailable, match="writable by every user"):
        cpu_backend._check_trusted(good, lib)
    lib.chmod(0o1777)  # sticky: others cannot replace our file
    cpu_backend._check_trusted(good, lib)


# --- this machine -----------------------------------------------------------------------------------


def _proc_flags() -> frozenset[str]:
    return cpuinfo_flags(Path("/proc/cpuinfo").read_text())


def test_the_loaded_variant_is_granted_by_the_kernel(backend: CpuBackend) -> None:
    flags = _proc_flags()
    assert backend.path is not None and backend.path.name == f"libggml-cpu-{backend.variant}.so"
    needed = {flag for feature in VARIANT_FEATURES[backend.variant] for flag in CPUINFO_FLAGS[feature]}
    assert needed <= flags
    # What llama.cpp says the loaded library was compiled for is what the kernel grants, too.
    reported = {f for f in backend.features if f in CPUINFO_FLAGS}
    assert reported, backend.features
    for feature in reported:
        assert set(CPUINFO_FLAGS[feature]) <= flags, feature
    assert reported == set(VARIANT_FEATURES[backend.variant]) - {"SSE42", "AMX_TILE"}  # not reported


def test_the_loaded_variant_is_the_best_one_granted(backend: CpuBackend) -> None:
    installed = sorted(p.name[len("libggml-cpu-") : -3] for p in backend.path.parent.glob("libggml-cpu-*.so"))
    assert set(SHIPPED) <= set(installed)
    flags = _proc_flags()
    amx = {"amx_tile", "amx_int8"} <= flags and cpu_backend._amx_granted()
    override = os.environ.get("PHI_CPU_VARIANT") or None
    assert (
        backend.variant == select_variants(flags, installed, amx_granted=amx, override=override).candidates[0]
    )
    if "amx_tile" not in flags:
        assert not cpu_backend._amx_granted()


def test_llama_cpp_reports_that_backend(backend: CpuBackend) -> None:
    ggml = cpu_backend._Ggml()
    assert ggml.registered().count("CPU") == 1
    reg = ggml.cpu_reg()
    assert reg and cpu_backend._library_of(reg) == backend.path
    assert ggml.features(reg) == backend.features
    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libggml-cpu-" in line
    }
    assert mapped == {str(backend.path)}, "exactly one CPU variant is in the process"


def test_later_calls_are_the_same_answer_from_any_thread(backend: CpuBackend) -> None:
    answers: list[CpuBackend] = []
    threads = [threading.Thread(target=lambda: answers.append(ensure_cpu_backend())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 8 and all(a is backend for a in answers)


_PLANTED = """
import sys
from pathlib import Path
if sys.argv[1] == "ensure":
    from local_models.cpu_backend import ensure_cpu_backend
    ensure_cpu_backend()
from llama_cpp import Llama
try:
    Llama(sys.argv[2], n_ctx=64, verbose=False).close()
    print("loaded")
except ValueError:
    print("not loaded")
cwd = str(Path.cwd())
print("\\n".join(sorted({l.split()[-1] for l in open("/proc/self/maps") if cwd in l})))
"""


def test_a_library_planted_in_the_working_directory_is_never_loaded(
    backend: CpuBackend, tmp_path: Path, tiny: Path
) -> None:
    # llama.cpp on its own (llama_backend_init -> ggml_backend_load_all) loads libggml-*.so files from the
    # current directory; with ensure_cpu_backend first it searches nowhere.
    planted = tmp_path / "libggml-cpu-zzz.so"
    planted.write_bytes(backend.path.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(mode: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", _PLANTED, mode, str(tiny)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return done.stdout.split()

    assert run("ensure") == ["loaded"]
    # The hazard this guards against is real: llama.cpp alone maps the planted file.
    assert run("plain") == ["loaded", str(planted)]


_OVERRIDE = """
from appliance import errors
from local_models.cpu_backend import ensure_cpu_backend
try:
    print(ensure_cpu_backend().variant)
except errors.Unavailable as exc:
    print(exc.code)
"""


def test_the_operator_override_is_obeyed_within_what_is_granted(backend: CpuBackend) -> None:
    def run(variant: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PHI_CPU_VARIANT": variant}
        done = subprocess.run(
            [sys.executable, "-c", _OVERRIDE], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout.strip()

    assert run("haswell") == "haswell"  # the floor: granted wherever anything is
    assert run("nonsense") == "cpu_variant_refused"
    flags = _proc_flags()
    refused = [
        v for v in SHIPPED if not all(f in flags for x in VARIANT_FEATURES[v] for f in CPUINFO_FLAGS[x])
    ]
    if refused:  # on this machine some variant is not granted: naming it changes nothing
        assert run(refused[0]) == "cpu_variant_refused"
