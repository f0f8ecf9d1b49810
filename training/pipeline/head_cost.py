"""What one exit candidate costs in time, counted in blocks: the figure the candidate search can charge
(``CalibrateConfig.head_cost_blocks``, see :mod:`training.pipeline.search`).

A checkpoint's engine on the service's backend (``LRAEE_BACKEND=auto``) classifies the same seeded images at one
batch size under two exit rules, in interleaved rounds: ``full`` (no head runs: one graph call for the whole tower)
and every head and gate evaluated with nobody leaving (thresholds 1.0: one more call per candidate, its head, its
gate and the engine's work per layer). Their difference per candidate layer, over the ``full`` rule's time per
block, is what a candidate costs in blocks. The ``full`` rule's time includes the embedding stage, the final
pooling and the engine's own work, so a block is slightly overestimated and the cost slightly underestimated.

``python -m training.pipeline.head_cost [--checkpoint everyday] [--batch 1] [--rounds 60] [--out FILE]``

:func:`candidate_charges` is the build's own measurement (``calibrate.charge = "measured"``): every candidate layer
alone, so each is charged its own time, at each batch size the service serves. The engine with exit heads at every
candidate layer is loaded once; for each layer an engine on the same tower with that layer's head and gate alone
runs, with nobody leaving, against the ``full`` rule, in interleaved rounds. The charge is the extra time over a
block's (the ``full`` rule's time over the number of blocks), averaged over the batch sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lraee_core import EarlyExitClassifier, load_classifier, read_manifest
from lraee_core.assets import resolve_checkpoint
from lraee_core.config import ExitPolicy, OperatingPoint
from lraee_core.cpu import cpu_info
from lraee_core.exits import ExitRule

LABELS = ("cat", "dog", "car", "tree", "boat", "house", "bird", "chair", "flower", "street")


def measure(
    checkpoint: str | Path, batch: int, rounds: int, labels: Sequence[str] = LABELS, seed: int = 0
) -> dict[str, Any]:
    """Median seconds per call of both rules over ``rounds`` interleaved rounds, and the cost in blocks."""
    directory = resolve_checkpoint(str(checkpoint))
    quant_mode = read_manifest(directory).quant_mode
    engine = load_classifier(directory, backend="auto")
    backend = engine.backend
    candidates = sorted(engine.heads)
    if not candidates:
        raise ValueError(f"{directory} has no exit heads")
    size = engine.backbone.shape.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    rules = {
        "full": ExitRule.full(),
        "every_head_nobody_leaves": ExitRule.from_thresholds(dict.fromkeys(candidates, 1.0), "never"),
    }
    calls: dict[str, Callable[[], object]] = {
        name: partial(engine.classify, images, list(labels), exit_rule=rule) for name, rule in rules.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: sessions built, caches filled
        call()
        call()
    for round_number in range(rounds):
        order = list(calls) if round_number % 2 == 0 else list(calls)[::-1]
        for name in order:
            started = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - started)
    full = statistics.median(seconds["full"])
    heads = statistics.median(seconds["every_head_nobody_leaves"])
    block = full / engine.num_layers
    per_candidate = (heads - full) / len(candidates)
    return {
        "checkpoint": engine.checkpoint_id,
        "backend": backend,
        "quant_mode": quant_mode,
        "batch": batch,
        "labels": len(labels),
        "rounds": rounds,
        "candidate_layers": candidates,
        "threads": torch.get_num_threads(),
        "full_rule_s": full,
        "every_head_s": heads,
        "block_s": block,
        "per_candidate_s": per_candidate,
        "head_cost_blocks": per_candidate / block,
    }


def _interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median CPU seconds per call of each of ``calls`` over ``rounds`` rounds in alternating order, after warm-up.

    CPU seconds of this process, all its threads (``time.process_time``), not wall time: a build shares its machine
    with other jobs, whose time slices enter wall time and not this process's CPU time (wall-time charges measured
    on a loaded machine came out between -1.0 and +1.3 blocks for the same head at different layers)."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: sessions built, caches filled
        call()
        call()
    for round_number in range(rounds):
        order = list(calls) if round_number % 2 == 0 else list(calls)[::-1]
        for name in order:
            started = time.process_time()
            calls[name]()
            seconds[name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def alone(engine: EarlyExitClassifier, layer: int) -> EarlyExitClassifier:
    """The same tower (and backend sessions) with the exit head and gate of ``layer`` alone, which never let an
    image leave."""
    policy = ExitPolicy((layer,), (OperatingPoint.uniform("never", {layer: 1.0}),), "never")
    return EarlyExitClassifier(
        engine.backbone,
        engine.quant_report,
        {layer: engine.heads[layer]},
        {layer: engine.gates[layer]},
        policy,
        engine.head_config,
        checkpoint_id=engine.checkpoint_id,
    )


def candidate_charges(
    directory: str | Path,
    batches: Sequence[int] = (1, 32),
    rounds: int = 30,
    labels: Sequence[str] = LABELS,
    seed: int = 0,
) -> dict[str, Any]:
    """What each candidate layer of the checkpoint in ``directory`` costs alone, in blocks, on the service's backend
    at each batch size of ``batches`` (module docstring); ``charges`` is the mean over the batch sizes."""
    quant_mode = read_manifest(directory).quant_mode
    engine = load_classifier(directory, backend="auto")
    backend = engine.backend
    size = engine.backbone.shape.image_size
    per_batch: dict[str, dict[str, float]] = {}
    for batch in batches:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        calls: dict[str, Callable[[], object]] = {
            "full": partial(engine.classify, images, list(labels), exit_rule=ExitRule.full())
        }
        for layer in sorted(engine.heads):
            calls[str(layer)] = partial(alone(engine, layer).classify, images, list(labels), operating_point="never")
        medians = _interleaved(calls, rounds)
        block = medians["full"] / engine.num_layers
        per_batch[str(batch)] = {
            "full_rule_s": medians["full"],
            "block_s": block,
            **{layer: (medians[layer] - medians["full"]) / block for layer in calls if layer != "full"},
        }
    layers = [str(layer) for layer in sorted(engine.heads)]
    return {
        "backend": backend,
        "quant_mode": quant_mode,
        "batches": list(batches),
        "labels": len(labels),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "cpu": cpu_info().to_json(),
        "per_batch": per_batch,
        # a head never saves time: a negative difference is noise, charged 0
        "charges": {layer: max(0.0, statistics.mean(per_batch[str(b)][layer] for b in batches)) for layer in layers},
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Print (and with ``--out`` write) the measurement as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="everyday", help="checkpoint directory or embedded name")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the backend's follow)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.checkpoint, args.batch, args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
