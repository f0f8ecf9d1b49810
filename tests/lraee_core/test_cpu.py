"""lraee_core.cpu and the `auto` backend table: the CPU kind read from /proc/cpuinfo decides, deterministically."""

from __future__ import annotations

import pytest

from lraee_core.backends import AUTO_BACKENDS, auto_backend
from lraee_core.cpu import CpuInfo, cpu_info, parse_cpuinfo

AMD = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
"""
INTEL = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: something else
"""


def test_the_kind_follows_the_instruction_sets() -> None:
    amd, intel = parse_cpuinfo(AMD), parse_cpuinfo(INTEL)
    assert (amd.model, amd.isa, amd.kind) == ("AMD EPYC 7B13", ("avx2",), "avx2")
    assert intel.model.startswith("Intel(R) Xeon(R)") and intel.kind == "amx"
    assert set(intel.isa) == {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    assert CpuInfo("x", ("avx2", "avx512f", "avx512_vnni")).kind == "avx512-vnni"
    assert parse_cpuinfo("").kind == "other"
    assert cpu_info().to_json()["kind"] in {"avx2", "avx512-vnni", "amx", "other"}


@pytest.mark.parametrize("kind", sorted(AUTO_BACKENDS))
def test_auto_picks_from_the_table_for_every_cpu_kind(kind: str) -> None:
    isa = {"avx2": ("avx2",), "avx512-vnni": ("avx512_vnni",), "amx": ("amx_int8",), "other": ()}[kind]
    cpu = CpuInfo("test", isa)
    assert cpu.kind == kind
    for mode, backend in AUTO_BACKENDS[kind].items():
        assert auto_backend(mode, cpu) == backend
    assert auto_backend("static", cpu) == "torch"  # fbgemm's static kernels: torch only
