"""A bounded soak: a real uvicorn process, a few hundred varied requests at concurrency 8 with hostile bodies mixed in.

The long run is ``make load`` (bench/load.py, same traffic generators, 2,000 requests at concurrency 16 and six
40 MB bodies).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import load

pytestmark = pytest.mark.slow


def test_soak_has_no_server_errors_and_bounded_memory(tiny_checkpoint: Path) -> None:
    env = {"LRAEE_CHECKPOINT": str(tiny_checkpoint), "LRAEE_THREADS": "1", "LRAEE_SHADOW_RATE": "0.2"}
    with load.serve(env, timeout=600) as (base, pid):
        sampler = load.RssSampler(pid)
        try:
            # Warm-up: first allocations of the worker, decoder pool and text cache are not growth.
            warm = load.mixed_traffic(base, sampler, requests=48, concurrency=4, hostile_share=0.0, seed=1)
            soak = load.mixed_traffic(base, sampler, requests=300, concurrency=8, hostile_share=0.2, seed=2)
        finally:
            sampler.stop()
    assert warm.server_errors == 0 and warm.statuses == {"200": 48}
    assert soak.server_errors == 0, soak.statuses
    refused = sum(count for status, count in soak.statuses.items() if status.startswith("4"))
    assert 30 <= refused <= 100 and soak.statuses["200"] == 300 - refused  # hostile ones 4xx, every other one 200
    growth = soak.rss_after_mib - soak.rss_before_mib
    assert growth < 0.10 * soak.rss_before_mib, (soak.rss_before_mib, soak.rss_after_mib)
    assert soak.rss_peak_mib - soak.rss_before_mib < 200, (soak.rss_before_mib, soak.rss_peak_mib)
