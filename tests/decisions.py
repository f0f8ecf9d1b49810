"""Decisions compared across two code paths without depending on the CPU's kernels.

Two paths that compute the same number can differ in its last bits: the engine and the build's simulation over
cached features, an image alone and in a batch, the torch and ONNX Runtime backends. Which kernel a library runs
depends on the CPU (AVX2 on AMD EPYC; AVX-512, VNNI and AMX on newer Intel Xeons: MKL's GEMMs, oneDNN's
convolution, ATen's LayerNorm, softmax and attention, fbgemm's and MLAS's INT8 GEMMs) and on the call's shape (how
many rows a GEMM has), and a dynamic INT8 layer can turn such a difference into a whole quantization step of one
activation. A decision taken from such a number (an exit: gate probability >= threshold; a top-1 label: the largest
of a few cosines) goes either way when the number lies about that close to its boundary. So a test that compares
decisions across two paths

* never places a threshold at a score: :func:`split_threshold` puts it in the middle of a gap, at least
  :data:`TIE_BAND` from every score;
* compares decisions only on rows whose every deciding number lies further than :data:`TIE_BAND` from its boundary
  (:func:`near`), counts the rows inside the band, and fails when more than a stated few fall there.

What each comparison promises, measured on AMD EPYC (AVX2) here; the issue-35 run on an Intel Xeon with AVX512-VNNI
and AMX passed the same exact checks of the first two rows:

* one backend, an image alone vs in a batch: hidden states bit-identical on both backends (activation scales per
  image, and no GEMM here sums across the rows of a batch); exit-head and gate outputs within 1e-6 (their FP32
  reductions may round differently by batch size); decisions equal outside the band;
* the engine vs the build's simulation (the same torch kernels, other batch shapes): equal on AMD EPYC; on the Intel
  Xeon the batch shape moved one image across a threshold placed at a score. Decisions equal outside the band;
* torch vs ONNX Runtime, or torch at another instruction set: different kernels, different INT8 roundings. Measured
  here on the default checkpoint (full INT8 mode, 48 CIFAR-10 photos): gate probabilities moved up to 0.06 between
  the backends and 0.017 with torch held to SSE4.1 (``ONEDNN_MAX_CPU_ISA=SSE41``, ``ATEN_CPU_CAPABILITY=default``,
  ``MKL_ENABLE_INSTRUCTIONS=SSE4_2``); on the random tiny checkpoint (paper mode) top-1 cosines moved up to 6e-4 at
  the exits and 2.4e-3 at full depth. No decision is promised equal there: tests compare such paths with
  tolerances, never decisions, and ``ONEDNN_MAX_CPU_ISA`` (oneDNN's kernels; with ``ATEN_CPU_CAPABILITY`` and
  ``MKL_ENABLE_INSTRUCTIONS``, torch's others) is the switch that runs an Intel machine's torch on the instruction
  set an AMD EPYC runs (``AVX2``), to reproduce a report from the other kind. ONNX Runtime has no such switch.

TIE_BAND is one absolute width because every number compared against it lives on a scale of about 1: gate
probabilities in [0, 1], cosines in [-1, 1], softmax scores in [0, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

TIE_BAND = 1e-3  # see the module docstring; above every same-kernel difference measured here (1e-6) by 1,000x
# One backend, a row alone vs in a batch (the first row above, measured on both CPU kinds): gate outputs within 1e-6.
# Tests of that comparison alone may place thresholds this close to a score (10x the measured difference); an
# untrained checkpoint's gate probabilities for noise images lie too close together for TIE_BAND's gaps.
BATCH_BAND = 1e-5


def split_threshold(scores: np.ndarray | torch.Tensor, band: float = TIE_BAND) -> float:
    """A threshold that splits ``scores`` near their median, at least ``band`` from every score: the middle of the
    widest gap between neighbouring sorted scores, among those that leave a quarter of the scores on each side."""
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    count = len(values)
    assert count >= 2, "a split needs two scores"
    first = count // 4
    last = max(first + 1, count - count // 4 - 1)  # gaps after values[first] .. values[last - 1]
    gaps = values[first + 1 : last + 1] - values[first:last]
    widest = first + int(np.argmax(gaps))
    assert gaps.max() > 2 * band, f"no gap wider than 2 x {band} among the middle scores {values.tolist()}"
    return float((values[widest] + values[widest + 1]) / 2)


def near(values: np.ndarray | torch.Tensor, boundary: float | np.ndarray, band: float = TIE_BAND) -> np.ndarray:
    """[N] True where a value lies within ``band`` of its boundary (a scalar, or one per value)."""
    return np.abs(np.asarray(values, dtype=np.float64) - np.asarray(boundary, dtype=np.float64)) <= band


def top2_gap(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """[N] the largest minus the second largest of each row of [N, K] scores (inf with one column): how far a
    row's top-1 is from a tie."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape[1] < 2:
        return np.full(values.shape[0], np.inf)
    ranked = np.sort(values, axis=1)
    return np.asarray(ranked[:, -1] - ranked[:, -2])


def same_ranking(first: Sequence[tuple[str, float]], second: Sequence[tuple[str, float]], atol: float) -> None:
    """Two top-k lists (label, score), highest first, of one image from two paths: the same scores per label within
    ``atol``, and the same order wherever two neighbours of ``first`` differ by more than :data:`TIE_BAND` (a near
    tie may come out either way, and so may which label makes the cut at the end of the list)."""
    ours, theirs = dict(first), dict(second)
    assert len(first) == len(second)
    for label in ours.keys() & theirs.keys():
        assert abs(ours[label] - theirs[label]) <= atol, (label, ours[label], theirs[label])
    for label in ours.keys() ^ theirs.keys():  # at the cut: a near tie with the last score of both lists
        score = ours.get(label, theirs.get(label, 0.0))
        assert score <= min(first[-1][1], second[-1][1]) + TIE_BAND, (label, first, second)
    rank = {label: place for place, (label, _) in enumerate(second)}
    for (upper, high), (lower, low) in itertools.pairwise(first):
        if high - low > TIE_BAND and upper in rank and lower in rank:
            assert rank[upper] < rank[lower], (first, second)


def another_instruction_set() -> dict[str, str]:
    """Environment variables that run torch's kernels on another instruction set than this CPU's best, for a fresh
    process: AVX2 (what an AMD EPYC runs) on a CPU with AVX-512, SSE4.1 on one without."""
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return {
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        }
    return {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
