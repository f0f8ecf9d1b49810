"""Engine overhead: how much of an ``EarlyExitClassifier`` call is spent outside the vision tower's own stages.

The backbone's stages (``embed``, each span of ``blocks``, ``pool_final``) are wrapped with timers on the loaded
instance, so one engine call reports both its wall time and the part spent inside those stages; the rest is the
engine's own work (exit heads, gates, compaction, text look-ups, results). Rows:

* ``one label set``: ``classify(images, labels)`` at the default operating point, every row the same 5 labels;
* ``varied label sets``: ``classify_rows`` with each row its own 2-20 labels (cached text), as the service batches
  real traffic.

Repeats are interleaved (every case once per round) so drift in a shared machine's load hits every case alike;
medians and the spread (min-max over rounds) are reported.

``python -m bench.engine_overhead [--checkpoint everyday] [--repeats 30] [--out bench/results/engine-<time>.md]``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from lraee_core.assets import resolve_checkpoint
from lraee_core.checkpoint import load_classifier
from lraee_core.engine import EarlyExitClassifier, LabelQuery

from .timing import median

WORDS = tuple(
    f"{adjective} {noun}"
    for adjective in ("red", "small", "old", "striped", "wooden", "shiny", "wet", "tiny")
    for noun in ("cat", "dog", "car", "tree", "boat", "house", "cup", "bird", "chair", "lamp")
)
ONE_LABEL_SET = ("cat", "dog", "car", "tree", "boat")


@dataclass
class StageClock:
    """Seconds spent inside the backbone's stages since the last reset."""

    seconds: float = 0.0
    calls: int = 0


@contextmanager
def clocked_stages(engine: EarlyExitClassifier) -> Iterator[StageClock]:
    """Wrap the backbone's ``embed``, ``blocks`` and ``pool_final`` with timers (instance attributes, undone after)."""
    backbone = engine.backbone
    clock = StageClock()
    originals: dict[str, Callable[..., torch.Tensor]] = {
        name: getattr(backbone, name) for name in ("embed", "blocks", "pool_final")
    }

    def timed(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: object) -> torch.Tensor:
            started = time.perf_counter()
            try:
                return function(*args)
            finally:
                clock.seconds += time.perf_counter() - started
                clock.calls += 1

        return run

    for name, function in originals.items():
        setattr(backbone, name, timed(function))
    try:
        yield clock
    finally:
        for name in originals:
            delattr(backbone, name)  # the class's methods show through again


@dataclass
class Case:
    """One workload: a name, its batch size and the call that runs it."""

    name: str
    batch: int
    run: Callable[[], object]
    engine_ms: list[float] = field(default_factory=list)  # wall time of each timed call
    stages_ms: list[float] = field(default_factory=list)  # time inside the backbone's stages of the same call

    @property
    def overhead_ms(self) -> list[float]:
        """Engine time outside the stages, per call."""
        return [e - s for e, s in zip(self.engine_ms, self.stages_ms, strict=True)]


def build_cases(engine: EarlyExitClassifier, batches: tuple[int, ...], seed: int = 0) -> list[Case]:
    """The one-label-set and (when supported) varied-label-set cases at each batch size."""
    generator = torch.Generator().manual_seed(seed)
    size = engine.backbone.shape.image_size
    draw = random.Random(seed)
    cases = []
    for batch in batches:
        images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1

        def one_label_set(images: torch.Tensor = images) -> object:
            return engine.classify(images, ONE_LABEL_SET)

        cases.append(Case("one label set", batch, one_label_set))
        queries = [engine.query(draw.sample(WORDS, draw.randint(2, 20))) for _ in range(batch)]

        def varied(images: torch.Tensor = images, queries: list[LabelQuery] = queries) -> object:
            return engine.classify_rows(images, queries)

        cases.append(Case("varied label sets", batch, varied))
    return cases


def measure(engine: EarlyExitClassifier, cases: list[Case], warmup: int, repeats: int) -> None:
    """Interleaved rounds: every case once per round, ``warmup`` rounds untimed."""
    with clocked_stages(engine) as clock:
        for round_index in range(warmup + repeats):
            for case in cases:
                clock.seconds = 0.0
                started = time.perf_counter()
                case.run()
                elapsed = time.perf_counter() - started
                if round_index >= warmup:
                    case.engine_ms.append(elapsed * 1e3)
                    case.stages_ms.append(clock.seconds * 1e3)


def report(engine: EarlyExitClassifier, cases: list[Case], command: str) -> str:
    """A markdown table of the cases."""
    lines = [
        f"# Engine overhead: {engine.checkpoint_id} ({engine.backbone.name}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}`; torch threads {torch.get_num_threads()}; default operating point "
        f"`{engine.policy.default_operating_point}`. Medians over interleaved rounds, [min-max] spread.",
        "",
        "| case | batch | engine ms | in stages ms | overhead ms | overhead share | overhead per image ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        engine_ms, stages_ms, overhead = median(case.engine_ms), median(case.stages_ms), median(case.overhead_ms)
        lines.append(
            f"| {case.name} | {case.batch} | {engine_ms:.2f} [{min(case.engine_ms):.2f}-{max(case.engine_ms):.2f}] "
            f"| {stages_ms:.2f} | {overhead:.2f} [{min(case.overhead_ms):.2f}-{max(case.overhead_ms):.2f}] "
            f"| {overhead / engine_ms:.0%} | {overhead / case.batch:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure and print (and optionally write) the overhead table."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="everyday", help="checkpoint directory or embedded name")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = load_classifier(resolve_checkpoint(args.checkpoint))
    cases = build_cases(engine, tuple(int(b) for b in args.batches.split(",")))
    with torch.inference_mode():
        measure(engine, cases, args.warmup, args.repeats)
    command = "python -m bench.engine_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    table = report(engine, cases, command.strip())
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
