"""The paper's exit mix, assumed: which layer each image of a benchmark batch is forced to leave at.

The per-layer exit shares of the paper's Figure 2(b) were lost in extraction. The benchmark ASSUMES 45% of images
leave at the paper's layer 8, 25% at 10, 15% at 11 and 15% go full depth (0-based, as the paper counts), chosen to
match the reported 13.4% FLOPs saving. This project counts layers from 1, so that is 45% at layer 9, 25% at
layer 11, 15% at layer 12 (the exit head after the last block) and 15% on the full-depth CLIP path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

ExitTarget = int | None  # a 1-based candidate layer, or None for the full-depth path

PAPER_EXIT_MIX: dict[ExitTarget, float] = {9: 0.45, 11: 0.25, 12: 0.15, None: 0.15}
PAPER_MIX_LAYERS = 12  # the mix is defined for a 12-block tower
PAPER_MIX_NOTE = (
    "ASSUMED exit mix (the paper's per-layer shares were lost): 45% at layer 9, 25% at 11, 15% at 12, 15% full "
    "depth (1-based; the paper's 0-based layers 8/10/11), forced per image"
)
MIX_CYCLE = 20  # smallest number of images that holds the mix exactly (9/5/3/3)


def allocate(shares: Mapping[ExitTarget, float], count: int) -> dict[ExitTarget, int]:
    """Split ``count`` images over the targets in proportion to ``shares`` (largest remainder, ties by order)."""
    total = sum(shares.values())
    exact = {target: count * share / total for target, share in shares.items()}
    counts = {target: math.floor(value) for target, value in exact.items()}
    by_remainder = sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)
    for target in by_remainder[: count - sum(counts.values())]:
        counts[target] += 1
    return counts


def forced_exits(count: int, shares: Mapping[ExitTarget, float] = PAPER_EXIT_MIX) -> list[ExitTarget]:
    """Per-image exit targets for ``count`` images, interleaved deterministically (smooth weighted round robin).

    Interleaving keeps any prefix of the list close to the mix, so a cycle of batch-1 calls sees it too.
    """
    counts = allocate(shares, count)
    credit = dict.fromkeys(counts, 0)
    order: list[ExitTarget] = []
    for _ in range(count):
        for target, wanted in counts.items():
            credit[target] += wanted
        chosen = max(credit, key=lambda t: credit[t])
        credit[chosen] -= count
        order.append(chosen)
    return order


def rows_running(count: int, shares: Mapping[ExitTarget, float] = PAPER_EXIT_MIX) -> tuple[int, ...]:
    """Rows of a batch of ``count`` still running before the first candidate and past each one under ``shares``:
    (32, 18, 10, 5) for 32 images under the assumed mix."""
    leaving = allocate(shares, count)
    running = [count]
    for layer in sorted(target for target in leaving if target is not None):
        running.append(running[-1] - leaving[layer])
    return tuple(running)


def realized_shares(targets: Sequence[ExitTarget]) -> dict[str, float]:
    """Share of each target in ``targets``, keyed by layer number or ``"full"`` (JSON-ready)."""
    shares: dict[str, float] = {}
    for target in targets:
        key = "full" if target is None else str(target)
        shares[key] = shares.get(key, 0.0) + 1 / len(targets)
    return shares


def mix_applies(candidate_layers: Sequence[int], num_layers: int) -> bool:
    """True when a checkpoint has exit heads at every layer the paper mix names, on a 12-block tower."""
    needed = {layer for layer in PAPER_EXIT_MIX if layer is not None}
    return num_layers == PAPER_MIX_LAYERS and needed <= set(candidate_layers)
