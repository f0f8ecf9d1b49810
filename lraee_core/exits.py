"""Exit rules: how the engine decides, per image and candidate layer, whether an image leaves.

* an operating point's thresholds: leave at the first candidate layer whose gate probability reaches the layer's
  threshold (>= 1.0 never leaves there); every candidate head and gate on the way is evaluated;
* ``full``: no exits and no heads evaluated: the plain full-depth CLIP answer, the reference the operating points'
  agreement promises are measured against;
* a forced per-image exit mix (benchmarks only): image i leaves at the candidate layer ``forced[i]`` (None: full
  depth), whatever its gate says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .config import FULL_OPERATING_POINT
from .gate import exits


@dataclass(frozen=True)
class ExitRule:
    """One way of deciding exits for a batch (build it with the class methods)."""

    name: str  # operating point name, "full", "forced" or "custom"
    thresholds: Mapping[int, float] = field(default_factory=dict)  # layer -> gate threshold (missing: never leaves)
    forced: tuple[int | None, ...] | None = None  # per image: the layer to leave at, or None for full depth
    evaluate_heads: bool = True  # False: no exit head or gate runs (the `full` rule)

    @classmethod
    def full(cls) -> ExitRule:
        """No exits, no heads: the full-depth answer at the plain CLIP cost."""
        return cls(FULL_OPERATING_POINT, {}, None, evaluate_heads=False)

    @classmethod
    def from_thresholds(cls, thresholds: Mapping[int, float], name: str = "custom") -> ExitRule:
        """Leave at the first candidate layer whose gate probability reaches its threshold."""
        return cls(name, dict(thresholds))

    @classmethod
    def forced_mix(cls, exits_per_image: Sequence[int | None]) -> ExitRule:
        """Benchmarks: image i leaves at ``exits_per_image[i]`` (a candidate layer) or goes the full depth (None)."""
        return cls("forced", {}, tuple(exits_per_image))

    def check(self, batch: int, candidate_layers: Sequence[int]) -> None:
        """``ValueError`` when a forced mix does not fit the batch or names a layer without an exit head."""
        if self.forced is None:
            return
        if len(self.forced) != batch:
            raise ValueError(f"the forced exit mix has {len(self.forced)} entries for {batch} images")
        unknown = {layer for layer in self.forced if layer is not None and layer not in candidate_layers}
        if unknown:
            raise ValueError(f"forced exits at {sorted(unknown)}: not candidate layers {list(candidate_layers)}")

    def leave(self, layer: int, rows: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
        """Mask [b] of the rows (original batch indices ``rows`` [b]) that leave at ``layer``."""
        if self.forced is not None:
            wanted = torch.tensor([-1 if f is None else f for f in self.forced])
            return wanted[rows] == layer
        return exits(probability, self.thresholds.get(layer, 1.0))
