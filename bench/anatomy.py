"""Where the time of one transformer block goes, per backend: the diagnosis behind the torch INT8 figures.

One block (the first of the tower) is timed at batch 1 and batch 32 in each backend, with and without the engine's
per-image activation-scale wrapper, and the engine's paper-mode block is profiled op by op at batch 32. The
onnxruntime engines' block is also timed at the row counts a batch of 32 keeps running past each exit of the assumed
mix (32, 18, 10, 5): whether the smaller calls after an exit cost more per image.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lraee_core.backbone import ClipBackbone

from .baselines import plain_quantize_dynamic
from .exit_mix import rows_running
from .timing import median, time_passes, timed_calls
from .under_test import SERVICE_ENGINE, BackboneUnderTest
from .workloads import LARGE_BATCH

# Profiler op names -> what they are in a block; first match wins, anything else is "other".
_OP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("INT8 matmul (dynamic quant + GEMM)", ("quantized::linear_dynamic", "quantized::linear")),
    ("per-image split/concat (wrapper)", ("aten::cat", "aten::slice", "aten::select", "aten::unbind")),
    (
        "attention FP32 (projections, scores, softmax)",
        (
            "aten::_native_multi_head_attention",
            "aten::scaled_dot_product_attention",
            "aten::_scaled_dot_product",
            "aten::_transformer",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "aten::matmul",
            "aten::mm",
            "aten::_softmax",
            "aten::softmax",
        ),
    ),
    ("layer norm", ("aten::layer_norm", "aten::native_layer_norm")),
    ("GELU", ("aten::gelu",)),
)


@dataclass
class BlockTiming:
    """Milliseconds per image of one block in one backend (medians)."""

    backend: str
    batch1_ms_per_image: float
    batch32_ms_per_image: float


@dataclass
class RowsTiming:
    """Milliseconds per image of one block in one backend, by the number of rows in the call (medians)."""

    backend: str
    rows: list[int]  # rows in the call, per column
    ms_per_image: list[float]  # ms per image at each of ``rows``


def _per_image_ms(run: Callable[[torch.Tensor], object], hidden: torch.Tensor, warmup: int, repeats: int) -> float:
    times = time_passes(lambda: timed_calls([lambda: run(hidden)]), warmup=warmup, repeats=repeats)
    return median(times.passes) / hidden.shape[0] * 1e3


def _embedded_noise(fp32: ClipBackbone, count: int) -> torch.Tensor:
    """Seeded noise images through the FP32 embedding stage: the hidden states [count, T, D] a first block reads."""
    size = fp32.shape.image_size
    with torch.inference_mode():
        return fp32.embed(torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1)))


def _first_block(backbone: ClipBackbone, hidden: torch.Tensor) -> torch.Tensor:
    return backbone.block(1, hidden)


def block_timings(under_test: BackboneUnderTest, *, warmup: int, repeats: int) -> list[BlockTiming]:
    """Block 1 of every backend at batch 1 and 32."""
    fp32 = under_test.fp32
    hidden = _embedded_noise(fp32, LARGE_BATCH)
    engines = under_test.engines
    paper = engines["torch-paper"].backbone.visual.transformer.resblocks[0]
    service = engines[SERVICE_ENGINE].backbone
    runs: list[tuple[str, Callable[[torch.Tensor], object]]] = [
        ("torch FP32", fp32.visual.transformer.resblocks[0]),
        ("torch INT8 paper, per-image scales (a loop over images)", paper),
        ("torch INT8 paper, plain quantize_dynamic (per-batch scales)", plain_quantize_dynamic(copy.deepcopy(paper))),
        (f"{under_test.service_backend} {under_test.own_mode} (the service's engine)", partial(_first_block, service)),
    ]
    for name, title in (
        ("ort-full", "onnxruntime full, per-image scales"),
        ("ort-full-batch", "onnxruntime full, per-batch scales"),
    ):
        if name in engines:
            runs.append((title, partial(_first_block, engines[name].backbone)))
    timings = []
    with torch.inference_mode():
        for backend, run in runs:
            timings.append(
                BlockTiming(
                    backend,
                    _per_image_ms(run, hidden[:1], warmup, repeats * 5),
                    _per_image_ms(run, hidden, warmup, repeats),
                )
            )
    return timings


def block_by_rows(under_test: BackboneUnderTest, *, warmup: int, repeats: int) -> list[RowsTiming]:
    """Block 1 of the onnxruntime engines (the service's, and the ``full``-mode one when it is benchmarked) at each
    row count of :func:`.exit_mix.rows_running`, the counts timed in interleaved rounds."""
    rows = rows_running(LARGE_BATCH)
    hidden = _embedded_noise(under_test.fp32, rows[0])
    engines = under_test.engines
    runs = []
    if under_test.service_backend == "onnxruntime":
        runs.append((f"onnxruntime {under_test.own_mode} (the service's engine)", engines[SERVICE_ENGINE].backbone))
    if "ort-full" in engines:
        runs.append(("onnxruntime full, per-image scales", engines["ort-full"].backbone))
    timings = []
    with torch.inference_mode():
        for backend, backbone in runs:
            calls = [partial(_first_block, backbone, hidden[:count].contiguous()) for count in rows]
            times = time_passes(partial(timed_calls, calls), warmup=warmup, repeats=repeats)
            timings.append(
                RowsTiming(
                    backend,
                    list(rows),
                    # times.calls holds every pass's calls in order: count i's are every len(rows)-th from i
                    [median(times.calls[i :: len(rows)]) / count * 1e3 for i, count in enumerate(rows)],
                )
            )
    return timings


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs its start and stop there, past Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_block(under_test: BackboneUnderTest, *, repeats: int) -> dict[str, float]:
    """Share of self CPU time per op group of the engine's paper-mode block 1 at batch 32."""
    block: nn.Module = under_test.engines["torch-paper"].backbone.visual.transformer.resblocks[0]
    shape = under_test.fp32.shape
    hidden = torch.randn(LARGE_BATCH, shape.num_tokens, shape.width, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        block(hidden)
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(max(1, repeats)):
                block(hidden)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        group = next((name for name, ops in _OP_GROUPS if event.key in ops), "other")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    overall = sum(totals.values()) or 1.0
    return {group: value / overall for group, value in sorted(totals.items(), key=lambda kv: -kv[1])}
