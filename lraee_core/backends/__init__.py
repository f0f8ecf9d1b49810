"""Backends: what runs the vision tower's staged forward (``embed``, ``block(l)``, ``pool_final``) for the engine.

One interface, chosen by name: :func:`prepare_backbone` takes the FP32 backbone a checkpoint describes and a quant
mode, and returns the backbone the engine runs (a :class:`~lraee_core.backbone.ClipBackbone`: its staged forward is
the interface) with a report of what was quantized. Every backend keeps the engine's batch-invariance promise: an
image's answer does not depend on the other images of its batch.

* ``torch``: PyTorch dynamic INT8 (:mod:`lraee_core.quantize`), activation scales per image; the default.
* ``onnxruntime``: the tower exported to ONNX block by block and quantized with ORT (optional extra ``[onnx]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..backbone import ClipBackbone
from ..config import QUANT_MODES, QuantMode
from ..errors import BackboneError
from ..quantize import QuantReport

BackendName = Literal["torch", "onnxruntime"]
BACKENDS: tuple[BackendName, ...] = ("torch", "onnxruntime")
DEFAULT_BACKEND: BackendName = "torch"


@dataclass(frozen=True)
class BackendOptions:
    """How a backend builds and runs; the torch backend needs none of it."""

    threads: int | None = None  # intra-op threads of a backend with its own thread pool; None: torch's count
    workdir: Path | None = None  # where a compiling backend keeps its files (ONNX graphs); None: a temporary
    # directory removed once the sessions are built


def prepare_backbone(
    backbone: ClipBackbone,
    quant_mode: QuantMode,
    backend: BackendName = DEFAULT_BACKEND,
    options: BackendOptions | None = None,
) -> tuple[ClipBackbone, QuantReport]:
    """The backbone the engine runs for ``backend`` under ``quant_mode``; ``backbone`` is FP32 and may be modified.

    :class:`~lraee_core.errors.BackboneError` for an unknown backend, or one whose optional packages are missing.
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
                f"the onnxruntime backend needs onnx and onnxruntime ({exc}); install the [onnx] extra"
            ) from exc
        return prepare_onnxruntime(backbone, quant_mode, options)
    raise BackboneError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
