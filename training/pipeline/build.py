"""Step ``build``: every job in order, from a backbone and a data source to a checkpoint and its report.

split -> ranges (static quant modes only) -> profile -> extract -> train-heads -> fit-gate -> calibrate (writes the
checkpoint) -> evaluate (writes the report). Each step skips itself when its output matches its inputs, so a build
that was interrupted, or rerun with a changed late-stage setting, redoes only what changed. The manifest records the
command line and the full config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .calibrate import run_calibrate
from .data import run_split
from .evaluate import run_evaluate
from .features import run_extract
from .gate_fit import run_fit_gate
from .heads import run_train_heads
from .jobs import Job
from .profile import run_profile
from .ranges import run_ranges

STEPS: dict[str, Callable[[Job], Any]] = {
    "split": run_split,
    "ranges": run_ranges,
    "profile": run_profile,
    "extract": run_extract,
    "train-heads": run_train_heads,
    "fit-gate": run_fit_gate,
    "calibrate": run_calibrate,
    "evaluate": run_evaluate,
}


def run_build(job: Job) -> dict[str, Any]:
    """Run every step once, in order (each skipped when up to date); returns the evaluation report."""
    results = [run(job) for run in STEPS.values()]
    report: dict[str, Any] = results[-1]
    return report
