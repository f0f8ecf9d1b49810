"""Static INT8 (W8A8) quantization of the vision tower, and stress modes with fewer activation bits.

``static``: every weight matmul of the blocks (attention input and output projections, both MLP Linears) runs as
``torch.ao.nn.quantized.Linear`` on torch's x86 quantized engine (fbgemm / oneDNN): weights INT8 per output channel
(symmetric), activations quantized per tensor with *fixed* scales calibrated offline, before the model serves (the
Linear's input, and its output, which the kernel requantizes). Nothing depends on the batch, so an image gets the
same answer alone or in any batch, by construction. Attention scores (query x key, softmax x value), LayerNorm,
GELU, the patch-embedding convolution and the final projection stay FP32, as in torch's eager static PTQ.

Activation bits: the Linear input uses 7 of its 8 bits (``quint8`` values 0..127, torch's ``reduce_range``). With
the full 0..255 range the x86 kernels saturate their 16-bit pair sums: on random inputs here the error reached 0.2
where half a quantization step is 0.007 (30x). Outputs use the full 8 bits.

``static-a6`` and ``static-a4``: the same calibrated ranges and INT8 weights, activations (Linear inputs and outputs)
at 6 or 4 bits. No CPU kernel runs 6- or 4-bit activations, so these are *simulated* with fake quantization
(quantize-dequantize in FP32 around an FP32 matmul of the dequantized INT8 weights): they map where the noise grows
with depth, they are no faster.

Calibration (:func:`observe_ranges`): one FP32 pass over calibration images with an observer on every Linear's input
and output, keeping the plain minimum and maximum (torch's ``MinMaxObserver``). Min/max, not a percentile: the ViT's
residual stream carries a few very large activations that matter to its answer, so clipping them trades a rare
large error for a finer step everywhere else; min/max keeps every observed value representable and needs no
setting to tune. The ranges travel in the checkpoint (:data:`RANGES_FILE`), so loading rebuilds the same modules
without data.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized import Linear as QuantizedLinear

from .config import QuantMode
from .errors import BackboneError
from .quant_base import ProjectedSelfAttention, QuantReport

ACTIVATION_BITS: dict[str, int] = {"static": 8, "static-a6": 6, "static-a4": 4}  # mode -> activation bits
STATIC_MODES: tuple[QuantMode, ...] = ("static", "static-a6", "static-a4")
SIMULATED_MODES: tuple[QuantMode, ...] = ("static-a6", "static-a4")  # fake quantization, no INT kernel
RANGES_FILE = "activation_ranges.safetensors"  # the calibrated ranges inside a checkpoint directory
RANGE_METHOD = "minmax"  # how ranges were observed (see the module docstring)
_INPUT_QMAX_REAL = 127  # reduce_range: the x86 kernels need 7-bit activation inputs (module docstring)
_WEIGHT_QMAX = 127  # symmetric INT8 weights, per output channel

# torch marks its quantized tensor types deprecated in favour of torchao; they are still what runs its static INT8
# kernels. Filtered once here: a per-call catch_warnings would also be unsafe with the server's worker threads.
warnings.filterwarnings(
    "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning
)


@dataclass(frozen=True)
class ActivationRanges:
    """Per-tensor (min, max) of every converted Linear's input and output, observed on FP32 calibration images."""

    inputs: dict[str, tuple[float, float]]  # module path under the vision tower -> range of its input
    outputs: dict[str, tuple[float, float]]  # module path -> range of its output
    images: int  # calibration images observed
    method: str = RANGE_METHOD  # observer kind

    def save(self, path: str | Path) -> None:
        """Write the ranges as a safetensors file: ``<module>.input`` / ``<module>.output`` = [min, max]."""
        tensors = {f"{name}.input": torch.tensor(value, dtype=torch.float32) for name, value in self.inputs.items()}
        tensors.update(
            {f"{name}.output": torch.tensor(value, dtype=torch.float32) for name, value in self.outputs.items()}
        )
        save_file(tensors, str(path), metadata={"images": str(self.images), "method": self.method})

    @classmethod
    def load(cls, path: str | Path) -> ActivationRanges:
        """Read what :meth:`save` wrote; ``ValueError`` when the file is malformed."""
        inputs: dict[str, tuple[float, float]] = {}
        outputs: dict[str, tuple[float, float]] = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        for key, value in load_file(str(path)).items():
            name, _, kind = key.rpartition(".")
            if value.shape != (2,) or not torch.isfinite(value).all() or kind not in ("input", "output"):
                raise ValueError(f"{key}: expected a finite [min, max] pair of an input or output")
            low, high = float(value[0]), float(value[1])
            if low > high:
                raise ValueError(f"{key}: min {low} > max {high}")
            (inputs if kind == "input" else outputs)[name] = (low, high)
        if set(inputs) != set(outputs):
            raise ValueError("every module needs both an input and an output range")
        return cls(inputs, outputs, int(metadata.get("images", 0)), metadata.get("method", RANGE_METHOD))


def affine_qparams(low: float, high: float, qmax: int) -> tuple[float, int]:
    """(scale, zero point) mapping [low, high] (widened to hold 0) onto integers 0..qmax, as MinMaxObserver does."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / qmax, 1e-8)
    zero_point = int(min(qmax, max(0, round(-low / scale))))
    return scale, zero_point


def _quantized_weight(linear: nn.Linear) -> torch.Tensor:
    weight = linear.weight.detach().float()
    scales = (weight.abs().amax(dim=1) / _WEIGHT_QMAX).clamp(min=1e-12).double()
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    return torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)


class StaticInt8Linear(nn.Module):
    """A Linear run by torch's static INT8 kernel with fixed (calibrated) input and output scales."""

    def __init__(self, linear: nn.Linear, input_range: tuple[float, float], output_range: tuple[float, float]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.input_scale, self.input_zero_point = affine_qparams(*input_range, _INPUT_QMAX_REAL)
        self.quantized = QuantizedLinear(linear.in_features, linear.out_features, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.quantized.set_weight_bias(_quantized_weight(linear), bias)
        scale, zero_point = affine_qparams(*output_range, 255)
        self.quantized.scale, self.quantized.zero_point = scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8)
        return self.quantized(quantized).dequantize()


class FakeQuantLinear(nn.Module):
    """Simulated static quantization at ``bits`` activation bits: quantize-dequantize around an FP32 matmul of the
    dequantized per-channel INT8 weights (stress modes; no faster than FP32)."""

    weight: torch.Tensor  # [out, in] the INT8 weights, dequantized
    bias: torch.Tensor | None  # [out]

    def __init__(
        self, linear: nn.Linear, input_range: tuple[float, float], output_range: tuple[float, float], bits: int
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qmax = 2**bits - 1
        self.input_scale, self.input_zero_point = affine_qparams(*input_range, self.qmax)
        self.output_scale, self.output_zero_point = affine_qparams(*output_range, self.qmax)
        self.register_buffer("weight", _quantized_weight(linear).dequantize())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, self.input_zero_point, 0, self.qmax)
        y = F.linear(x, self.weight, self.bias)
        return torch.fake_quantize_per_tensor_affine(y, self.output_scale, self.output_zero_point, 0, self.qmax)


def _blocks(visual: nn.Module) -> Any:
    return visual.get_submodule("transformer.resblocks")


def explicit_projections(visual: nn.Module) -> None:
    """Replace every block's ``nn.MultiheadAttention`` by :class:`ProjectedSelfAttention` (FP32, same function)."""
    for block in _blocks(visual):
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = ProjectedSelfAttention(block.attn)


def _linears(visual: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears static quantization converts, by path under the tower (after :func:`explicit_projections`)."""
    return [
        (name, module)
        for name, module in visual.named_modules()
        if name.startswith("transformer.resblocks.") and isinstance(module, nn.Linear)
    ]


@torch.inference_mode()
def observe_ranges(visual: nn.Module, batches: Iterable[torch.Tensor]) -> ActivationRanges:
    """Min/max of every converted Linear's input and output over FP32 forward passes of ``batches`` ([B, 3, H, W]
    preprocessed images); ``visual`` itself is not modified."""
    observed = copy.deepcopy(visual).eval()
    explicit_projections(observed)
    inputs: dict[str, tuple[float, float]] = {}
    outputs: dict[str, tuple[float, float]] = {}

    def widen(store: dict[str, tuple[float, float]], name: str, tensor: torch.Tensor) -> None:
        low, high = float(tensor.min()), float(tensor.max())
        old = store.get(name)
        store[name] = (low, high) if old is None else (min(old[0], low), max(old[1], high))

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            widen(inputs, name, args[0])
            widen(outputs, name, output)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in _linears(observed)]
    images = 0
    try:
        for batch in batches:
            observed(batch)
            images += batch.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if images == 0:
        raise ValueError("no calibration images observed")
    return ActivationRanges(inputs=inputs, outputs=outputs, images=images)


def quantize_static(visual: nn.Module, mode: QuantMode, ranges: ActivationRanges | None) -> QuantReport:
    """Convert ``visual`` in place to ``mode`` (one of :data:`STATIC_MODES`) with calibrated ``ranges``."""
    if mode not in STATIC_MODES:
        raise BackboneError(f"{mode!r} is not a static quant mode; expected one of {STATIC_MODES}")
    if ranges is None:
        raise BackboneError(
            f"quant mode {mode!r} needs activation ranges calibrated offline: load a checkpoint built with a static "
            "mode (it carries them), or pass ranges from lraee_core.static_quant.observe_ranges"
        )
    visual.eval()
    explicit_projections(visual)
    bits = ACTIVATION_BITS[mode]
    converted = []
    for name, linear in _linears(visual):
        if name not in ranges.inputs:
            raise BackboneError(f"the activation ranges name no {name!r}: calibrated on another architecture?")
        parent_name, _, attribute = name.rpartition(".")
        if mode in SIMULATED_MODES:
            module: nn.Module = FakeQuantLinear(linear, ranges.inputs[name], ranges.outputs[name], bits)
        else:
            module = StaticInt8Linear(linear, ranges.inputs[name], ranges.outputs[name])
        setattr(visual.get_submodule(parent_name), attribute, module)
        converted.append(name)
    return QuantReport(mode=mode, converted=tuple(converted))
