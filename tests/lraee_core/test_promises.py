"""The threshold controllers on synthetic outcomes: deterministic streams of answers and shadow checks."""

from __future__ import annotations

import random
from typing import Any

import pytest

from lraee_core.config import ExitPolicy, OperatingPoint
from lraee_core.exits import ExitRule
from lraee_core.promises import (
    ControlConfig,
    PromiseKeeper,
    ShadowOutcome,
    band_name,
    ladder,
    thresholds_at_offset,
    wilson,
)

# Two candidate layers, thresholds per label count (format 4), a capped strict point and an uncontrolled one.
FAST = OperatingPoint("fast", ((2, {4: 0.5, 8: 0.4}), (10, {4: 0.6, 8: 0.5})), promise=0.9)
BALANCED = OperatingPoint("balanced", ((2, {4: 0.7, 8: 0.6}), (10, {4: 0.8, 8: 0.7})), promise=0.95)
ACCURATE = OperatingPoint("accurate", ((2, {4: 0.9}),), promise=0.99, label_cap=5)
LOOSE = OperatingPoint.uniform("loose", {4: 0.1, 8: 0.1})  # no promise: never controlled
POLICY = ExitPolicy((4, 8), (FAST, BALANCED, ACCURATE, LOOSE), "balanced")
RULES = {point.name: ExitRule.of_point(point) for point in POLICY.operating_points}


def keeper(**config: float) -> PromiseKeeper:
    clock = iter(range(10**9))
    return PromiseKeeper(
        POLICY,
        lambda point, count: RULES[point].for_labels(count),
        ControlConfig(**config),  # type: ignore[arg-type]
        clock=lambda: float(next(clock)),
    )


def calibrated(point: OperatingPoint, count: int) -> dict[int, float]:
    thresholds = point.thresholds_at(count)
    assert thresholds is not None
    return {layer: thresholds.get(layer, 1.0) for layer in POLICY.candidate_layers}


class World:
    """Images with a gate probability drawn uniformly: an image leaves at the first layer whose threshold its
    probability reaches. On shifted photos an exit with probability below ``sure`` disagrees with the full depth;
    on clean photos every exit agrees."""

    def __init__(self, seed: int = 0, sure: float = 0.9) -> None:
        self.random = random.Random(seed)
        self.sure = sure

    def run(self, keeper: PromiseKeeper, point: str, count: int, images: int, *, shifted: bool) -> float:
        """Send ``images`` answers and check every exit (shadow rate 1); the agreement they got."""
        agreed = 0
        for _ in range(images):
            rule = keeper.rule(point, count)
            gate = self.random.random()
            layer = next((layer for layer in (4, 8) if gate >= rule.thresholds.get(layer, 1.0)), None)
            agree = layer is None or not shifted or gate >= self.sure
            agreed += agree
            keeper.observe_answers([(point, count, rule, layer is not None)])
            if layer is not None:
                keeper.observe_check(ShadowOutcome(point, count, layer, gate, agree, rule))
        return agreed / images


def assert_never_below_calibrated(keeper: PromiseKeeper) -> None:
    for point in (FAST, BALANCED, ACCURATE):
        for count in (1, 2, 3, 5, 7, 10, 30):
            rule = keeper.rule(point.name, count)
            if point.label_cap is not None and count > point.label_cap:
                assert not rule.evaluate_heads
                continue
            for layer, threshold in calibrated(point, count).items():
                assert rule.thresholds.get(layer, 1.0) >= threshold - 1e-12, (point.name, count, layer)


def test_the_ladder_climbs_from_a_points_own_thresholds_through_stricter_points_to_never() -> None:
    fast = ladder(POLICY, FAST, 2)
    assert fast == [
        {4: 0.5, 8: 0.4},
        {4: 0.7, 8: 0.6},  # balanced's
        {4: 0.9, 8: 1.0},  # accurate's: it has no head at layer 8
        {4: 1.0, 8: 1.0},
    ]
    # Above accurate's label cap its rung is "never leave"; between calibrated counts, each point interpolated.
    assert ladder(POLICY, FAST, 7)[2] == {4: 1.0, 8: 1.0}  # type: ignore[index]
    assert ladder(POLICY, BALANCED, 2) == [{4: 0.7, 8: 0.6}, {4: 0.9, 8: 1.0}, {4: 1.0, 8: 1.0}]
    assert ladder(POLICY, ACCURATE, 9) is None  # above its cap nothing runs, nothing to control
    assert thresholds_at_offset(fast, 0.5) == pytest.approx({4: 0.6, 8: 0.5})
    assert thresholds_at_offset(fast, 2.5) == pytest.approx({4: 0.95, 8: 1.0})
    assert thresholds_at_offset(fast, 9.0) == {4: 1.0, 8: 1.0}
    # A stricter point's threshold below a point's own at some layer never pulls that layer below its calibration.
    odd = OperatingPoint.uniform("odd", {4: 0.3, 8: 0.95}, promise=0.97)
    rungs = ladder(ExitPolicy((4, 8), (FAST, odd), "fast"), FAST, 2)
    assert rungs is not None and rungs[1] == {4: 0.5, 8: 0.95}
    assert [band_name((2, 10), 0), band_name((2, 10), 1), band_name((1,), 0)] == ["1-9", "10+", "1+"]


def test_wilson_bounds() -> None:
    assert wilson(0, 0, 1.0) == (0.0, 1.0)
    low, high = wilson(10, 100, 1.645)
    assert 0.05 < low < 0.1 < high < 0.17  # (6.0%, 16.0%)


def test_shifted_photos_raise_the_thresholds_until_the_promise_holds_and_clean_ones_relax_them() -> None:
    control, world = keeper(), World()
    # Calibrated: half the images leave at fast, and on shifted photos 80% of those disagree (agreement ~60%).
    assert world.run(control, "fast", 2, 200, shifted=True) < 0.7
    for _ in range(8):
        world.run(control, "fast", 2, 300, shifted=True)
        assert_never_below_calibrated(control)
    kept = world.run(control, "fast", 2, 1000, shifted=True)
    assert kept >= 0.9 - 0.02  # the promise, within the sampling error of 1,000 images
    state = {(band["operating_point"], band["labels"]): band for band in control.state()["bands"]}
    raised = state[("fast", "1-9")]
    assert raised["offset"] > 1.0 and raised["corrections"]["raise"] >= 2 and raised["verdict"] != "broken"
    assert state[("fast", "10+")]["offset"] == 0.0  # another band of label counts is not touched
    assert "loose" not in {point for point, _ in state}
    # Clean photos: every exit agrees, so the thresholds come back down to the calibrated ones, never below.
    for _ in range(20):
        world.run(control, "fast", 2, 300, shifted=False)
        assert_never_below_calibrated(control)
    state = {(band["operating_point"], band["labels"]): band for band in control.state()["bands"]}
    assert state[("fast", "1-9")]["offset"] == 0.0 and state[("fast", "1-9")]["corrections"]["relax"] >= 4
    assert control.rule("fast", 2) is RULES["fast"].for_labels(2)  # back to the engine's own rule object


def test_every_step_is_bounded_and_logged() -> None:
    control, world = keeper(), World(seed=3)
    for _ in range(10):
        world.run(control, "balanced", 10, 300, shifted=True)
    for _ in range(20):
        world.run(control, "balanced", 10, 300, shifted=False)
    changes = control.state()["changes"]
    assert changes and {change["direction"] for change in changes} == {"raise", "relax"}
    for change in changes:
        step = change["offset_after"] - change["offset_before"]
        if change["direction"] == "raise":
            assert 0 < step <= 0.5 + 1e-9
            assert change["checks"] >= 30 and change["upper"] < 0.95
        else:
            assert -0.25 - 1e-9 <= step < 0
            assert change["answers"] >= 50 and change["lower"] >= 0.95 + 0.1 * 0.05


def misses(control: PromiseKeeper, point: str, rule: ExitRule, count: int, gate: float = 0.99) -> None:
    """``count`` answers under ``rule`` (K = 2), each leaving at layer 4 and disagreeing with the full depth."""
    for _ in range(count):
        control.observe_answers([(point, 2, rule, True)])
        control.observe_check(ShadowOutcome(point, 2, 4, gate, False, rule))


def band_state(control: PromiseKeeper, point: str) -> dict[str, Any]:
    """The state of ``point``'s band that holds K = 2."""
    return dict(next(band for band in control.state()["bands"] if band["operating_point"] == point))


def test_no_move_below_the_minimum_sample_count() -> None:
    control = keeper(min_checks=30)
    rule = control.rule("fast", 2)
    misses(control, "fast", rule, 29, gate=0.55)  # every exit disagrees: still too few checks to act on
    assert control.rule("fast", 2) is rule and not control.state()["changes"]
    control.observe_check(ShadowOutcome("fast", 2, 4, 0.55, False, rule))
    assert control.rule("fast", 2) is not rule


def test_hysteresis_holds_between_broken_and_comfortable() -> None:
    control = keeper()
    rule = control.rule("fast", 2)
    misses(control, "fast", rule, 40)  # raise once, so that there is room to relax
    raised = control.rule("fast", 2)
    assert raised is not rule
    # Now agreement 1 - 0.5 x 2/11 = 91%, misses spread evenly: above the 90% promise, not surely above the 91% a
    # relax needs.
    for index in range(4000):
        exited = index % 2 == 0
        control.observe_answers([("fast", 2, raised, exited)])
        if exited:
            control.observe_check(ShadowOutcome("fast", 2, 4, 0.99, (index // 2) % 11 not in (3, 8), raised))
    assert control.rule("fast", 2) is raised
    band = band_state(control, "fast")
    assert band["verdict"] == "kept" and band["estimate"] == pytest.approx(0.91, abs=0.01)


def test_evidence_about_old_thresholds_is_ignored_and_reset_returns_to_calibrated() -> None:
    control = keeper()
    old = control.rule("balanced", 2)
    misses(control, "balanced", old, 40)
    assert control.rule("balanced", 2) is not old
    misses(control, "balanced", old, 100)  # late answers and checks of requests that still followed the old rule
    band = band_state(control, "balanced")
    assert band["answers"] == 0 and band["checks"] == 0 and band["verdict"] == "broken"
    control.reset("balanced")
    assert control.rule("balanced", 2) is old
    band = band_state(control, "balanced")
    assert band["offset"] == 0.0 and band["verdict"] == "unknown" and band["corrections"]["reset"] == 1
    assert control.state()["changes"][-1]["direction"] == "reset"


def test_points_without_a_promise_and_counts_above_the_cap_follow_the_calibrated_rule() -> None:
    control = keeper()
    assert control.rule("loose", 3) is RULES["loose"].for_labels(3)
    assert not control.rule("accurate", 9).evaluate_heads
    control.observe_answers([("loose", 3, control.rule("loose", 3), True)])  # ignored, no error
