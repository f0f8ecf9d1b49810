"""Full-depth vision-tower throughput under FP32, ``paper`` and ``static`` quantization (``reports/quant-modes``).

The timing beside the quant-mode reports (``python -m training.embedded.reports.quant_modes summary``): images/s at
batch 1 and 32 on the default tiny model and on random-init ViT-B-32, rounds interleaved so load drift hits every
mode alike; static ranges come from 48 Tiny-ImageNet training photos (:mod:`bench.static_ranges`). It lives in the
benchmark because it times, and because nothing else may import the benchmark's calibration photos.

``python -m bench.quant_speed [--threads 1] [--repeats 5]`` writes ``reports/quant-modes/speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from lraee_core import load_classifier
from lraee_core.assets import DEFAULT_CHECKPOINT
from lraee_core.backbone import build_backbone
from lraee_core.config import BackboneConfig
from lraee_core.paths import REPO_ROOT
from lraee_core.quantize import quantize_vision

from .static_ranges import bench_ranges

REPORTS = REPO_ROOT / "reports" / "quant-modes"


def speed(threads: int, repeats: int) -> dict[str, Any]:
    """Images/s per model, quant mode and batch size (medians over ``repeats`` interleaved rounds)."""
    torch.set_num_threads(threads)
    results: dict[str, Any] = {"threads": threads, "repeats": repeats, "machine": "2 shared CPU cores"}
    backbones = {
        "default (everyday tiny)": load_classifier(DEFAULT_CHECKPOINT, quant_mode="none").backbone,
        "ViT-B-32 (random init)": build_backbone(BackboneConfig("ViT-B-32")),
    }
    for name, fp32 in backbones.items():
        ranges, note = bench_ranges(fp32)
        towers = {"fp32": fp32.visual}
        for mode in ("paper", "static"):
            towers[mode] = copy.deepcopy(fp32.visual)
            quantize_vision(towers[mode], mode, ranges)
        side = fp32.shape.image_size
        images = torch.randn(32, 3, side, side, generator=torch.Generator().manual_seed(0))
        times: dict[str, dict[int, list[float]]] = {mode: {1: [], 32: []} for mode in towers}
        with torch.inference_mode():
            for tower in towers.values():  # warm-up
                tower(images[:1])
                tower(images)
            for _ in range(repeats):
                for mode, tower in towers.items():
                    for batch in (1, 32):
                        started = time.perf_counter()
                        for index in range(32 // batch):
                            tower(images[index * batch : (index + 1) * batch])
                        times[mode][batch].append(time.perf_counter() - started)
        results[name] = {
            "ranges": note,
            "images_per_s": {
                mode: {str(batch): 32 / statistics.median(passes) for batch, passes in by_batch.items()}
                for mode, by_batch in times.items()
            },
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write ``reports/quant-modes/speed.json``."""
    parser = argparse.ArgumentParser(prog="python -m bench.quant_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "speed.json").write_text(json.dumps(speed(args.threads, args.repeats), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
