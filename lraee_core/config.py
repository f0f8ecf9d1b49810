"""Frozen configuration of the LRA-EE engine.

Layer numbering: everywhere in this project a *layer* ``l`` is the hidden state after ``l`` transformer blocks,
counted from 1, so ``l == num_layers`` is the output of the last block. The paper numbers blocks from 0: its
"Layer 8" is our layer 9 and its "Layer 11" (the last block of ViT-B/32) is our layer 12.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

QuantMode = Literal["none", "paper", "full", "static", "static-a6", "static-a4"]
Pooling = Literal["ssa", "cls"]
Loss = Literal["embed", "distilled", "hard"]  # head training losses (training.pipeline.heads)

# static*: fixed activation scales calibrated offline (lraee_core.static_quant); -a6/-a4 simulate fewer activation bits
QUANT_MODES: tuple[QuantMode, ...] = ("none", "paper", "full", "static", "static-a6", "static-a4")
FULL_OPERATING_POINT = "full"  # built into every checkpoint: no exits, no heads, the full-depth CLIP answer


@dataclass(frozen=True)
class BackboneConfig:
    """Which open_clip CLIP to build."""

    model_name: str  # open_clip architecture name, e.g. "ViT-B-32", or a name registered from a JSON config
    pretrained: str | None = None  # open_clip pretrained tag (hub download), a local weights file, or None: random
    model_config_file: str | None = None  # JSON architecture registered with open_clip.add_model_config first
    random_init_seed: int = 0  # seed used when pretrained is None, so random-weight backbones are reproducible


@dataclass(frozen=True)
class HeadConfig:
    """Shape of one exit head (the same for every candidate layer)."""

    pooling: Pooling = "ssa"  # "ssa": mean of the patch tokens ([CLS] excluded); "cls": the [CLS] token (baseline)
    width: int = 768  # input width: the vision transformer's width
    hidden_dim: int = 768  # hidden width of the 2-layer MLP
    embed_dim: int = 512  # output width: CLIP's joint embedding width


@dataclass(frozen=True)
class OperatingPoint:
    """One named set of per-layer thresholds."""

    name: str  # e.g. "accurate", "balanced", "fast"
    thresholds: dict[int, float] = field(default_factory=dict)  # layer -> gate threshold; >= 1.0 never exits
    promise: float | None = None  # agreement with the full-depth top-1 promised on held-out images; None: none
    # The most labels a request may have for this point's exit heads to run; a request with more is answered as
    # `full` answers it (no head or gate runs: calibration found they cost more there than early exits saved).
    # None: no cap.
    label_cap: int | None = None


@dataclass(frozen=True)
class ExitPolicy:
    """Where images may leave and at which gate probability."""

    candidate_layers: tuple[int, ...]  # layers (1-based) that carry an exit head and gate, ascending
    operating_points: tuple[OperatingPoint, ...]  # named threshold sets stored in the checkpoint
    default_operating_point: str  # the one used when a request names none

    def point(self, name: str | None) -> OperatingPoint:
        """An operating point by name (the default when ``name`` is None); KeyError when unknown.

        ``full`` is built in: no thresholds (it never runs a head, see :mod:`lraee_core.exits`) and no label cap."""
        wanted = name or self.default_operating_point
        if wanted == FULL_OPERATING_POINT:
            return OperatingPoint(FULL_OPERATING_POINT)
        for point in self.operating_points:
            if point.name == wanted:
                return point
        raise KeyError(wanted)

    def thresholds(self, name: str | None) -> dict[int, float]:
        """Thresholds of an operating point (:meth:`point`)."""
        return self.point(name).thresholds

    def label_cap(self, name: str | None) -> int | None:
        """The label cap of an operating point (:meth:`point`)."""
        return self.point(name).label_cap

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the operating points a request may ask for: the stored ones, then ``full``."""
        return (*(p.name for p in self.operating_points), FULL_OPERATING_POINT)
