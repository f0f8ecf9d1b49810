"""Backends: what runs the vision tower's staged forward (``embed``, ``block(l)``, ``pool_final``) for the engine.

One interface, chosen by name: :func:`prepare_backbone` takes the FP32 backbone a checkpoint describes and a quant
mode, and returns the backbone the engine runs (a :class:`~lraee_core.backbone.ClipBackbone`: its staged forward is
the interface) with a report of what was quantized. Every backend keeps the engine's batch-invariance promise: an
image's answer does not depend on the other images of its batch.

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
from ..errors import BackboneError
from ..quant_base import QuantReport
from .options import BackendOptions

BackendName = Literal["torch", "onnxruntime"]
BACKENDS: tuple[BackendName, ...] = ("torch", "onnxruntime")
DEFAULT_BACKEND: BackendName = "torch"
BackendChoice = Literal["auto", "torch", "onnxruntime"]  # what a deployment asks for; "auto": auto_backend()
ONNXRUNTIME_MODES: tuple[QuantMode, ...] = ("none", "paper", "full")  # what the onnxruntime backend runs


def auto_backend(quant_mode: QuantMode) -> BackendName:
    """The fastest backend measured here that runs ``quant_mode``: onnxruntime for the dynamic modes when it is
    installed, torch otherwise (the static modes use fbgemm's static kernels)."""
    if quant_mode not in ONNXRUNTIME_MODES:
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def prepare_backbone(
    backbone: ClipBackbone,
    quant_mode: QuantMode,
    backend: BackendName = DEFAULT_BACKEND,
    options: BackendOptions | None = None,
) -> tuple[ClipBackbone, QuantReport]:
    """The backbone the engine runs for ``backend`` under ``quant_mode``; ``backbone`` is FP32 and may be modified.

    :class:`~lraee_core.errors.BackboneError` for an unknown backend, or one whose packages do not import.
    """
    if quant_mode not in QUANT_MODES:  # checked before a backend spends minutes compiling
        raise BackboneError(f"unknown quant mode {quant_mode!r}; expected one of {QUANT_MODES}")
    options = options or BackendOptions()
    if backend == "torch":
        from .torch import prepare_torch

        return prepare_torch(backbone, quant_mode)
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
