"""Thresholds that keep their promise when the photos change: one controller per operating point and label-count band.

An operating point promises an agreement with the full-depth top-1, calibrated on photos like its calibration
split. Live photos of another kind (grayscale, blurred, heavily compressed) can break it. Shadow checks
(app/shadow.py) re-run a sample of early exits at full depth; this module turns their outcomes into action.

**What is estimated.** Images on the full path agree by definition, so a point's live agreement is
``A = 1 - p * d``: the early-exit share ``p`` (counted on every live answer) times the disagreement ``d`` among early
exits (counted on shadow checks). Both are binomial shares; their Wilson bounds give bounds on ``A``
(``1 - p_high * d_high`` below, ``1 - p_low * d_low`` above). Only answers and checks made under the band's current
thresholds count: each level starts its own counts (old answers describe other thresholds). Counts are halved when
they pass a cap, so a long-held level still notices a change of photos.

**What is done.** Per (operating point, label-count band):

* *raise* when, after ``min_checks`` shadow checks, even the upper bound (``z_raise``) is below the promise: the
  thresholds move along the calibrated curve by at most ``max_raise``, as little as the checks say is enough (the
  checked exits' gate probabilities tell which of them a stricter threshold would have kept from leaving);
* *relax* when, after ``min_answers`` answers, the lower bound (``z_relax``) clears the promise by a margin (a share
  of its disagreement budget, ``relax_margin``): the thresholds move back by ``relax_step``, never below the
  calibrated ones;
* otherwise hold. The gap between the two tests is the hysteresis; a raise needs less confidence than a relax because
  a needless raise only costs savings for a while, a needless relax breaks the promise.

**The calibrated curve.** Operating points ordered by promise form a ladder: a point's own thresholds at the
request's label count K, then each stricter point's at the same K (a stricter point above its label cap, or a layer
it lacks: 1.0, never leave), then 1.0 everywhere. The offset counts rungs: 0.5 is halfway from a point's own
thresholds to the next stricter point's. Every threshold is also kept at or above the point's calibrated one, so no
offset ever lets more images leave than calibration did.

**Bands.** Thresholds depend on K between a point's calibrated label counts, so each band between two calibrated
counts (``2-4``, ``5-9``, ``10+``) has its own controller; a point calibrated at one count has one band (``1+``).

The state is per process: it starts at the calibrated thresholds and is lost on restart, and each replica learns
alone from its own traffic. Pure logic with a lock (called from the event loop and the inference worker): no I/O, no
web framework.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import ExitPolicy, OperatingPoint
from .exits import ExitRule

log = logging.getLogger(__name__)

Direction = Literal["raise", "relax", "reset"]
DIRECTIONS: tuple[Direction, ...] = ("raise", "relax", "reset")
Verdict = Literal["unknown", "broken", "kept", "comfortable"]


@dataclass(frozen=True)
class ControlConfig:
    """How cautious the controllers are (the defaults are the service's)."""

    min_checks: int = 30  # shadow checks at one level before it may be judged broken
    min_answers: int = 50  # live answers at one level before it may be relaxed
    z_raise: float = 1.0  # one-sided normal quantile of the "broken" test (84%)
    z_relax: float = 1.645  # one-sided normal quantile of the "comfortably kept" test (95%)
    relax_margin: float = 0.1  # relax only above promise + this share of the disagreement budget (1 - promise)
    max_raise: float = 0.5  # the largest raise at once, in rungs of the ladder
    raise_grid: float = 0.125  # raises are whole multiples of this
    relax_step: float = 0.25  # one relax, in rungs
    max_checks: int = 400  # counts of checks are halved beyond this (forgetting)
    max_answers: int = 4000  # counts of answers are halved beyond this
    log_capacity: int = 200  # changes kept for the state endpoint (every change is also logged)

    def __post_init__(self) -> None:
        if self.min_checks < 1 or self.min_answers < 1 or self.max_raise <= 0 or self.relax_step <= 0:
            raise ValueError("a controller needs positive sample minimums and steps")
        if not 0 < self.raise_grid <= self.max_raise:
            raise ValueError("raise_grid must be in (0, max_raise]")


@dataclass(frozen=True)
class ShadowOutcome:
    """One shadow check: an early exit re-run at full depth."""

    operating_point: str  # the point the request named
    label_count: int  # the request's K
    exit_layer: int  # where the image left
    gate_probability: float  # the gate's probability there
    agree: bool  # whether its top-1 equals the full depth's
    rule: ExitRule | None = None  # the rule it followed (None: assume the band's current one)


@dataclass(frozen=True)
class Change:
    """One move of a band's thresholds, with the evidence behind it."""

    at: float  # Unix time
    operating_point: str
    band: str
    direction: Direction
    offset_before: float
    offset_after: float
    estimate: float | None  # live agreement estimate at the old level (None: a reset)
    lower: float | None
    upper: float | None
    checks: int  # shadow checks and answers at the old level
    answers: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def wilson(successes: float, trials: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a binomial share; (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    share = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (share + z * z / (2.0 * trials)) / denominator
    half = z * math.sqrt(share * (1.0 - share) / trials + z * z / (4.0 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def ladder(policy: ExitPolicy, point: OperatingPoint, count: int) -> list[dict[int, float]] | None:
    """The calibrated curve of ``point`` at label count ``count``: its own thresholds, each stricter point's (by
    promise), then 1.0 everywhere; each rung at or above the one before, layer by layer. None above its label cap
    (no head runs there, nothing to control)."""
    own = point.thresholds_at(count)
    if own is None:
        return None
    layers = policy.candidate_layers
    rungs = [{layer: own.get(layer, 1.0) for layer in layers}]
    promise = point.promise if point.promise is not None else 0.0
    stricter = sorted(
        (p for p in policy.operating_points if p.promise is not None and p.promise > promise and p is not point),
        key=lambda p: (p.promise, p.name),
    )
    for other in stricter:
        theirs = other.thresholds_at(count) or {}
        rungs.append({layer: max(rungs[-1][layer], theirs.get(layer, 1.0)) for layer in layers})
    rungs.append(dict.fromkeys(layers, 1.0))
    return rungs


def thresholds_at_offset(rungs: list[dict[int, float]], offset: float) -> dict[int, float]:
    """The thresholds ``offset`` rungs up the ladder (linear between rungs, clamped to its ends)."""
    offset = min(max(offset, 0.0), len(rungs) - 1.0)
    low = min(math.floor(offset), len(rungs) - 2) if len(rungs) > 1 else 0
    if len(rungs) == 1:
        return dict(rungs[0])
    weight = offset - low
    below, above = rungs[low], rungs[low + 1]
    return {layer: below[layer] + weight * (above[layer] - below[layer]) for layer in below}


def band_edges(point: OperatingPoint) -> tuple[int, ...]:
    """The label counts where a point's bands start: its calibrated counts (the first band also holds smaller K)."""
    return tuple(count for count, _ in point.by_label_count) or (1,)


def band_name(edges: tuple[int, ...], index: int) -> str:
    """``2-4``, ``5-9``, ``10+``: the label counts a band covers."""
    start = edges[index] if index > 0 else min(edges[0], 1)
    if index + 1 < len(edges):
        return f"{start}-{edges[index + 1] - 1}"
    return f"{start}+"


@dataclass
class _Counts:
    """Evidence gathered at one level."""

    answers: float = 0.0
    exits: float = 0.0
    checks: float = 0.0
    disagreements: list[tuple[int, int, float]] = field(default_factory=list)  # (K, layer, gate) of each miss

    def halve_answers(self) -> None:
        self.answers /= 2.0
        self.exits /= 2.0

    def halve_checks(self) -> None:
        self.checks /= 2.0
        self.disagreements = self.disagreements[len(self.disagreements) // 2 :]


class BandController:
    """One operating point's thresholds for one band of label counts, and the evidence about them."""

    def __init__(
        self,
        policy: ExitPolicy,
        point: OperatingPoint,
        band: str,
        start: int,
        base_rule: Callable[[int], ExitRule],
        config: ControlConfig,
        record: Callable[[Change], None],
        clock: Callable[[], float],
    ) -> None:
        assert point.promise is not None, "only points with a promise are controlled"
        self.policy = policy
        self.point = point
        self.band = band
        self.start = start  # the smallest label count of the band that its calibrated thresholds are shown at
        self.promise: float = point.promise
        self._base_rule = base_rule
        self.config = config
        self._record = record
        self._clock = clock
        self.offset = 0.0
        self.max_offset = float(len(ladder(policy, point, band_edges(point)[0]) or [{}]) - 1)
        self.counts = _Counts()
        self.verdict: Verdict = "unknown"
        self.broken_since: float | None = None  # when the estimate last turned broken (None: not broken)
        self.corrections: dict[Direction, int] = dict.fromkeys(DIRECTIONS, 0)
        self._rules: dict[int, ExitRule] = {}
        self._rungs: dict[int, list[dict[int, float]] | None] = {}

    # -- thresholds ------------------------------------------------------------------------------------------------
    def rungs(self, count: int) -> list[dict[int, float]] | None:
        """The ladder at ``count`` (cached)."""
        if count not in self._rungs:
            self._rungs[count] = ladder(self.policy, self.point, count)
        return self._rungs[count]

    def thresholds(self, count: int, offset: float | None = None) -> dict[int, float] | None:
        """The thresholds at ``count`` labels, at ``offset`` (default: the current one); None above the cap."""
        rungs = self.rungs(count)
        if rungs is None:
            return None
        return thresholds_at_offset(rungs, self.offset if offset is None else offset)

    def rule(self, count: int) -> ExitRule:
        """The rule a request of ``count`` labels follows now: the calibrated one at offset 0 (the same object the
        engine hands out, so rows of requests still share it)."""
        rule = self._rules.get(count)
        if rule is None:
            base = self._base_rule(count)
            if self.offset == 0.0 or not base.evaluate_heads:
                rule = base
            else:
                thresholds = self.thresholds(count)
                assert thresholds is not None  # a base rule with heads is below the label cap
                rule = ExitRule(self.point.name, thresholds, label_cap=self.point.label_cap)
            self._rules[count] = rule
        return rule

    def current(self, rule: ExitRule | None, count: int) -> bool:
        """Whether ``rule`` is the one this band hands out now for ``count`` labels (evidence about it counts)."""
        return rule is None or rule is self.rule(count)

    # -- evidence --------------------------------------------------------------------------------------------------
    def observe_answer(self, exited: bool) -> None:
        """One live answer under the current thresholds."""
        counts = self.counts
        counts.answers += 1
        counts.exits += exited
        if counts.answers > self.config.max_answers:
            counts.halve_answers()
        self._decide()

    def observe_check(self, outcome: ShadowOutcome) -> None:
        """One shadow check of an exit under the current thresholds."""
        counts = self.counts
        counts.checks += 1
        if not outcome.agree:
            counts.disagreements.append((outcome.label_count, outcome.exit_layer, outcome.gate_probability))
        if counts.checks > self.config.max_checks:
            counts.halve_checks()
        self._decide()

    def bounds(self, z: float) -> tuple[float, float, float] | None:
        """(estimate, lower, upper) of the live agreement at the current level; None before any answer."""
        counts = self.counts
        if counts.answers <= 0:
            return None
        exit_share = counts.exits / counts.answers
        misses = float(len(counts.disagreements))
        disagreement = misses / counts.checks if counts.checks > 0 else 0.0
        exit_low, exit_high = wilson(counts.exits, counts.answers, z)
        miss_low, miss_high = wilson(misses, counts.checks, z)
        if counts.exits <= 0:
            miss_low = 0.0  # nothing left early: nothing to disagree
        return 1.0 - exit_share * disagreement, 1.0 - exit_high * miss_high, 1.0 - exit_low * miss_low

    def _decide(self) -> None:
        config, counts = self.config, self.counts
        if counts.checks >= config.min_checks:
            judged = self.bounds(config.z_raise)
            if judged is not None and judged[2] < self.promise:
                self.verdict = "broken"
                if self.broken_since is None:
                    self.broken_since = self._clock()
                if self.offset < self.max_offset:
                    self._move("raise", self._raise_to(judged[1]), judged)
                return
            if judged is not None:
                self.verdict = "kept"
                self.broken_since = None
        if counts.answers >= config.min_answers:
            judged = self.bounds(config.z_relax)
            comfortable = self.promise + config.relax_margin * (1.0 - self.promise)
            if judged is not None and judged[1] >= comfortable:
                self.verdict = "comfortable"
                self.broken_since = None
                if self.offset > 0.0:
                    self._move("relax", max(0.0, self.offset - config.relax_step), judged)

    def _raise_to(self, _lower: float) -> float:
        """The smallest raise (a multiple of the grid, at most ``max_raise``) after which the checked exits that
        disagreed and would still leave bring the estimate to the promise plus the relax margin; ``max_raise`` when
        none does. An exit kept from leaving at its layer is assumed to go the full depth (it might leave later, so
        the next level's checks have the last word)."""
        config, counts = self.config, self.counts
        exit_share = counts.exits / counts.answers if counts.answers else 1.0
        target = self.promise + config.relax_margin * (1.0 - self.promise)
        steps = max(1, round(config.max_raise / config.raise_grid))
        for step in range(1, steps + 1):
            offset = min(self.max_offset, self.offset + step * config.raise_grid)
            still = 0
            for count, layer, gate in counts.disagreements:
                thresholds = self.thresholds(count, offset)
                if thresholds is not None and gate >= thresholds.get(layer, 1.0):
                    still += 1
            if 1.0 - exit_share * still / max(counts.checks, 1.0) >= target or offset >= self.max_offset:
                return offset
        return min(self.max_offset, self.offset + config.max_raise)

    def _move(self, direction: Direction, offset: float, judged: tuple[float, float, float] | None) -> None:
        change = Change(
            at=self._clock(),
            operating_point=self.point.name,
            band=self.band,
            direction=direction,
            offset_before=self.offset,
            offset_after=offset,
            estimate=None if judged is None else judged[0],
            lower=None if judged is None else judged[1],
            upper=None if judged is None else judged[2],
            checks=int(self.counts.checks),
            answers=int(self.counts.answers),
        )
        self.offset = offset
        self.counts = _Counts()
        self._rules.clear()
        self.corrections[direction] += 1
        if direction == "reset":
            self.verdict, self.broken_since = "unknown", None
        self._record(change)

    def reset(self) -> None:
        """Back to the calibrated thresholds, evidence forgotten."""
        self._move("reset", 0.0, None)

    def state(self) -> dict[str, Any]:
        """JSON-ready view for the state endpoint."""
        estimate = self.bounds(self.config.z_raise)
        start = self.start
        return {
            "operating_point": self.point.name,
            "labels": self.band,
            "promise": self.promise,
            "offset": self.offset,
            "max_offset": self.max_offset,
            "verdict": self.verdict,
            "broken_since": self.broken_since,
            "estimate": None if estimate is None else estimate[0],
            "lower": None if estimate is None else estimate[1],
            "upper": None if estimate is None else estimate[2],
            "answers": int(self.counts.answers),
            "exits": int(self.counts.exits),
            "checks": int(self.counts.checks),
            "disagreements": len(self.counts.disagreements),
            "calibrated_thresholds": _keyed(self.thresholds(start, 0.0)),
            "thresholds": _keyed(self.thresholds(start)),
            "thresholds_at_labels": start,
            "corrections": dict(self.corrections),
        }


def _keyed(thresholds: dict[int, float] | None) -> dict[str, float]:
    return {} if thresholds is None else {str(layer): value for layer, value in sorted(thresholds.items())}


class PromiseKeeper:
    """The controllers of one served model: each operating point with a promise, per label-count band.

    ``base_rule(point, K)`` is the calibrated rule (the engine's); :meth:`rule` is what a request follows now.
    """

    def __init__(
        self,
        policy: ExitPolicy,
        base_rule: Callable[[str, int], ExitRule],
        config: ControlConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        name: str = "",
    ) -> None:
        self.policy = policy
        self.config = config or ControlConfig()
        self.name = name  # the served model, for the log
        self._base_rule = base_rule
        self._lock = threading.Lock()
        self.changes: deque[Change] = deque(maxlen=self.config.log_capacity)
        self._edges: dict[str, tuple[int, ...]] = {}
        self._bands: dict[tuple[str, int], BandController] = {}
        for point in policy.operating_points:
            if point.promise is None or not point.by_label_count:
                continue
            edges = band_edges(point)
            self._edges[point.name] = edges
            for index in range(len(edges)):
                self._bands[(point.name, index)] = BandController(
                    policy,
                    point,
                    band_name(edges, index),
                    edges[index],
                    functools.partial(base_rule, point.name),
                    self.config,
                    self._record,
                    clock,
                )

    def _band(self, point: str, count: int) -> BandController | None:
        edges = self._edges.get(point)
        if edges is None:
            return None
        return self._bands[(point, max(0, bisect.bisect_right(edges, count) - 1))]

    def _record(self, change: Change) -> None:
        self.changes.append(change)
        log.warning(
            "thresholds %s: model %s, operating point %s, labels %s: offset %.3f -> %.3f (estimate %s, bounds %s..%s, "
            "%d checks, %d answers)",
            change.direction,
            self.name,
            change.operating_point,
            change.band,
            change.offset_before,
            change.offset_after,
            _percent(change.estimate),
            _percent(change.lower),
            _percent(change.upper),
            change.checks,
            change.answers,
        )

    def rule(self, point: str, count: int) -> ExitRule:
        """The rule a request at ``point`` with ``count`` labels follows now."""
        band = self._band(point, count)
        if band is None:
            return self._base_rule(point, count)
        with self._lock:
            return band.rule(count)

    def observe_answers(self, answers: Iterable[tuple[str, int, ExitRule, bool]]) -> None:
        """Live answers (point, K, the rule followed, exited early); those under other thresholds than the band's
        current ones are ignored."""
        with self._lock:
            for point, count, rule, exited in answers:
                band = self._band(point, count)
                if band is not None and rule.evaluate_heads and band.current(rule, count):
                    band.observe_answer(exited)

    def observe_check(self, outcome: ShadowOutcome) -> None:
        """One shadow check's outcome (ignored when its rule is no longer the band's)."""
        with self._lock:
            band = self._band(outcome.operating_point, outcome.label_count)
            if band is not None and band.current(outcome.rule, outcome.label_count):
                band.observe_check(outcome)

    def reset(self, point: str | None = None) -> None:
        """Every band (of ``point``, when given) back to its calibrated thresholds."""
        with self._lock:
            for band in self._bands.values():
                if point is None or band.point.name == point:
                    band.reset()

    def bands(self) -> Iterator[BandController]:
        """Every controller (read their fields under no lock: a scrape may see one a step old)."""
        return iter(list(self._bands.values()))

    def state(self) -> dict[str, Any]:
        """JSON-ready view: every band's state and the latest changes, newest last."""
        with self._lock:
            return {
                "bands": [band.state() for band in self._bands.values()],
                "changes": [change.to_json() for change in self.changes],
                "config": dict(self.config.__dict__),
            }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"
