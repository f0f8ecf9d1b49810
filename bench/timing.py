"""Timing and memory probes: medians of repeated passes, latency percentiles, resident-set size.

Every figure the benchmark prints is the median of ``repeats`` timed passes after ``warmup`` untimed ones, so a
one-off stall of this shared machine moves no figure by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KIB_PER_MIB = 1024
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@dataclass
class PassTimes:
    """Wall-clock seconds of the timed passes of one workload, plus per-call latencies inside them."""

    passes: list[float] = field(default_factory=list)  # seconds per pass, warm-up excluded
    calls: list[float] = field(default_factory=list)  # seconds per call, every call of every timed pass

    @property
    def median_pass(self) -> float:
        """Median seconds per pass."""
        return median(self.passes)


def time_passes(run_pass: Callable[[], list[float]], *, warmup: int, repeats: int) -> PassTimes:
    """Run ``warmup`` untimed then ``repeats`` timed passes; ``run_pass`` returns the seconds of each call it made.

    A pass's time is measured around the whole pass (so work between calls counts), the call times only feed the
    latency percentiles.
    """
    for _ in range(warmup):
        run_pass()
    times = PassTimes()
    for _ in range(repeats):
        start = time.perf_counter()
        calls = run_pass()
        times.passes.append(time.perf_counter() - start)
        times.calls.extend(calls)
    return times


def timed_calls(calls: Sequence[Callable[[], object]]) -> list[float]:
    """Run each callable in order and return the seconds each took."""
    seconds = []
    for call in calls:
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (``getrusage`` ru_maxrss), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (KIB_PER_MIB * KIB_PER_MIB) if sys.platform == "darwin" else peak / KIB_PER_MIB


def _status_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _return_free_heap() -> None:
    """Give freed malloc memory back to the OS (glibc), so work that reuses it still shows up as growth."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssProbe:
    """How much resident memory a piece of work adds at its peak, measured in this process.

    Linux lets a process reset its own high-water mark (``echo 5 > /proc/self/clear_refs``), so the peak reached
    during the work, minus the resident size before it, is what the work needed on top of what was already there.
    Where that reset is unavailable the probe reports None rather than a misleading number.
    """

    def __init__(self) -> None:
        self.before_kib: int | None = None
        self.growth_mib: float | None = None

    def __enter__(self) -> RssProbe:
        _return_free_heap()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return self
        self.before_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_kib("VmHWM")
        if self.before_kib is not None and peak is not None:
            self.growth_mib = max(0, peak - self.before_kib) / KIB_PER_MIB
