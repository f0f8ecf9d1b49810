"""Exit rules: how the engine decides, per image and candidate layer, whether an image leaves.

* an operating point's thresholds: leave at the first candidate layer whose gate probability reaches the layer's
  threshold (>= 1.0 never leaves there); every candidate head and gate on the way is evaluated. The thresholds
  depend on the request's label count K (:meth:`lraee_core.config.OperatingPoint.thresholds_at`): a point's rule
  becomes the rule of one K in :meth:`ExitRule.for_labels`. Above the point's label cap a request runs no head or
  gate at all and gets the `full` answer, because calibration found its exits too rare there to pay for the heads;
* ``full``: no exits and no heads evaluated: the plain full-depth CLIP answer, the reference the operating points'
  agreement promises are measured against;
* a forced per-image exit mix (benchmarks only): image i leaves at the candidate layer ``forced[i]`` (None: full
  depth), whatever its gate says.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import FULL_OPERATING_POINT, OperatingPoint
from .gate import exits


@dataclass(frozen=True)
class ExitRule:
    """One way of deciding exits for a batch (build it with the class methods)."""

    name: str  # operating point name, "full", "forced" or "custom"
    thresholds: Mapping[int, float] = field(default_factory=dict)  # layer -> gate threshold (missing: never leaves)
    forced: tuple[int | None, ...] | None = None  # per image: the layer to leave at, or None for full depth
    evaluate_heads: bool = True  # False: no exit head or gate runs (the `full` rule)
    label_cap: int | None = None  # the most labels a request may have for the heads to run (None: no cap)
    point: OperatingPoint | None = None  # the point whose thresholds depend on K (:meth:`for_labels` applies it)

    @classmethod
    def full(cls) -> ExitRule:
        """No exits, no heads: the full-depth answer at the plain CLIP cost."""
        return cls(FULL_OPERATING_POINT, {}, None, evaluate_heads=False)

    @classmethod
    def from_thresholds(
        cls, thresholds: Mapping[int, float], name: str = "custom", label_cap: int | None = None
    ) -> ExitRule:
        """Leave at the first candidate layer whose gate probability reaches its threshold; with ``label_cap``,
        only for requests of at most that many labels (:meth:`for_labels`)."""
        if label_cap is not None and label_cap < 1:
            raise ValueError(f"a label cap is a label count >= 1, not {label_cap}")
        return cls(name, dict(thresholds), label_cap=label_cap)

    @classmethod
    def of_point(cls, point: OperatingPoint) -> ExitRule:
        """An operating point's rule, whose thresholds depend on the request's label count (:meth:`for_labels`)."""
        return cls(point.name, point.thresholds, label_cap=point.label_cap, point=point)

    def for_labels(self, count: int) -> ExitRule:
        """The rule a request of ``count`` labels follows: for a point, its thresholds at that K (above its label
        cap: the same point without heads, the `full` answer and cost, its name staying the point's); otherwise
        this rule, or above its label cap the same without heads. One object per rule and K, so the rows of
        requests with the same K share it (a constant column in :class:`RowExits`)."""
        if self.label_cap is not None and count > self.label_cap:
            return self._without_heads
        if self.point is None or self.forced is not None or not self.evaluate_heads:
            return self
        rule = self._by_count.get(count)
        if rule is None:
            thresholds = self.point.thresholds_at(count)
            assert thresholds is not None  # counts above the cap were answered above
            rule = self._by_count.setdefault(count, ExitRule(self.name, thresholds, label_cap=self.label_cap))
        return rule

    @functools.cached_property
    def _by_count(self) -> dict[int, ExitRule]:
        return {}

    @functools.cached_property
    def _row_exits(self) -> dict[tuple[int, tuple[int, ...]], RowExits]:
        return {}  # (batch, candidate layers) -> the rows' exits of a batch that follows this rule alone

    @functools.cached_property
    def _without_heads(self) -> ExitRule:
        return ExitRule(self.name, {}, None, evaluate_heads=False)

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


@dataclass(frozen=True)
class RowExits:
    """The exit rules of every row of one engine batch as tensors, so one op decides a whole layer's exits even when
    the rows come from requests with different rules. Build it with :meth:`of`."""

    thresholds: Mapping[int, torch.Tensor]  # candidate layer -> [B] float32 gate threshold per row (>= 1: stays)
    forced: torch.Tensor | None  # [B] long: the layer a forced row leaves at (0: full depth); None: no row forced
    is_forced: torch.Tensor | None  # [B] bool: the row follows a forced mix, not its gate; None: no row forced
    evaluates: torch.Tensor  # [B] bool: the row's rule runs exit heads and gates (False for `full`)
    any_evaluate: bool  # some row runs heads
    all_evaluate: bool  # every row runs heads
    # layer -> the one threshold of every row, as a float32 value, when all rows follow one unforced rule (the common
    # case: one request, or requests at one operating point): one comparison decides a layer. None otherwise.
    uniform: Mapping[int, float] | None = None

    @classmethod
    def of(cls, rules: Sequence[ExitRule], positions: Sequence[int], candidate_layers: Sequence[int]) -> RowExits:
        """Row i follows ``rules[i]``; ``positions[i]`` is its index among the rows of its own request (which entry
        of a forced mix it takes). Thresholds are float32, as the gate's probabilities are, so a row leaves exactly
        when a single-rule batch would let it."""
        batch = len(rules)
        unique = list({id(rule): rule for rule in rules}.values())
        if len(unique) == 1 and unique[0].forced is None:
            # The common batch (one request, or requests at one point and K) is the same every call: made once per
            # rule, batch size and layers (the tensors are never written to), not a few small torch ops per call.
            [rule] = unique
            key = (batch, tuple(candidate_layers))
            cached = rule._row_exits.get(key)
            if cached is None:
                cached = rule._row_exits.setdefault(key, cls._of(rules, positions, candidate_layers, unique))
            return cached
        return cls._of(rules, positions, candidate_layers, unique)

    @classmethod
    def _of(
        cls,
        rules: Sequence[ExitRule],
        positions: Sequence[int],
        candidate_layers: Sequence[int],
        unique: Sequence[ExitRule],
    ) -> RowExits:
        batch = len(rules)
        if len(unique) == 1:  # one rule: constant columns, no per-row look-up
            [rule] = unique
            thresholds = {
                layer: torch.full((batch,), rule.thresholds.get(layer, 1.0), dtype=torch.float32)
                for layer in candidate_layers
            }
            evaluates = torch.full((batch,), rule.evaluate_heads, dtype=torch.bool)
        else:
            number = {id(rule): index for index, rule in enumerate(unique)}
            which = torch.tensor([number[id(rule)] for rule in rules], dtype=torch.long)  # [B] rule of each row
            thresholds = {
                layer: torch.tensor([rule.thresholds.get(layer, 1.0) for rule in unique], dtype=torch.float32)[which]
                for layer in candidate_layers
            }
            evaluates = torch.tensor([rule.evaluate_heads for rule in unique], dtype=torch.bool)[which]
        forced = is_forced = None
        if any(rule.forced is not None for rule in unique):
            plan = [
                (rule.forced[position] or 0) if rule.forced is not None else 0
                for rule, position in zip(rules, positions, strict=True)
            ]
            forced = torch.tensor(plan, dtype=torch.long)
            is_forced = torch.tensor([rule.forced is not None for rule in rules], dtype=torch.bool)
        flags = [rule.evaluate_heads for rule in unique]
        uniform = None
        if len(unique) == 1 and forced is None:
            uniform = {layer: float(column[0]) for layer, column in thresholds.items()} if batch else {}
        return cls(thresholds, forced, is_forced, evaluates, any(flags), all(flags), uniform)

    def leaving(self, layer: int, rows: torch.Tensor, probability: torch.Tensor) -> torch.Tensor | None:
        """Positions in ``rows`` (batch indices [b], gate probabilities [b] float32) of the rows that leave at
        ``layer``, None when none does. Under one unforced rule (:attr:`uniform`) the decision is one NumPy float32
        comparison, or none at a threshold >= 1, instead of torch ops (the engine decides between two session calls,
        where every op starts on cold caches); otherwise each row against its own threshold or forced layer."""
        if self.uniform is not None:
            constant = self.uniform[layer]
            if constant >= 1.0:
                return None
            positions = np.flatnonzero(probability.numpy() >= np.float32(constant))
            return torch.from_numpy(positions) if positions.size else None
        threshold = self.thresholds[layer][rows]
        leave = (threshold < 1.0) & (probability >= threshold)
        if self.forced is not None and self.is_forced is not None:
            leave = torch.where(self.is_forced[rows], self.forced[rows] == layer, leave)
        return leave.nonzero().flatten() if bool(leave.any()) else None
