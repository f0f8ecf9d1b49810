"""The PyTorch backend: the open_clip tower quantized in place (:mod:`lraee_core.quantize`), run as it is."""

from __future__ import annotations

from ..backbone import ClipBackbone
from ..config import QuantMode
from ..quant_base import QuantReport
from ..quantize import quantize_vision


def prepare_torch(backbone: ClipBackbone, quant_mode: QuantMode) -> tuple[ClipBackbone, QuantReport]:
    """Quantize ``backbone``'s vision tower in place (per-image activation scales) and hand it back."""
    return backbone, quantize_vision(backbone.visual, quant_mode)
