"""``python -m bench.run`` (``make bench``): LRA-EE against the full-depth baselines on this machine's CPU.

For each backbone it measures every row at batch 1 and batch 32, derives the ratios, the early-exit efficiency, the
cost of the heads and of text encoding, one block's anatomy per backend and, unless skipped, the service under
concurrent clients; it prints a report and writes ``bench/results/latest.json`` (+ a timestamped copy) and
``latest.md``. Exits non-zero when a service request failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime
import open_clip
import torch

from .anatomy import block_by_rows, block_timings, profile_block
from .exit_mix import PAPER_EXIT_MIX, PAPER_MIX_NOTE
from .photos import BenchImages, everyday_dir, everyday_photos, noise_images
from .report import advice, efficiencies, ratios, render, standing
from .service import ServiceSkipped, run_service
from .text_cost import measure_text_cost
from .timing import max_rss_mib
from .under_test import (
    BACKBONES,
    DEFAULT,
    RANDOM_WEIGHTS_NOTE,
    SERVICE_ENGINE,
    VIT_B_32,
    BackboneUnderTest,
    build_backbone_under_test,
)
from .workloads import FEW_LABELS, LARGE_BATCH, imagenet_labels, measure_interleaved, row_key, workloads

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers every count that is not given explicitly."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny repeat counts (smoke test), composed ORT tower")
    parser.add_argument(
        "--backbones", default=",".join(BACKBONES), help=f"comma-separated, from {', '.join(BACKBONES)}"
    )
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds (default 7; quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before each figure (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--labels", type=int, default=1000, help="ImageNet class names per label set (default 1000)")
    parser.add_argument("--text-cold-repeats", type=int, help="fresh-cache text encodings (default 1)")
    parser.add_argument(
        "--no-photos", dest="photos", action="store_false", help="noise images for the default model too"
    )
    parser.add_argument(
        "--test-photos",
        action="store_true",
        help="the default model's photos from the everyday sets' sealed test split instead of validation (a "
        "release's final figure only)",
    )
    parser.add_argument(
        "--text-full-context",
        action="store_true",
        help="also time open_clip's full-context text encoder (ViT-B-32: ~4 more minutes)",
    )
    parser.add_argument("--skip-service", action="store_true", help="do not start the app")
    parser.add_argument(
        "--service-backbones",
        default=DEFAULT,
        help=f"backbones whose service section runs (default {DEFAULT}: the served model; ViT-B-32's takes minutes)",
    )
    parser.add_argument("--service-labels", type=int, default=100, help="labels per service request (default 100)")
    parser.add_argument("--service-requests", type=int, help="requests per timed round (default 128; quick 16)")
    parser.add_argument("--service-concurrency", default="8,32", help="client counts (default 8,32)")
    parser.add_argument(
        "--service-transport",
        choices=("json", "multipart"),
        default="json",
        help="request encoding (default json: repeated multipart label fields cost the client and the server "
        "~0.1 s of CPU per 1000 labels)",
    )
    parser.add_argument("--service-time-limit", type=float, default=900.0, help="seconds per service section")
    parser.add_argument(
        "--ort-tower",
        choices=("export", "compose"),
        help="ORT full-depth graph: one torch.onnx.export of the tower (default) or the staged graphs chained "
        "(quick default; same graph, seconds instead of a minute)",
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON and Markdown go")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.text_cold_repeats = args.text_cold_repeats or 1
    args.service_requests = args.service_requests or (16 if args.quick else 128)
    args.ort_tower = args.ort_tower or ("compose" if args.quick else "export")
    args.backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    unknown = set(args.backbones) - set(BACKBONES)
    if unknown:
        parser.error(f"unknown backbones {sorted(unknown)}; expected {', '.join(BACKBONES)}")
    args.service_concurrency = [int(c) for c in args.service_concurrency.split(",")]
    args.service_backbones = {name.strip() for name in args.service_backbones.split(",") if name.strip()}
    if min(args.repeats, args.threads, args.labels, args.service_labels, *args.service_concurrency) < 1:
        parser.error("counts must be positive")
    return args


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _busy_processes(limit: int = 5) -> list[str]:
    """The other processes using the most CPU right now (ps), so a reader knows what shared the machine."""
    try:
        listing = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return []
    own = str(os.getpid())
    busy = [line.strip()[:160] for line in listing if line.split(None, 1)[0] != own and " ps -eo " not in line]
    return busy[:limit]


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _describe(under_test: BackboneUnderTest) -> str:
    backbone = under_test.fp32
    weights = RANDOM_WEIGHTS_NOTE if backbone.config.pretrained is None else f"weights {backbone.config.pretrained}"
    shape = backbone.shape
    return (
        f"{backbone.config.model_name} ({shape.num_layers} blocks, width {shape.width}, {shape.num_tokens} tokens, "
        f"{shape.image_size}px), {weights}; checkpoint quant mode {under_test.own_mode!r}"
    )


def bench_images(under_test: BackboneUnderTest, photos: bool, test_photos: bool = False) -> BenchImages:
    """Real everyday photos for a trained checkpoint (its operating points depend on what it sees; validation
    photos, or with ``test_photos`` the sealed test split's), noise for random weights or without the shared
    photos."""
    side = under_test.fp32.shape.image_size
    if under_test.name == VIT_B_32:
        return noise_images(side, LARGE_BATCH, f"{VIT_B_32} has random weights; its early exits are forced")
    if not photos:
        return noise_images(side, LARGE_BATCH, "--no-photos")
    found = everyday_photos(under_test.fp32.preprocess, LARGE_BATCH, test=test_photos)
    return found or noise_images(side, LARGE_BATCH, f"the shared photos are not at {everyday_dir()}")


def bench_backbone(name: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], int]:
    """Everything measured for one backbone, as a JSON-ready dict, and its count of failed service requests."""
    _log(f"{name}: building checkpoint, engines and ORT graphs")
    under_test = build_backbone_under_test(name, workdir, args.threads, tower_method=args.ort_tower)
    labels = imagenet_labels(args.labels)
    own = under_test.engines[SERVICE_ENGINE]

    _log(f"{name}: text embeddings, {len(labels)} labels cold x{args.text_cold_repeats} and cached")
    text, cache = measure_text_cost(
        own,
        labels,
        cold_repeats=args.text_cold_repeats,
        cached_repeats=max(args.repeats, 5),
        full_context=args.text_full_context,
    )
    under_test.share_text_cache(cache)

    shape = under_test.fp32.shape
    inputs = bench_images(under_test, args.photos, args.test_photos)
    row_labels = list(inputs.labels) if inputs.labels is not None else labels
    rows = measure_interleaved(
        workloads(under_test, row_labels, inputs.classes),
        inputs.images,
        warmup=args.warmup,
        repeats=args.repeats,
        progress=lambda message: _log(f"{name}: {message}"),
    )

    _log(f"{name}: block anatomy")
    anatomy = {
        "timings": [dataclasses.asdict(t) for t in block_timings(under_test, warmup=args.warmup, repeats=args.repeats)],
        "profile_paper_batch32": profile_block(under_test, repeats=args.repeats),
        "by_rows": [dataclasses.asdict(t) for t in block_by_rows(under_test, warmup=args.warmup, repeats=args.repeats)],
    }

    cost = own.flops(len(row_labels))
    candidates = own.policy.candidate_layers
    flops: dict[str, Any] = {
        "full_depth": cost.full_depth,
        "block": cost.block,
        "head": cost.head,
        "gate": cost.gate,
        "head_plus_gate_share": len(candidates) * (cost.head + cost.gate) / cost.full_depth,
        "paper_mix_saving": cost.expected_saving(
            candidates, {"full" if k is None else k: v for k, v in PAPER_EXIT_MIX.items()}
        )
        if under_test.mix_applies
        else None,
    }

    service: dict[str, Any] | None = None
    service_errors = 0
    if not args.skip_service and name in args.service_backbones:
        _log(f"{name}: service, {args.service_concurrency} clients")
        try:
            result = run_service(
                under_test.checkpoint.directory,
                own,
                row_labels[: args.service_labels],
                threads=args.threads,
                concurrency_levels=args.service_concurrency,
                requests_per_round=args.service_requests,
                warmup=args.warmup,
                repeats=args.repeats,
                time_limit_s=args.service_time_limit,
                log_path=workdir / "server.log",
                transport=args.service_transport,
            )
            service = dataclasses.asdict(result)
            service_errors = result.errors
        except ServiceSkipped as skipped:
            service = {"skipped": str(skipped)}
            _log(f"{name}: service section skipped: {skipped}")

    default_point_key = None
    if not under_test.mix_applies:
        default_point_key = row_key(SERVICE_ENGINE, f"op_{own.policy.default_operating_point}")
    notes = list(under_test.checkpoint.notes)
    notes.append(inputs.note)
    if under_test.mix_applies:
        notes.append(f"* {PAPER_MIX_NOTE}")
    else:
        notes.append(f"paper exit mix rows skipped: the checkpoint has no exit heads at all of {list(PAPER_EXIT_MIX)}")
    notes.append(f"ORT full-depth graph: {under_test.ort_tower.method}")
    caps = {p.name: p.label_cap for p in own.policy.operating_points if p.label_cap is not None}
    if caps:
        listed = ", ".join(f"{name} {cap}" for name, cap in caps.items())
        notes.append(
            f"label caps (the most labels for which a point runs its exits; more run the `full` path): {listed}; "
            f"these rows ask {len(row_labels)} labels"
        )
    if not under_test.mix_applies and inputs.classes is not None:
        notes.append(
            f"few-labels rows: each image against {FEW_LABELS} labels of its own (its class and {FEW_LABELS - 1} "
            "others, seeded), one query per image through classify_rows"
        )
    notes.append(
        "LRA-EE rows use the engine's classify() (per-image results, top-5); the full-depth baselines compute "
        "logits, softmax and top-5 as a user would"
    )
    entry: dict[str, Any] = {
        "description": _describe(under_test),
        "notes": notes,
        "checkpoint": str(under_test.checkpoint.directory),
        "quant_mode": under_test.own_mode,
        "shape": dataclasses.asdict(shape),
        "candidate_layers": list(candidates),
        "operating_points": {
            p.name: {str(count): thresholds for count, thresholds in p.by_label_count}
            for p in own.policy.operating_points
        },
        "label_caps": caps,
        "default_operating_point": own.policy.default_operating_point,
        "labels": len(row_labels),
        "flops": flops,
        "setup": {"seconds": under_test.setup_seconds, "rss_growth_mib": under_test.setup_rss_mib},
        "text": {**dataclasses.asdict(text), "cold_over_cached": text.cold_over_cached},
        "rows": [dataclasses.asdict(row) for row in rows],
        "ratios": [dataclasses.asdict(r) for r in ratios(rows, default_point_key)],
        "service_backend": under_test.service_backend,
        "early_exit_efficiency": [dataclasses.asdict(e) for e in efficiencies(rows)],
        "block_anatomy": anatomy,
        "service": service,
    }
    entry["standing"] = standing(entry)
    entry["advice"] = advice(entry)
    return entry, service_errors


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(UTC)
    meta: dict[str, Any] = {
        "timestamp": started.isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "quick": args.quick,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "text_cold_repeats": args.text_cold_repeats,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "load_average_before": _load_average(),
        "other_processes_before": _busy_processes(),
        "exit_mix": {"shares": {str(k or "full"): v for k, v in PAPER_EXIT_MIX.items()}, "note": PAPER_MIX_NOTE},
    }
    result: dict[str, Any] = {"schema": 1, "meta": meta, "backbones": {}}
    failed_requests = 0
    with tempfile.TemporaryDirectory(prefix="lraee-bench-") as tmp:
        for name in args.backbones:
            workdir = Path(tmp) / name.replace("/", "_")
            entry, errors = bench_backbone(name, args, workdir)
            result["backbones"][name] = entry
            failed_requests += errors
            gc.collect()
    meta["load_average_after"] = _load_average()
    meta["other_processes_after"] = _busy_processes()
    meta["seconds"] = (datetime.now(UTC) - started).total_seconds()
    result["peak_rss_mib"] = max_rss_mib()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    payload = json.dumps(result, indent=2) + "\n"
    (args.output_dir / "latest.json").write_text(payload)
    (args.output_dir / f"bench-{stamp}.json").write_text(payload)
    (args.output_dir / "latest.md").write_text(render(result, markdown=True))
    print(render(result))
    print(f"wrote {args.output_dir / 'latest.json'}, bench-{stamp}.json and latest.md")
    if failed_requests:
        print(f"FAILED: {failed_requests} service request(s) failed; see the service section", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
