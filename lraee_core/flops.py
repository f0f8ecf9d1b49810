"""Analytic FLOPs of the staged vision tower, the exit heads and the gates.

Convention: FLOPs = 2 x multiply-accumulates of the matmul-like operations (patch-embedding convolution, the
projections, attention scores and attention-weighted values, the MLPs, the zero-shot logits), which is what
``torch.utils.flop_counter.FlopCounterMode`` counts; LayerNorm, softmax, GELU and residual additions are left out
of the blocks and heads, as fvcore and the paper's per-block accounting do. The gate's features are elementwise, so
its cost is an explicit estimate (token norms, softmax, the 3-weight dot product); it is orders of magnitude below a
head and reported separately.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from .backbone import VisionShape


@dataclass(frozen=True)
class FlopsModel:
    """Per-image FLOPs of each stage, for a label set of ``num_labels`` prompts."""

    embed: int  # patch-embedding convolution
    block: int  # one transformer block at the real token count
    final: int  # full-depth pooling projection + zero-shot logits
    head: int  # one exit head (MLP) + its zero-shot logits
    gate: int  # one gate: feature computation + logistic regression (elementwise estimate)
    num_layers: int  # blocks in the tower

    @property
    def full_depth(self) -> int:
        """FLOPs of the plain full-depth CLIP path: what early exit is measured against."""
        return self.embed + self.num_layers * self.block + self.final

    def spent(self, exit_layer: int, exit_points_evaluated: int, took_full_path: bool) -> int:
        """FLOPs an image actually cost: blocks run, every head+gate evaluated on it, the final path if taken."""
        cost = self.embed + exit_layer * self.block + exit_points_evaluated * (self.head + self.gate)
        return cost + (self.final if took_full_path else 0)

    def saved(self, spent: int) -> float:
        """Fraction of full-depth FLOPs not spent (negative when heads cost more than the blocks skipped)."""
        return 1.0 - spent / self.full_depth

    def expected_saving(self, candidate_layers: Sequence[int], exit_shares: dict[int | str, float]) -> float:
        """FLOPs saving of an exit mix: shares per candidate layer plus "full"; heads evaluated up to the exit."""
        total = 0.0
        for key, share in exit_shares.items():
            if key == "full":
                cost = self.spent(self.num_layers, len(candidate_layers), True)
            else:
                layer = int(key)
                cost = self.spent(layer, sum(1 for c in candidate_layers if c <= layer), False)
            total += share * cost
        return self.saved(round(total))


def block_flops(shape: VisionShape) -> int:
    """One pre-norm ViT block at T tokens: QKV, scores, attention x V, output projection, 2-layer MLP."""
    t, d, m = shape.num_tokens, shape.width, shape.mlp_width
    qkv = 2 * t * d * 3 * d
    scores = 2 * t * t * d  # summed over heads: heads x T x T x head_dim
    weighted = 2 * t * t * d
    out = 2 * t * d * d
    mlp = 2 * t * d * m * 2
    return qkv + scores + weighted + out + mlp


def embed_flops(shape: VisionShape) -> int:
    """Patch-embedding convolution: one D x (3 p^2) matmul per patch."""
    patches = shape.num_tokens - 1
    return 2 * patches * 3 * shape.patch_size * shape.patch_size * shape.width


def head_flops(width: int, hidden_dim: int, embed_dim: int, num_labels: int) -> int:
    """One exit head's MLP plus the cosine logits against ``num_labels`` text embeddings."""
    return 2 * width * hidden_dim + 2 * hidden_dim * embed_dim + 2 * embed_dim * num_labels


def gate_flops(shape: VisionShape, num_labels: int) -> int:
    """Gate estimate: patch-token squared norms (2 T D), softmax over labels (~3 K), 3 features x 2."""
    return 2 * (shape.num_tokens - 1) * shape.width + 3 * num_labels + 2 * 3


@functools.lru_cache(maxsize=1024)
def flops_model(shape: VisionShape, head_hidden_dim: int, num_labels: int) -> FlopsModel:
    """FLOPs of every stage for this tower, head width and label-set size (made once per triple: the engine asks
    for it on every call)."""
    return FlopsModel(
        embed=embed_flops(shape),
        block=block_flops(shape),
        final=2 * shape.width * shape.embed_dim + 2 * shape.embed_dim * num_labels,
        head=head_flops(shape.width, head_hidden_dim, shape.embed_dim, num_labels),
        gate=gate_flops(shape, num_labels),
        num_layers=shape.num_layers,
    )
