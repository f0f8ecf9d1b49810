"""Frozen configuration of the LRA-EE engine.

Layer numbering: everywhere in this project a *layer* ``l`` is the hidden state after ``l`` transformer blocks,
counted from 1, so ``l == num_layers`` is the output of the last block. The paper numbers blocks from 0: its
"Layer 8" is our layer 9 and its "Layer 11" (the last block of ViT-B/32) is our layer 12.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

QuantMode = Literal["none", "paper", "full"]
Pooling = Literal["ssa", "cls"]
Loss = Literal["distilled", "hard"]

QUANT_MODES: tuple[QuantMode, ...] = ("none", "paper", "full")


@dataclass(frozen=True)
class BackboneConfig:
    """Which open_clip CLIP to build."""

    model_name: str  # open_clip architecture name, e.g. "ViT-B-32", or a name registered from a JSON config
    pretrained: str | None = None  # open_clip pretrained tag (hub download), a local weights file, or None: random
    model_config_file: str | None = None  # JSON architecture registered with open_clip.add_model_config first
    random_init_seed: int = 0  # seed used when pretrained is None, so random-weight backbones are reproducible


@dataclass(frozen=True)
class QuantConfig:
    """How the vision tower is quantized. The text tower is never quantized."""

    mode: QuantMode = "paper"  # "paper": dynamic INT8 of nn.Linear modules (the MLPs in open_clip 3.3.0 ViTs);
    # "full": also the attention input/output projections; "none": FP32 (baselines)


@dataclass(frozen=True)
class HeadConfig:
    """Shape of one exit head (the same for every candidate layer)."""

    pooling: Pooling = "ssa"  # "ssa": mean of the patch tokens ([CLS] excluded); "cls": the [CLS] token (baseline)
    width: int = 768  # input width: the vision transformer's width
    hidden_dim: int = 768  # hidden width of the 2-layer MLP
    embed_dim: int = 512  # output width: CLIP's joint embedding width


@dataclass(frozen=True)
class GateConfig:
    """The learned gate: logistic regression on three per-image features."""

    features: tuple[str, ...] = ("confidence", "margin", "sav")  # order of the gate's input features


@dataclass(frozen=True)
class OperatingPoint:
    """One named set of per-layer thresholds."""

    name: str  # e.g. "accurate", "balanced", "fast"
    thresholds: dict[int, float] = field(default_factory=dict)  # layer -> gate threshold; >= 1.0 never exits


@dataclass(frozen=True)
class ExitPolicy:
    """Where images may leave and at which gate probability."""

    candidate_layers: tuple[int, ...]  # layers (1-based) that carry an exit head and gate, ascending
    operating_points: tuple[OperatingPoint, ...]  # named threshold sets stored in the checkpoint
    default_operating_point: str  # the one used when a request names none

    def thresholds(self, name: str | None) -> dict[int, float]:
        """Thresholds of an operating point (the default when ``name`` is None); KeyError when unknown."""
        wanted = name or self.default_operating_point
        for point in self.operating_points:
            if point.name == wanted:
                return point.thresholds
        raise KeyError(wanted)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the stored operating points."""
        return tuple(p.name for p in self.operating_points)
