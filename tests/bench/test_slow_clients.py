"""Issue 38's scenario scaled down (4 slots, a 1 s grace) against a real uvicorn on loopback: more trickling bodies
than slots, a slow batch holding most of the byte budget, a slow but steady upload above the minimum rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.slow_clients import MIB, Scenario, run

SCALED = Scenario(
    tricklers=6,  # more than the 4 slots
    trickle_every=0.25,
    normal_from=0.8,  # past half the grace: normal requests take the places of trickles that fell behind
    normal_every=0.3,
    normal_within=3.0,  # 2 s at full size; this machine's CPUs are shared
    answered_within=3.0,
    batch_declared=900_000,  # of a 1 MiB budget: a big request (150 kB) does not fit beside it
    batch_phase=2.5,
    batch_requests_every=0.25,
    steady_bytes=150_000,
    steady_rate=60_000,  # twice the minimum rate; 2.5 s, over twice the grace
    server_env={
        "LRAEE_MAX_INFLIGHT_REQUESTS": "4",
        "LRAEE_MAX_INFLIGHT_BYTES": str(MIB),
        "LRAEE_MAX_UPLOAD_BYTES": str(256 * 1024),
        "LRAEE_MAX_LABELS": "10",
        "LRAEE_BODY_MIN_RATE": "30000",
        "LRAEE_BODY_GRACE_SECONDS": "1",
        "LRAEE_BODY_MAX_PAUSE_SECONDS": "2",
    },
)


@pytest.mark.slow
def test_slow_clients_cannot_take_the_service_down(tiny_checkpoint: Path) -> None:
    result = run(SCALED, tiny_checkpoint, threads=1)
    failed = [f"{what}: {measured}" for what, passed, measured in result.checks() if not passed]
    assert not failed, "\n".join(failed) + "\n" + result.report()
    assert result.inflight_during_trickles == 4  # the trickles did take every slot
    assert {o.status for o in result.trickles} <= {408, 429}
    assert all(o.closed for o in result.trickles if o.status == 408)  # a timed-out connection is not reused
    metrics = result.metrics
    too_slow = metrics['lraee_body_timeouts_total{reason="too_slow"}']
    preempted = metrics['lraee_body_timeouts_total{reason="preempted"}']
    assert too_slow >= 1 and preempted >= 1  # trickles timed out, and normal requests took the places of some
    timeouts = sum(o.status == 408 for o in [*result.trickles, result.batch])
    assert (
        too_slow + preempted
        == timeouts
        == metrics['lraee_requests_total{route="/classify",status="408"}']
        + (metrics.get('lraee_requests_total{route="/classify/batch",status="408"}', 0.0))
    )
    assert metrics["lraee_inflight_requests"] == 0 and metrics["lraee_inflight_bytes"] == 0
