from __future__ import annotations

import pytest

from bench.exit_mix import (
    MIX_CYCLE,
    PAPER_EXIT_MIX,
    allocate,
    forced_exits,
    mix_applies,
    realized_shares,
    rows_running,
)
from bench.timing import median, percentile


def test_paper_mix_is_exact_over_a_cycle() -> None:
    assert allocate(PAPER_EXIT_MIX, MIX_CYCLE) == {9: 9, 11: 5, 12: 3, None: 3}
    assert realized_shares(forced_exits(MIX_CYCLE)) == pytest.approx({"9": 0.45, "11": 0.25, "12": 0.15, "full": 0.15})


@pytest.mark.parametrize("count", [1, 7, 32, 33])
def test_allocation_covers_every_image_and_stays_within_one_of_the_share(count: int) -> None:
    counts = allocate(PAPER_EXIT_MIX, count)
    assert sum(counts.values()) == count
    for target, share in PAPER_EXIT_MIX.items():
        assert abs(counts[target] - share * count) < 1
    assert sorted(forced_exits(count), key=str) == sorted(
        [target for target, n in counts.items() for _ in range(n)], key=str
    )


def test_forced_exits_are_deterministic_and_interleaved() -> None:
    order = forced_exits(32)
    assert order == forced_exits(32)
    assert order[:4] != [9, 9, 9, 9]  # not blocked by layer


def test_rows_running_past_each_exit_of_the_mix() -> None:
    assert rows_running(32) == (32, 18, 10, 5)  # 14 leave at 9, 8 at 11, 5 at 12; 5 go full depth
    assert rows_running(MIX_CYCLE) == (20, 11, 6, 3)
    assert rows_running(4, {None: 1.0}) == (4,)  # nobody leaves early


def test_mix_needs_heads_at_the_paper_layers_of_a_12_block_tower() -> None:
    assert mix_applies((9, 11, 12), 12)
    assert not mix_applies((9, 12), 12)
    assert not mix_applies((9, 11, 12), 24)


def test_median_and_percentiles() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert median(values) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile([5.0], 95) == 5.0
