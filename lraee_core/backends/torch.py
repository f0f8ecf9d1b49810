"""The PyTorch backend: the open_clip tower quantized in place (:mod:`lraee_core.quantize`), run as it is."""

from __future__ import annotations

from ..backbone import ClipBackbone
from ..config import QuantMode
from ..quant_base import QuantReport
from ..quantize import quantize_vision
from ..static_quant import ActivationRanges


def prepare_torch(
    backbone: ClipBackbone, quant_mode: QuantMode, activation_ranges: ActivationRanges | None = None
) -> tuple[ClipBackbone, QuantReport]:
    """Quantize ``backbone``'s vision tower in place and hand it back: the dynamic modes with per-image activation
    scales, the static ones with ``activation_ranges``."""
    return backbone, quantize_vision(backbone.visual, quant_mode, activation_ranges)
