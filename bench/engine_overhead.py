"""Engine overhead: how much of an ``EarlyExitClassifier`` call is spent outside the vision tower's own stages.

The backbone's calls (``span``, ``embed``, ``blocks``, ``block``, ``pool_final``) are wrapped with timers on the
loaded instance, the outermost call counting once, so one engine call reports both its wall time and the part spent
inside the backbone; the rest is the engine's own work (compaction, exit decisions, text look-ups, results). On a
backend that compiles spans (onnxruntime) the exit heads, gates and final pooling run inside the span's graph and
count as backbone time; on the torch backend they run in ``span`` too. Rows:

* ``one label set``: ``classify(images, labels)`` at the default operating point, every row the same 5 labels;
* ``varied label sets, one joint call``: ``classify_rows`` with each row its own 2-20 labels (cached text), as the
  service batches real traffic;
* ``varied label sets, one call per row``: the same rows, one ``classify`` call each: what the service did when only
  requests with identical label sets shared a batch;
* with ``--reference REV``: the engine of git revision REV on the same backbone, heads and text cache, timed in the
  same rounds (an A/B of the engine code alone under the same machine load).

Repeats are interleaved (every case once per round) so drift in a shared machine's load hits every case alike;
medians and the spread (min-max over rounds) are reported.

``python -m bench.engine_overhead [--checkpoint everyday] [--repeats 30] [--out bench/results/engine-<time>.md]``
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lraee_core.assets import resolve_checkpoint
from lraee_core.checkpoint import load_classifier
from lraee_core.engine import EarlyExitClassifier, LabelQuery
from lraee_core.paths import REPO_ROOT

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
    """Wrap the backbone's calls with timers (instance attributes, undone after); a call made inside another timed
    call (the torch ``span`` calls ``embed`` and ``blocks``, ``blocks`` calls ``block``) is not counted again."""
    backbone = engine.backbone
    clock = StageClock()
    stages = ("span", "embed", "blocks", "block", "pool_final")
    originals: dict[str, Callable[..., Any]] = {name: getattr(backbone, name) for name in stages}
    depth = [0]

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: object, **kwargs: object) -> Any:
            depth[0] += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
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


def reference_engine(engine: EarlyExitClassifier, revision: str) -> Any:
    """The ``EarlyExitClassifier`` of ``lraee_core/engine.py`` at git ``revision``, built on ``engine``'s very
    backbone, heads, gates and text cache: an A/B of the engine code alone, timed in the same rounds."""
    source = subprocess.run(
        ["git", "show", f"{revision}:lraee_core/engine.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    name = f"lraee_core._engine_at_{revision}"
    module = types.ModuleType(name)
    module.__package__ = "lraee_core"  # its relative imports resolve to today's modules
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"lraee_core/engine.py@{revision}", "exec"), module.__dict__)
    old = module.EarlyExitClassifier(
        engine.backbone,
        engine.quant_report,
        engine.heads,
        engine.gates,
        engine.policy,
        engine.head_config,
        checkpoint_id=engine.checkpoint_id,
        manifest=engine.manifest,
    )
    old.text_cache = engine.text_cache
    return old


def build_cases(
    engine: EarlyExitClassifier, batches: tuple[int, ...], reference: Any = None, seed: int = 0
) -> list[Case]:
    """The cases at each batch size (with ``reference``, an older engine, its rows too)."""
    generator = torch.Generator().manual_seed(seed)
    size = engine.backbone.shape.image_size
    draw = random.Random(seed)
    cases = []
    for batch in batches:
        images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
        label_sets = [draw.sample(WORDS, draw.randint(2, 20)) for _ in range(batch)]
        queries = [engine.query(labels) for labels in label_sets]

        def one_label_set(images: torch.Tensor = images, engine: Any = engine) -> object:
            return engine.classify(images, ONE_LABEL_SET)

        def varied(images: torch.Tensor = images, queries: list[LabelQuery] = queries) -> object:
            return engine.classify_rows(images, queries)

        def one_call_per_label_set(images: torch.Tensor = images, label_sets: list[list[str]] = label_sets) -> object:
            # What the service did before it batched across label sets: every request its own engine call.
            runner = reference if reference is not None else engine
            return [runner.classify(images[row : row + 1], labels) for row, labels in enumerate(label_sets)]

        cases.append(Case("one label set", batch, one_label_set))
        if reference is not None:
            cases.append(Case("one label set, reference engine", batch, partial(one_label_set, engine=reference)))
        cases.append(Case("varied label sets, one joint call", batch, varied))
        if batch > 1:
            who = "reference engine" if reference is not None else "this engine"
            cases.append(Case(f"varied label sets, one call per row ({who})", batch, one_call_per_label_set))
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
        f"Command: `{command}`; backbone {type(engine.backbone).__name__}; torch threads {torch.get_num_threads()}; "
        "default operating point "
        f"`{engine.policy.default_operating_point}`. Medians over interleaved rounds, [min-max] spread.",
        "",
        "| case | batch | engine ms | images/s | in stages ms | overhead ms | overhead share | overhead per image ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        engine_ms, stages_ms, overhead = median(case.engine_ms), median(case.stages_ms), median(case.overhead_ms)
        lines.append(
            f"| {case.name} | {case.batch} | {engine_ms:.2f} [{min(case.engine_ms):.2f}-{max(case.engine_ms):.2f}] "
            f"| {case.batch / engine_ms * 1e3:.0f} | {stages_ms:.2f} "
            f"| {overhead:.2f} [{min(case.overhead_ms):.2f}-{max(case.overhead_ms):.2f}] "
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
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"], help="what runs the blocks")
    parser.add_argument(
        "--reference", default=None, help="git revision whose engine.py is timed beside this one (an A/B)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = load_classifier(resolve_checkpoint(args.checkpoint), backend=args.backend)
    reference = reference_engine(engine, args.reference) if args.reference else None
    cases = build_cases(engine, tuple(int(b) for b in args.batches.split(",")), reference)
    with torch.inference_mode():
        measure(engine, cases, args.warmup, args.repeats)
    command = "python -m bench.engine_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    table = report(engine, cases, command.strip())
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
