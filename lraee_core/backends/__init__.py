"""Backends: what runs the vision tower's staged forward (``embed``, ``block(l)``, ``pool_final``) for the engine.

One interface, chosen by name: :func:`prepare_backbone` takes the FP32 backbone a checkpoint describes and a quant
mode, and returns the backbone the engine runs (a :class:`~lraee_core.backbone.ClipBackbone`: its staged forward is
the interface) with a report of what was quantized. ``auto`` names the fastest backend for the quant mode
(:func:`resolve_backend`); the loader, :func:`lraee_core.checkpoint.load_classifier`, resolves it for every caller.
Every backend keeps the engine's batch-invariance promise: an image's answer does not depend on the other images of
its batch.

* ``torch``: PyTorch dynamic INT8 (:mod:`lraee_core.quantize`), activation scales per image (a Python loop over the
  images of a batch: fbgemm's dynamic Linear takes one scale per tensor); the library's default, needs nothing more.
* ``onnxruntime``: the embedding stage and blocks written as ONNX graphs (:mod:`.ort_graphs`), INT8 with the
  activation scales computed per image inside the graph, so a batch is one session call per block (or per span of
  blocks, :meth:`~lraee_core.backbone.ClipBackbone.blocks`). The service's default (``LRAEE_BACKEND``): 1.4-1.5x
  the torch backend's images/s on the default model here (bench/README.md).
"""

from __future__ import annotations

from typing import Literal

from ..backbone import ClipBackbone
from ..config import QUANT_MODES, QuantMode
from ..cpu import CpuInfo, cpu_info
from ..errors import BackboneError
from ..quant_base import QuantReport
from ..static_quant import STATIC_MODES, ActivationRanges
from .options import BackendOptions

BackendName = Literal["torch", "onnxruntime"]
BACKENDS: tuple[BackendName, ...] = ("torch", "onnxruntime")
DEFAULT_BACKEND: BackendName = "torch"
BackendChoice = Literal["auto", "torch", "onnxruntime"]  # what a deployment asks for; "auto": auto_backend()
ONNXRUNTIME_MODES: tuple[QuantMode, ...] = ("none", "paper", "full")  # what the onnxruntime backend runs


# What `auto` picks, by the CPU's kernel family (lraee_core.cpu.CpuInfo.kind) and quant mode: the fastest backend
# measured on that kind among those whose answers keep the checkpoint's promises (both backends are batch-invariant
# and agree with each other within the backend sweep's tolerance: reports/everyday/backends/). A table, not a race at
# start-up, so one machine always serves with the same backend.
# * avx2 (AMD EPYC, this project's machines): onnxruntime 1.4-1.5x torch on the default model and 1.7-2.1x on
#   ViT-B-32 in make bench (bench/results/latest.md); the static modes run on fbgemm's static kernels, torch only.
# * amx / avx512-vnni (Intel Xeon): measured by the issue 41 report only, with onnxruntime: the `full` mode ran
#   ViT-B-32 at 1.16x ONNX Runtime's own INT8 at batch 32; torch was not measured there, so the avx2 choices stand
#   until a bench on such a CPU says otherwise (make bench records the CPU and which backend auto picked).
AUTO_BACKENDS: dict[str, dict[QuantMode, BackendName]] = {
    kind: {"none": "onnxruntime", "paper": "onnxruntime", "full": "onnxruntime"}
    for kind in ("avx2", "avx512-vnni", "amx", "other")
}


def auto_backend(quant_mode: QuantMode, cpu: CpuInfo | None = None) -> BackendName:
    """The backend ``auto`` picks for ``quant_mode`` on ``cpu`` (default: this machine's): :data:`AUTO_BACKENDS`,
    torch for a mode the table does not name (the static modes) or when onnxruntime is not installed."""
    kind = (cpu or cpu_info()).kind
    choice = AUTO_BACKENDS.get(kind, AUTO_BACKENDS["other"]).get(quant_mode, "torch")
    if choice == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
    return choice


def resolve_backend(choice: str | None, quant_mode: QuantMode) -> BackendName:
    """The backend ``choice`` names: ``auto`` is :func:`auto_backend` for ``quant_mode``, None the library's default
    (``torch``). :class:`~lraee_core.errors.BackboneError` for a name that is neither."""
    if choice is None:
        return DEFAULT_BACKEND
    if choice == "auto":
        return auto_backend(quant_mode)
    for name in BACKENDS:
        if choice == name:
            return name
    raise BackboneError(f"unknown backend {choice!r}; expected auto or one of {BACKENDS}")


def prepare_backbone(
    backbone: ClipBackbone,
    quant_mode: QuantMode,
    backend: BackendName = DEFAULT_BACKEND,
    options: BackendOptions | None = None,
    activation_ranges: ActivationRanges | None = None,
) -> tuple[ClipBackbone, QuantReport]:
    """The backbone the engine runs for ``backend`` under ``quant_mode``; ``backbone`` is FP32 and may be modified.

    ``activation_ranges``: the calibrated ranges the static modes (:data:`~lraee_core.static_quant.STATIC_MODES`)
    need; those modes run on the torch backend only (fbgemm's static kernels).
    :class:`~lraee_core.errors.BackboneError` for an unknown backend, or one whose packages do not import.
    """
    if quant_mode not in QUANT_MODES:  # checked before a backend spends minutes compiling
        raise BackboneError(f"unknown quant mode {quant_mode!r}; expected one of {QUANT_MODES}")
    if quant_mode in STATIC_MODES and backend != "torch":
        raise BackboneError(f"the static quant modes run on the torch backend only, not {backend!r}")
    options = options or BackendOptions()
    if backend == "torch":
        from .torch import prepare_torch

        return prepare_torch(backbone, quant_mode, activation_ranges)
    if backend == "onnxruntime":
        try:
            from .onnxruntime import prepare_onnxruntime
        except ImportError as exc:
            raise BackboneError(
                f"the onnxruntime backend needs onnx and onnxruntime, dependencies of this package ({exc}); "
                "reinstall it (pip install -e .)"
            ) from exc
        return prepare_onnxruntime(backbone, quant_mode, options)
    raise BackboneError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
