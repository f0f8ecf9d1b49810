"""The CPU this process runs on: its model name and the instruction-set extensions that decide which INT8 kernels
run (AVX2; AVX-512 with VNNI; AMX). Speed ratios differ between such CPUs, so benches and measured charges record
it, and the ``auto`` backend chooses by it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

# The flags that matter here, as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """What kind of CPU this is."""

    model: str  # the model name /proc/cpuinfo gives ("unknown" where it cannot be read)
    isa: tuple[str, ...]  # the flags of ISA_FLAGS this CPU has, in that order

    @property
    def kind(self) -> str:
        """A short name of the kernel family: "amx" (AMX + AVX-512 VNNI), "avx512-vnni", "avx2" or "other"."""
        if "amx_int8" in self.isa:
            return "amx"
        if "avx512_vnni" in self.isa:
            return "avx512-vnni"
        if "avx2" in self.isa:
            return "avx2"
        return "other"

    def to_json(self) -> dict[str, object]:
        """JSON-ready description."""
        return {"model": self.model, "isa": list(self.isa), "kind": self.kind}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from the text of /proc/cpuinfo."""
    model, flags = "unknown", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuInfo(model, tuple(flag for flag in ISA_FLAGS if flag in flags))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo("unknown", ())
