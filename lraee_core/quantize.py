"""INT8 dynamic post-training quantization of the vision tower.

``paper`` is what the paper did: ``torch.ao.quantization.quantize_dynamic`` over the tower's ``nn.Linear`` modules.
On open_clip 3.3.0 ViTs that converts only the two MLP Linears of each block: the attention input projection is a bare
``in_proj_weight`` parameter of ``nn.MultiheadAttention`` and its ``out_proj`` is a ``NonDynamicallyQuantizableLinear``,
so attention stays FP32 (24 modules for ViT-B-32). ``full`` also replaces each attention with an equivalent module
whose input and output projections are dynamic INT8 Linears (weights per-tensor INT8, activations quantized per batch
at run time), so every weight matmul of the blocks runs in INT8.

One deliberate difference from a bare ``quantize_dynamic``: a dynamic INT8 Linear picks its activation scale from
the whole input tensor, so an image's result would depend on the other images of its batch (and a micro-batching
server would answer the same image differently under load). Each converted Linear here is wrapped so the scale is
taken per image; that is exactly ``quantize_dynamic`` run at batch size 1, and a batch gives each image the result
it gets alone.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

from .config import QUANT_MODES, QuantMode
from .errors import BackboneError
from .quant_base import ProjectedSelfAttention, QuantReport
from .static_quant import ActivationRanges, quantize_static


class PerImageDynamicLinear(nn.Module):
    """A dynamic INT8 Linear whose activation scale is computed per image (leading dimension) of a 3-D input."""

    def __init__(self, quantized: DynamicQuantLinear) -> None:
        super().__init__()
        self.quantized = quantized
        self.in_features = quantized.in_features
        self.out_features = quantized.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[0] == 1:
            return self.quantized(x)
        return torch.cat([self.quantized(x[i : i + 1]) for i in range(x.shape[0])])


def _wrap_per_image(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, DynamicQuantLinear):
            setattr(module, name, PerImageDynamicLinear(child))
        elif not isinstance(child, PerImageDynamicLinear):
            _wrap_per_image(child)


def _quantize_linears(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch.ao eager quantization is deprecated in favour of torchao; it is still what the paper used.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


def dynamic_int8_attention(attention: nn.MultiheadAttention) -> ProjectedSelfAttention:
    """Self-attention equal to a batch-first ``nn.MultiheadAttention`` with INT8 dynamic projections (per-image
    activation scales, like every Linear this module converts)."""
    module = ProjectedSelfAttention(attention)
    projections: Any = _quantize_linears(nn.ModuleDict({"in_proj": module.in_proj, "out_proj": module.out_proj}))
    _wrap_per_image(projections)
    module.in_proj, module.out_proj = projections["in_proj"], projections["out_proj"]
    return module


def quantize_vision(visual: nn.Module, mode: QuantMode, ranges: ActivationRanges | None = None) -> QuantReport:
    """Quantize ``visual`` in place according to ``mode`` and report exactly which modules were converted.

    ``ranges``: the calibrated activation ranges the static modes need (:mod:`lraee_core.static_quant`)."""
    if mode not in QUANT_MODES:
        raise BackboneError(f"unknown quant mode {mode!r}; expected one of {QUANT_MODES}")
    if mode == "none":
        return QuantReport(mode=mode, converted=())
    if mode.startswith("static"):
        return quantize_static(visual, mode, ranges)
    visual.eval()
    if mode == "full":
        blocks: Any = visual.get_submodule("transformer.resblocks")
        for block in blocks:
            block.attn = dynamic_int8_attention(block.attn)
    _quantize_linears(visual)
    _wrap_per_image(visual)
    converted = tuple(name for name, module in visual.named_modules() if isinstance(module, PerImageDynamicLinear))
    return QuantReport(mode=mode, converted=converted)
