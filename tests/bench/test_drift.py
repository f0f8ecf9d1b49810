"""bench.drift's verdicts: which pass is measured, and what the issue's figures read, on synthetic passes."""

from __future__ import annotations

from bench.drift import PassResult, verdicts


def _pass(phase: str, agreement: float, saved: float, queue: float = 1.0, full: float = 10.0) -> PassResult:
    return PassResult(
        phase=phase,
        images=100,
        agreement=agreement,
        flops_saved=saved,
        exit_share=0.5,
        offset=0.0,
        shadow_checks=0.0,
        shadow_dropped=0.0,
        queue_ms_over_wait=[queue],
        full_ms=[full],
    )


def _run(shifted: list[tuple[float, float]], clean_saved: list[float], queue: float = 1.0) -> dict[str, object]:
    passes = [_pass("clean-start", 0.99, 0.40)]
    passes += [_pass(f"shifted-{n}", a, s, queue) for n, (a, s) in enumerate(shifted, 1)]
    passes += [_pass(f"clean-{n}", 0.99, s) for n, s in enumerate(clean_saved, 1)]
    return {"rate": 0.5, "batch_wait_ms": 0.0, "passes": passes}


def test_the_pass_after_the_allowed_ones_is_measured_and_a_later_dip_moves_the_kept_from_pass() -> None:
    run = _run([(0.94, 0.3), (0.97, 0.2), (0.955, 0.2), (0.97, 0.2), (0.98, 0.2)], [0.30, 0.31, 0.33])
    done = verdicts(run, 2)
    assert done["shifted_pass_measured"] == "shifted-3"
    assert done["shifted_ok"] is False  # 95.5% < 96%
    assert done["kept_from_shifted_pass"] == 4  # pass 2 kept it, pass 3 did not: kept from 4 on
    assert done["clean_pass_measured"] == "clean-3" and done["clean_ok"] is True  # 0.33 >= 0.8 x 0.40
    within_five = verdicts(run, 4)
    assert within_five["shifted_pass_measured"] == "shifted-5" and within_five["shifted_ok"] is True


def test_saving_too_little_breaks_the_shifted_figure_and_the_clean_one() -> None:
    done = verdicts(_run([(0.97, 0.2), (0.97, 0.2), (0.99, 0.05)], [0.2, 0.25, 0.31]), 2)
    assert done["shifted_ok"] is False and done["kept_from_shifted_pass"] is None
    assert done["clean_ok"] is False  # 0.31 < 0.32


def test_a_live_request_delayed_past_one_full_depth_pass_fails_the_delay_figure() -> None:
    assert verdicts(_run([(0.97, 0.2)] * 3, [0.4] * 3, queue=9.0), 2)["delay_ok"] is True
    assert verdicts(_run([(0.97, 0.2)] * 3, [0.4] * 3, queue=11.0), 2)["delay_ok"] is False
