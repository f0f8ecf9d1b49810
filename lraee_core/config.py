"""Frozen configuration of the LRA-EE engine.

Layer numbering: everywhere in this project a *layer* ``l`` is the hidden state after ``l`` transformer blocks,
counted from 1, so ``l == num_layers`` is the output of the last block. The paper numbers blocks from 0: its
"Layer 8" is our layer 9 and its "Layer 11" (the last block of ViT-B/32) is our layer 12.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


Thresholds = Mapping[int, float]  # candidate layer -> gate threshold (>= 1.0, or a missing layer: never leaves there)


@dataclass(frozen=True)
class OperatingPoint:
    """One named promise and the thresholds that keep it, per label count.

    A request's label count K is known before its image runs, and how sure a gate must be for an exit to keep the
    promise depends on K. So a point holds thresholds calibrated at some label counts (``by_label_count``, K
    ascending) and :meth:`thresholds_at` gives those of any K: the calibrated ones at a calibrated K, between two
    calibrated counts each layer's threshold interpolated linearly in log K (monotone between its neighbours), below
    the smallest the smallest's. Above ``label_cap`` no head runs: the request gets the `full` answer at the `full`
    cost. Without a cap, the largest calibrated K's thresholds hold above it.
    """

    name: str  # e.g. "accurate", "balanced", "fast"
    by_label_count: tuple[tuple[int, Thresholds], ...] = ()  # (K, thresholds) at each calibrated K, K ascending;
    # one entry at K = 1 means the same thresholds at every K (manifests before format 4)
    promise: float | None = None  # agreement with the full-depth top-1 promised on held-out images; None: none
    # The most labels a request may have for this point's exit heads to run; a request with more is answered as
    # `full` answers it (no head or gate runs: calibration found they cost more there than early exits saved, or
    # it calibrated no larger K). None: no cap.
    label_cap: int | None = None

    def __post_init__(self) -> None:
        counts = [k for k, _ in self.by_label_count]
        if counts != sorted(set(counts)) or (counts and counts[0] < 1):
            raise ValueError(f"operating point {self.name!r}: label counts {counts} must be ascending, unique, >= 1")

    @classmethod
    def uniform(
        cls, name: str, thresholds: Thresholds, promise: float | None = None, label_cap: int | None = None
    ) -> OperatingPoint:
        """One set of thresholds for every label count."""
        return cls(name, ((1, dict(thresholds)),), promise, label_cap)

    @property
    def thresholds(self) -> dict[int, float]:
        """The thresholds at the smallest calibrated label count (every K's when there is one set)."""
        return dict(self.by_label_count[0][1]) if self.by_label_count else {}

    def thresholds_at(self, count: int) -> dict[int, float] | None:
        """The thresholds a request of ``count`` labels follows; None above the label cap (no heads run)."""
        if self.label_cap is not None and count > self.label_cap:
            return None
        return interpolate_thresholds(self.by_label_count, count)


def interpolate_thresholds(curve: Sequence[tuple[int, Thresholds]], count: int) -> dict[int, float]:
    """Thresholds at label count ``count`` from calibrated ``(K, thresholds)`` pairs, K ascending (see
    :class:`OperatingPoint`); a layer missing at either neighbour never leaves in between. The training pipeline's
    simulation calls this too, so the engine and the calibration compare the same float32 values."""
    if not curve:
        return {}
    if count <= curve[0][0]:
        return dict(curve[0][1])
    if count >= curve[-1][0]:
        return dict(curve[-1][1])
    upper = next(index for index, (k, _) in enumerate(curve) if k >= count)
    (low_k, low), (high_k, high) = curve[upper - 1], curve[upper]
    if high_k == count:
        return dict(high)
    weight = (math.log(count) - math.log(low_k)) / (math.log(high_k) - math.log(low_k))
    return {layer: low[layer] + weight * (high[layer] - low[layer]) if layer in high else 1.0 for layer in low}


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

    def label_cap(self, name: str | None) -> int | None:
        """The label cap of an operating point (:meth:`point`)."""
        return self.point(name).label_cap

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the operating points a request may ask for: the stored ones, then ``full``."""
        return (*(p.name for p in self.operating_points), FULL_OPERATING_POINT)
