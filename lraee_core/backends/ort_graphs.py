"""ONNX graphs of open_clip ViT blocks written directly (no exporter), with INT8 matmuls whose activation scale is
computed per image inside the graph.

Why per image, in the graph: a dynamic INT8 matmul quantizes its input with a scale taken from the input's range.
ORT's ``DynamicQuantizeLinear`` takes one range for the whole tensor, so in a batched call an image's answer would
depend on its batch mates. Here each image gets its own (min, max) over its tokens and channels (ReduceMax/ReduceMin
over the batch at once), hence its own asymmetric scale and zero point, applied with a per-axis ``QuantizeLinear``;
the whole batch then runs as one integer matmul. ORT's CPU integer matmuls take only one activation zero point per
tensor, so the graph passes none and subtracts ``x_scale[b] * zero_point[b] * colsum(W) * w_scale`` (a small
[B, 1, N] tensor, folded into the bias) from ``x_scale[b] * (q @ W) * w_scale``, which ORT's fused
``MatMulIntegerToFloat`` computes with the per-channel weight scale (15% faster here than ``MatMulInteger`` + cast +
scale). Every step is per image and elementwise or an exact integer product, so an image's result is bit-identical
alone and in any batch.

Activations are quantized to [0, 127] like fbgemm's dynamic Linear (the torch backend), weights to symmetric INT8
per output channel. Attention runs as ORT's fused ``com.microsoft.MultiHeadAttention`` (one kernel for scores,
softmax and the weighted sum, instead of the exporter's transposes, matmuls and softmax), and where the input
projection stays FP32 (the ``paper`` mode) as ``com.microsoft.Attention``, which does that projection too (10-16%
faster per block on the tiny default than a MatMul, a bias Add and a Split before it). ``per_image=False`` writes
ORT's own per-tensor ``DynamicQuantizeLinear`` instead (8-bit, one scale per batch): a diagnosis of what the promise
costs, never what the engine runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

INPUT = "input"
OUTPUT = "output"
EXIT = "exit"  # a span's optional output: the unit embedding of the exit head at its last block [B, E]
FINAL = "final"  # a top span's optional output: the unit full-depth embedding [B, E]
# A gated span's extra inputs (the rows' label sets, see lraee_core.gate.GateQuestion) and outputs (GateAnswer).
TEXT = "text"  # [S, E] float32 unit text embeddings of every label set of the batch
COLUMNS = "columns"  # [B, W] int64: each row's label columns in TEXT
PADDING = "padding"  # [B, W] bool: the columns past each row's K
LOG_K = "log_k"  # [B, 1] float32: log K of each row's label set
ENTROPY_DIVISOR = "entropy_divisor"  # [B, 1] float32: -log K, or -1 for a single label (its entropy is 0)
PREVIOUS = "previous_top1"  # [B, 1] int64: each row's top-1 at the previous candidate layer (-1: none)
GATE_INPUTS = (TEXT, COLUMNS, PADDING, LOG_K, ENTROPY_DIVISOR, PREVIOUS)
LOGITS = "logits"  # [B, W] float32 each row's exit logits against its own labels (-inf past its K)
PROBABILITY = "probability"  # [B, 1] float32 gate probability
TOP1 = "top1"  # [B, 1] int64 each row's top-1 label index
# The gate features the graph computes (those of lraee_core.gate).
GATE_FEATURES = ("cos_top1", "cos_gap", "entropy_norm", "log_k", "sav", "agree_prev", "confidence", "margin")
OPSET = 21  # per-axis QuantizeLinear with a dynamic scale, LayerNormalization, Gelu
# Activations take 7 bits, [0, 127], as fbgemm's dynamic Linear does (reduce_range): without AVX-512 VNNI, ORT's
# u8s8 kernel adds pairs of u8*s8 products in int16 (VPMADDUBSW), which saturates for 8-bit activations. Measured
# on the everyday model's 12 blocks: relative L2 error vs FP32 0.020 with 255 levels, 0.0097 with 127 (torch's
# paper mode: 0.0098).
_LEVELS = 127.0
_WEIGHT_MAX = 127.0  # symmetric INT8 weights in [-127, 127]
IR_VERSION = 10  # what onnxruntime 1.18+ reads
# The Linears of a block that a quant mode may convert (names as lraee_core.quantize reports them, per block).
LINEARS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class UnsupportedBlock(ValueError):
    """A block whose structure the direct graph writer does not cover (the caller falls back to the exporter)."""


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 of a ``[K, N]`` matmul weight: (int8 [K, N], float32 scale [N])."""
    absmax = np.abs(weight).max(axis=0)
    scale = np.where(absmax > 0, absmax / _WEIGHT_MAX, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -_WEIGHT_MAX, _WEIGHT_MAX).astype(np.int8)
    return quantized, scale


@dataclass
class GraphWriter:
    """Accumulates nodes and initializers of one graph; every helper returns the name of its output tensor."""

    prefix: str = ""
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        """A fresh tensor name."""
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        """An initializer holding ``value``."""
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=dtype)), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        """One node with one output."""
        domain = attrs.pop("domain", None)
        output = self.name(hint or op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=self.name(op_type), domain=domain, **attrs)
        )
        return output

    def per_image_quantize(self, x: str, rank: int) -> tuple[str, str, str]:
        """Asymmetric 7-bit UINT8 of ``x`` [B, ...] with one (scale, zero point) per image: ONNX's
        ``DynamicQuantizeLinear`` formula over that image alone, on [0, 127]. Returns (quantized [B, ...] uint8,
        scale [B, 1, ..] float, scale x zero point [B, 1, ..] float: what the epilogue subtracts per image).

        Written in as few nodes as the formula allows (each node costs ORT a few microseconds, which is most of a
        block's time on a small model at batch 1). The formula's clip of the zero point to [0, 127] is left out
        because it cannot bite: low <= 0 <= high, so ``|low| / scale = 127 |low| / (high - low) <= 127`` up to one
        rounding (and ``Abs`` rather than ``Neg`` keeps a zero ``low`` at +0): the same bits as with the clip. The
        zero point is itself a ``QuantizeLinear`` of ``|low|`` by the image's scale (``round(|low| / scale)``, half to
        even, as ``Div`` + ``Round`` + ``Cast`` gave it), and ``DequantizeLinear`` turns it back into
        ``zero point x scale`` for the epilogue (one float product, as ``Mul`` gave it): 11 nodes where the same bits
        took 14. The ranges are reduced to [B] (``keepdims=0``): with ``keepdims=1`` ORT's reductions ran a 12-block
        ``full`` tower 8% slower at batch 32 here.

        The range's top is floored at ``127 * tiny`` (float32's smallest normal) rather than at 0: that one ``Max``
        both puts 0 in the range and keeps the scale positive on an all-zero image (scale ``tiny``; any positive
        scale quantizes it exactly, to the zero point). On every other image the floor is lost in rounding: the
        top is larger, or ``high - low`` is ``-low`` (exact unless ``|low|`` < ~1e-29)."""
        axes = self.const("axes", list(range(1, rank)), np.int64)
        floor = self.const("floor", _LEVELS * np.finfo(np.float32).tiny)
        high = self.op("Max", [self.op("ReduceMax", [x, axes], keepdims=0), floor])  # [B] range includes 0
        low = self.op("Min", [self.op("ReduceMin", [x, axes], keepdims=0), self.const("zero", 0.0)])
        scale = self.op("Div", [self.op("Sub", [high, low]), self.const("levels", _LEVELS)], "scale")
        zero_point = self.op("QuantizeLinear", [self.op("Abs", [low]), scale], "zero_point", axis=0)  # [B] 0..127
        quantized = self.op("QuantizeLinear", [x, scale, zero_point], "quantized", axis=0)  # per image
        scaled_zero_point = self.op("DequantizeLinear", [zero_point, scale], "scaled_zero_point", axis=0)
        per_image = self.const("per_image", [-1] + [1] * (rank - 1), np.int64)
        return (
            quantized,
            self.op("Reshape", [scale, per_image], "scale_b"),
            self.op("Reshape", [scaled_zero_point, per_image], "scaled_zero_point_b"),
        )

    def linear(
        self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, *, int8: bool, per_image: bool, rank: int = 3
    ) -> str:
        """``x @ weight.T + bias`` for an ``nn.Linear`` weight [N, K]; INT8 with activation scales per image
        (``per_image``) or per tensor."""
        w = weight.detach().float().numpy().T  # [K, N]
        if not int8 and rank == 2 and bias is not None:  # one Gemm (an exit head's Linears)
            return self.op("Gemm", [x, self.const("w", w), self.const("b", bias.detach().float().numpy())])
        if not int8:
            out = self.op("MatMul", [x, self.const("w", w)])
        else:
            w_int8, w_scale = quantize_weight(w)
            colsum = w_int8.astype(np.int64).sum(axis=0).astype(np.int32)  # [N]
            if not per_image:  # ORT's own per-tensor path (it fuses it into DynamicQuantizeMatMul)
                quantized, x_scale, x_zero_point = (self.name(n) for n in ("quantized", "scale", "zero_point"))
                self.nodes.append(
                    helper.make_node(
                        "DynamicQuantizeLinear", [x], [quantized, x_scale, x_zero_point], name=self.name("DQL")
                    )
                )
                product = self.op("MatMulInteger", [quantized, self.const("w_int8", w_int8, np.int8), x_zero_point])
                exact = self.op("Cast", [product], to=TensorProto.FLOAT)
                out = self.op("Mul", [exact, self.op("Mul", [x_scale, self.const("w_scale", w_scale)])])
                return out if bias is None else self.op("Add", [out, self.const("b", bias.detach().float().numpy())])
            quantized, x_scale, scaled_zero_point = self.per_image_quantize(x, rank)
            # x @ W.T ~ x_scale[b] * ((q - zp[b]) @ W_int8) * w_scale = x_scale[b] * (q @ W_int8 * w_scale)
            # - x_scale[b] * zp[b] * colsum(W_int8) * w_scale: one fused integer matmul with its per-column scale,
            # then one multiply and one add per output element; the zero-point term is a small [B, 1, N] tensor.
            product = self.op(
                "MatMulIntegerToFloat",
                [
                    quantized,
                    self.const("w_int8", w_int8, np.int8),
                    self.const("one", 1.0),
                    self.const("w_scale", w_scale),
                ],
                domain="com.microsoft",
            )
            zero_point_term = self.op(
                "Mul",
                [
                    scaled_zero_point,
                    self.const("colsum_scaled", colsum.astype(np.float32) * w_scale),
                ],
            )  # [B, 1, N]
            offset = (
                zero_point_term
                if bias is None
                else self.op("Sub", [self.const("b", bias.detach().float().numpy()), zero_point_term])
            )
            out = self.op("Mul", [product, x_scale])
            return self.op("Add", [out, offset]) if bias is not None else self.op("Sub", [out, offset])
        if bias is not None:
            out = self.op("Add", [out, self.const("b", bias.detach().float().numpy())])
        return out

    def layer_norm(self, x: str, norm: nn.Module) -> str:
        """``nn.LayerNorm`` over the last axis (open_clip's LayerNorm casts, a no-op in FP32)."""
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or len(norm.normalized_shape) != 1:
            raise UnsupportedBlock(f"norm {type(norm).__name__} is not an affine LayerNorm over the last axis")
        return self.op(
            "LayerNormalization",
            [
                x,
                self.const("ln_w", norm.weight.detach().float().numpy()),
                self.const("ln_b", norm.bias.detach().float().numpy()),
            ],
            axis=-1,
            epsilon=float(norm.eps),
        )

    def layer_scale(self, x: str, module: nn.Module) -> str:
        """open_clip's LayerScale (``x * gamma``) or Identity."""
        if isinstance(module, nn.Identity):
            return x
        gamma = getattr(module, "gamma", None)
        if not isinstance(gamma, torch.Tensor):
            raise UnsupportedBlock(f"layer scale {type(module).__name__} has no gamma")
        return self.op("Mul", [x, self.const("gamma", gamma.detach().float().numpy())])


def _activation(writer: GraphWriter, x: str, module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return writer.op("Gelu", [x])
    if name == "QuickGELU":  # x * sigmoid(1.702 x), OpenAI's CLIP weights
        return writer.op("Mul", [x, writer.op("Sigmoid", [writer.op("Mul", [x, writer.const("k", 1.702)])])])
    raise UnsupportedBlock(f"MLP activation {name} is not supported by the direct graph writer")


def _check_block(block: nn.Module) -> tuple[nn.MultiheadAttention, Any]:  # Any: the MLP's children are dynamic
    attention = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    if not isinstance(attention, nn.MultiheadAttention) or not attention.batch_first:
        raise UnsupportedBlock("expected a batch-first nn.MultiheadAttention")
    if attention.in_proj_weight is None or attention.bias_k is not None or attention.add_zero_attn:
        raise UnsupportedBlock("expected packed input projections without bias_k / zero attention")
    if not isinstance(mlp, nn.Sequential) or list(mlp._modules) != ["c_fc", "gelu", "c_proj"]:
        raise UnsupportedBlock("expected an MLP of c_fc, activation, c_proj (no ln inside)")
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedBlock("cross-attention blocks are not supported")
    return attention, mlp


def _write_block(w: GraphWriter, x: str, block: nn.Module, quantize: frozenset[str], per_image: bool) -> str:
    """Append one ``ResidualAttentionBlock`` reading ``x`` [B, T, D]; returns its output's name."""
    attention, mlp = _check_block(block)
    width, heads = attention.embed_dim, attention.num_heads
    normed = w.layer_norm(x, block.ln_1)  # type: ignore[arg-type]
    if "attn.in_proj" not in quantize:  # FP32 projections: ORT's Attention does the QKV GEMM and attention at once
        weights = attention.in_proj_weight.detach().float().numpy().T.copy()  # [D, 3D]
        bias = attention.in_proj_bias.detach().float().numpy()
        packed = [normed, w.const("qkv_w", weights), w.const("qkv_b", bias)]
        attended = w.op("Attention", packed, domain="com.microsoft", num_heads=heads)  # [B, T, D]
    else:
        qkv = w.linear(normed, attention.in_proj_weight, attention.in_proj_bias, int8=True, per_image=per_image)
        q, k, v = (w.name(part) for part in "qkv")
        split = w.const("split", [width] * 3, np.int64)
        w.nodes.append(helper.make_node("Split", [qkv, split], [q, k, v], axis=-1, name=w.name("Split")))
        attended = w.op("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=heads)  # [B, T, D]
    out = attention.out_proj
    projected = w.linear(attended, out.weight, out.bias, int8="attn.out_proj" in quantize, per_image=per_image)
    hidden = w.op("Add", [x, w.layer_scale(projected, block.ls_1)])  # type: ignore[arg-type]
    fc = w.linear(
        w.layer_norm(hidden, block.ln_2),  # type: ignore[arg-type]
        mlp.c_fc.weight,
        mlp.c_fc.bias,
        int8="mlp.c_fc" in quantize,
        per_image=per_image,
    )
    activated = _activation(w, fc, mlp.gelu)
    proj = w.linear(activated, mlp.c_proj.weight, mlp.c_proj.bias, int8="mlp.c_proj" in quantize, per_image=per_image)
    return w.op("Add", [hidden, w.layer_scale(proj, block.ls_2)], "residual")  # type: ignore[arg-type]


def _unit(w: GraphWriter, x: str) -> str:
    """``F.normalize(x, dim=-1)``: x / max(||x||, 1e-12) over the last axis of [B, E]."""
    norm = w.op("ReduceL2", [x, w.const("last", [-1], np.int64)], keepdims=1)
    return w.op("Div", [x, w.op("Max", [norm, w.const("eps", 1e-12)])])


def _token(w: GraphWriter, hidden: str, index: int) -> str:
    """Token ``index`` of every image: [B, T, D] -> [B, D]."""
    scalar = w.name("token")  # a 0-d index (``const`` would make it 1-d), so Gather drops the token axis
    w.initializers.append(numpy_helper.from_array(np.array(index, dtype=np.int64), scalar))
    return w.op("Gather", [hidden, scalar], axis=1)


def _write_exit_head(w: GraphWriter, hidden: str, head: Any) -> str:  # Any: a lraee_core.heads.ExitHead
    """An exit head (pool, LayerNorm, Linear, GELU, Linear, L2 normalisation) in FP32: [B, T, D] -> [B, E]."""
    pooling = head.config.pooling
    if pooling == "cls":
        pooled = _token(w, hidden, 0)
    elif pooling == "ssa":  # mean of the patch tokens, [CLS] excluded
        patches = w.op(
            "Slice",
            [
                hidden,
                w.const("start", [1], np.int64),
                w.const("end", [2**62], np.int64),
                w.const("axis", [1], np.int64),
            ],
        )
        pooled = w.op("ReduceMean", [patches, w.const("tokens", [1], np.int64)], keepdims=0)
    else:
        raise UnsupportedBlock(f"exit head pooling {pooling!r}")
    x = w.layer_norm(pooled, head.norm)
    x = _activation(w, w.linear(x, head.fc1.weight, head.fc1.bias, int8=False, per_image=False, rank=2), head.act)
    return _unit(w, w.linear(x, head.fc2.weight, head.fc2.bias, int8=False, per_image=False, rank=2))


def _write_final(w: GraphWriter, hidden: str, visual: Any) -> str:  # Any: an open_clip VisionTransformer
    """open_clip's [CLS] ('tok') pooling, ln_post and projection, then L2 normalisation: [B, T, D] -> [B, E]. LayerNorm
    acts per token, so ln_post before or after taking the [CLS] token is the same."""
    if not final_in_graph(visual):
        raise UnsupportedBlock("the final pooling in the graph covers [CLS] ('tok') pooling only")
    pooled = _token(w, hidden, 0)
    if not isinstance(visual.ln_post, nn.Identity):
        pooled = w.layer_norm(pooled, visual.ln_post)
    if visual.proj is not None:
        pooled = w.op("MatMul", [pooled, w.const("proj", visual.proj.detach().float().numpy())])
    return _unit(w, pooled)


def _top2(w: GraphWriter, x: str, filler: float) -> str:
    """The two largest entries of each row of ``x`` [B, W] as one [B, 2] tensor. One column of ``filler`` is
    appended first (a single ``Pad``), so a row with one entry gets ``filler`` as its runner-up, even when W is 1;
    -inf padding columns lie below it and are never picked."""
    padded = w.op("Pad", [x, w.const("pads", [0, 0, 0, 1], np.int64), w.const("filler", filler)])
    values = w.name("top2")
    w.nodes.append(
        helper.make_node(
            "TopK", [padded, w.const("two", [2], np.int64)], [values, w.name("top2_index")], axis=1, name=w.name("TopK")
        )
    )
    return values


def _write_gate(
    w: GraphWriter, hidden: str, embedding: str, gate: Any, logit_scale: float, tokens: int | None
) -> tuple[str, str, str]:
    """The exit gate on a head's unit embedding ``embedding`` [B, E] (``gate``: a lraee_core.gate.GateParams), as
    :func:`lraee_core.gate.gate_features` and :meth:`GateParams.probability` compute it in PyTorch (equal within
    float rounding): returns (logits [B, W], probability [B, 1], top1 [B, 1]).

    Written in few nodes: every node costs ORT a few microseconds, and a gated span runs at every candidate layer.
    The gate is linear in its features, so a feature that is itself linear in a tensor the graph has anyway is not
    computed as a column: that tensor enters the gate's one ``Gemm`` with the feature's weight spread over it.

    * ``cos_top1`` and ``cos_gap`` are ``t1 / s`` and ``(t1 - t2) / s`` for the top two logits ``t1, t2`` (``s``:
      the logit scale): the [B, 2] ``TopK`` values enter with weights ``(w_top1 + w_gap) / s`` and ``-w_gap / s``.
      A row with a single label gets the appended lowest logit (cosine -1) as its runner-up, which gives
      ``cos_gap`` = top-1 + 1 exactly as PyTorch's rule does; its -inf padding lies below that and is never picked.
    * ``confidence`` and ``margin`` are ``p1`` and ``p1 - p2`` of the top two probabilities, likewise (a single
      label's runner-up has probability 0).
    * ``sav`` = Var(n) / Mean(n)^2 over the patch tokens' norms ``n`` is ``mean((n / m)^2) - 1``: the squared
      ratios [B, T] enter with weight ``w_sav / N`` on each patch column (0 on [CLS]) and the ``- w_sav`` joins the
      bias; the mean ``m`` is one MatMul of the norms of every token with those same column weights.
    * ``entropy_norm`` (the entropy divided by the fed :data:`ENTROPY_DIVISOR`, -log K or -1 for one label, whose
      entropy is 0), ``log_k`` (fed) and ``agree_prev`` enter as [B, 1] columns.
    """
    features = gate.features
    unknown = [name for name in features if name not in GATE_FEATURES]
    if unknown:
        raise UnsupportedBlock(f"gate feature {unknown[0]!r}")
    if "sav" in features and tokens is None:
        raise ValueError("the 'sav' gate feature needs the token count: pass tokens (or embed)")
    weights = dict(zip(features, (float(value) for value in gate.weight), strict=True))
    bias = float(gate.bias)
    every = w.op("Gemm", [embedding, TEXT], transB=1, alpha=float(logit_scale))  # [B, S], scale x cosine
    gathered = w.op("GatherElements", [every, COLUMNS], axis=1)  # [B, W] each row's own labels
    logits = w.op("Where", [PADDING, w.const("minus_inf", -np.inf), gathered])
    top1 = w.op("ArgMax", [logits], axis=-1, keepdims=1)  # [B, 1]
    columns: list[str] = []  # [B, n] tensors, side by side the gate's input
    column_weights: list[np.ndarray] = []  # the gate's weights of each, [n]
    if "cos_top1" in features or "cos_gap" in features:
        top1_weight, gap_weight = weights.get("cos_top1", 0.0), weights.get("cos_gap", 0.0)
        columns.append(_top2(w, logits, -logit_scale))  # the lowest logit (cosine -1) as a lone label's runner-up
        column_weights.append(np.array([(top1_weight + gap_weight) / logit_scale, -gap_weight / logit_scale]))
    if {"entropy_norm", "confidence", "margin"} & set(features):
        probs = w.op("Softmax", [logits], axis=-1)  # padding gets 0
        if "entropy_norm" in features:
            logs = w.op("Log", [w.op("Max", [probs, w.const("floor", 1e-30)])])
            minus_entropy = w.op(
                "ReduceSum", [w.op("Mul", [probs, logs]), w.const("last", [-1], np.int64)], keepdims=1
            )  # [B, 1]
            columns.append(w.op("Div", [minus_entropy, ENTROPY_DIVISOR]))
            column_weights.append(np.array([weights["entropy_norm"]]))
        if "confidence" in features or "margin" in features:
            confidence_weight, margin_weight = weights.get("confidence", 0.0), weights.get("margin", 0.0)
            columns.append(_top2(w, probs, 0.0))  # one label: the runner-up has probability 0
            column_weights.append(np.array([confidence_weight + margin_weight, -margin_weight]))
    if "log_k" in features:
        columns.append(LOG_K)
        column_weights.append(np.array([weights["log_k"]]))
    if "sav" in features:
        assert tokens is not None  # checked above
        patch_weights = np.full(tokens, 1.0 / (tokens - 1))
        patch_weights[0] = 0.0  # [CLS] is not a patch
        norms = w.op("ReduceL2", [hidden, w.const("width", [-1], np.int64)], keepdims=0)  # [B, T]
        mean = w.op("MatMul", [norms, w.const("patch_mean", patch_weights[:, None])])  # [B, 1]
        ratios = w.op("Div", [norms, w.op("Max", [mean, w.const("eps", 1e-12)])])
        columns.append(w.op("Mul", [ratios, ratios]))
        column_weights.append(weights["sav"] * patch_weights)
        bias -= weights["sav"]
    if "agree_prev" in features:
        columns.append(w.op("Cast", [w.op("Equal", [top1, PREVIOUS])], to=TensorProto.FLOAT))
        column_weights.append(np.array([weights["agree_prev"]]))
    joined = columns[0] if len(columns) == 1 else w.op("Concat", columns, axis=1)  # [B, F']
    stacked = np.concatenate(column_weights).astype(np.float32)[:, None]  # [F', 1]
    score = w.op("Gemm", [joined, w.const("gate_w", stacked), w.const("gate_b", [bias])])
    return logits, w.op("Sigmoid", [score]), top1


def final_in_graph(visual: Any) -> bool:  # Any: an open_clip VisionTransformer
    """Whether :func:`blocks_graph` can write ``visual``'s final pooling (else the caller pools in PyTorch)."""
    return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"


def blocks_graph(
    blocks: Sequence[nn.Module],
    *,
    quantize: frozenset[str] = frozenset(),
    per_image: bool = True,
    head: Any | None = None,  # Any: a lraee_core.heads.ExitHead
    final: Any | None = None,  # Any: the open_clip VisionTransformer whose final pooling to append
    gate: Any | None = None,  # Any: a lraee_core.gate.GateParams, evaluated on the head's embedding
    logit_scale: float = 1.0,  # CLIP's temperature, for the gate's logits
    embed: Any | None = None,  # Any: the open_clip VisionTransformer whose embedding stage comes first
    tokens: int | None = None,  # tokens per image (T); the gate's 'sav' needs it, taken from ``embed`` if given
) -> onnx.ModelProto:
    """Consecutive open_clip ``ResidualAttentionBlock`` s (batch-first self-attention) as one ONNX graph
    ``input`` [B, T, D] -> ``output`` [B, T, D], plus ``exit`` [B, E] (the unit embedding of exit ``head`` read at the
    last block) when a head is given and ``final`` [B, E] (the unit full-depth embedding) when the tower is. A
    ``gate`` (with a head) adds the inputs :data:`GATE_INPUTS` and the outputs ``logits``, ``probability`` and
    ``top1`` (see :func:`_write_gate`); a gate that reads ``sav`` needs ``tokens`` (T, the token count: its patch
    mean is a MatMul of fixed width) unless ``embed`` gives it. With ``embed`` the graph starts from the images:
    ``input`` is [B, 3, H, W] and the embedding stage (:func:`_write_embed`) runs first.

    ``quantize`` names the Linears of every block that run INT8 (:data:`LINEARS`); ``per_image``: activation scales
    per image (the engine's promise) or, False, one per tensor as a bare ``quantize_dynamic`` (diagnosis only).
    The head and the final pooling run in FP32, as in PyTorch (equal to it within float rounding).
    :class:`UnsupportedBlock` for structures this writer does not cover (cross-attention norms, ``ln_attn``,
    ``ln_inner``, other activations).
    """
    unknown = set(quantize) - set(LINEARS)
    if unknown:
        raise ValueError(f"unknown Linears to quantize: {sorted(unknown)}; expected some of {LINEARS}")
    if not blocks:
        raise ValueError("no blocks to write")
    w = GraphWriter()
    hidden = INPUT
    if tokens is None and embed is not None:
        tokens = int(embed.positional_embedding.shape[0])
    if embed is not None:
        w.prefix = "embed/"
        hidden = _write_embed(w, INPUT, embed)
    for index, block in enumerate(blocks):
        w.prefix = f"b{index}/"
        hidden = _write_block(w, hidden, block, quantize, per_image)
    # Graph outputs take the names of the tensors that hold them (renamed at the end, consumers included), so no
    # Identity node copies them.
    renames = {hidden: OUTPUT}
    width = _check_block(blocks[0])[0].embed_dim
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", "tokens", width])]
    inputs = [
        _images_input(embed)
        if embed is not None
        else helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", "tokens", width])
    ]
    if gate is not None and head is None:
        raise ValueError("a gate reads an exit head's embedding: pass the head too")
    for name, write, module in ((EXIT, _write_exit_head, head), (FINAL, _write_final, final)):
        if module is not None:
            w.prefix = f"{name}/"
            written = write(w, hidden, module)
            renames[written] = name
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "embed"]))
            if name == EXIT and gate is not None:
                w.prefix = "gate/"
                for output, value in zip(
                    (LOGITS, PROBABILITY, TOP1), _write_gate(w, hidden, written, gate, logit_scale, tokens), strict=True
                ):
                    renames[value] = output
                outputs += [
                    helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "labels"]),
                    helper.make_tensor_value_info(PROBABILITY, TensorProto.FLOAT, ["batch", 1]),
                    helper.make_tensor_value_info(TOP1, TensorProto.INT64, ["batch", 1]),
                ]
                inputs += [
                    helper.make_tensor_value_info(TEXT, TensorProto.FLOAT, ["set_labels", "embed"]),
                    helper.make_tensor_value_info(COLUMNS, TensorProto.INT64, ["batch", "labels"]),
                    helper.make_tensor_value_info(PADDING, TensorProto.BOOL, ["batch", "labels"]),
                    helper.make_tensor_value_info(LOG_K, TensorProto.FLOAT, ["batch", 1]),
                    helper.make_tensor_value_info(ENTROPY_DIVISOR, TensorProto.FLOAT, ["batch", 1]),
                    helper.make_tensor_value_info(PREVIOUS, TensorProto.INT64, ["batch", 1]),
                ]
    for node in w.nodes:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    graph = helper.make_graph(w.nodes, f"blocks{len(blocks)}", inputs, outputs, w.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = IR_VERSION
    return model


def _write_embed(w: GraphWriter, images: str, visual: Any) -> str:  # Any: an open_clip VisionTransformer
    """open_clip's ``VisionTransformer._embeds`` (patch convolution, [CLS], positions, ln_pre) in FP32 on ``images``
    [B, 3, H, W]: returns layer 0, [B, T, D].

    The [CLS] row is made by padding one zero token in front and adding ``class_embedding + positional[0]`` (one
    float addition, as PyTorch does at run time), so the graph needs no batch-sized expand and concat.
    """
    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or conv.bias is not None or conv.stride != conv.kernel_size:
        raise UnsupportedBlock("expected a bias-free patch convolution with stride = kernel size")
    dropout = getattr(visual, "patch_dropout", None)
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Module) and not dropout.training)):
        raise UnsupportedBlock("patch dropout must be inactive (eval mode)")
    class_embedding = visual.class_embedding.detach().float().numpy()  # [D]
    positions = visual.positional_embedding.detach().float().numpy().copy()  # [T, D]
    positions[0] = class_embedding + positions[0]
    patches = w.op(
        "Conv",
        [images, w.const("patch_w", conv.weight.detach().float().numpy())],
        kernel_shape=list(conv.kernel_size),
        strides=list(conv.stride),
    )  # [B, D, g, g]
    tokens = w.op(
        "Transpose", [w.op("Reshape", [patches, w.const("grid", [0, 0, -1], np.int64)])], perm=[0, 2, 1]
    )  # [B, g*g, D]
    padded = w.op("Pad", [tokens, w.const("pads", [0, 1, 0, 0, 0, 0], np.int64)])  # [B, T, D], row 0 zeros
    hidden = w.op("Add", [padded, w.const("positions", positions)])
    norm = visual.ln_pre
    return hidden if isinstance(norm, nn.Identity) else w.layer_norm(hidden, norm)


def _images_input(visual: Any) -> onnx.ValueInfoProto:  # Any: an open_clip VisionTransformer
    size = list(getattr(visual, "image_size", (None, None)))
    return helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, *size])


def embed_graph(visual: Any) -> onnx.ModelProto:  # Any: an open_clip VisionTransformer
    """The embedding stage alone (:func:`_write_embed`) as an ONNX graph ``input`` [B, 3, H, W] -> ``output``
    [B, T, D], all FP32."""
    w = GraphWriter(prefix="embed/")
    out = _write_embed(w, INPUT, visual)
    w.nodes.append(helper.make_node("Identity", [out], [OUTPUT], name="output"))
    tokens, width = visual.positional_embedding.shape
    graph = helper.make_graph(
        w.nodes,
        "embed",
        [_images_input(visual)],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", int(tokens), int(width)])],
        w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model
