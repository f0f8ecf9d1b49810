"""Promises when the photos change: the threshold controller measured through ``/classify`` (issue 37's figures).

For each shadow rate (0.5, and the service's default), a fresh service (uvicorn on loopback, the default checkpoint
unless ``--checkpoint``) gets, one request at a time, at ``balanced`` and K = 2:

1. one pass of clean photos (the saving to come back to);
2. ``--shifted-passes`` passes of the same photos made grayscale, blurred (Gaussian, r = 2) and saved as JPEG at
   quality 8;
3. ``--clean-passes`` passes of the clean photos again.

Every pass draws new labels: each photo's true class name and one other name of its set. Right after each
``balanced`` request the same photo and labels go to ``full``, the reference its agreement is measured against
(``full`` is never controlled nor sampled). Each pass reports agreement, FLOPs saved (the responses' mean), the
controller's offset (``GET /thresholds``) and how many shadow checks ran and were dropped.

The photos, read at run time and never part of the project:

* ImageNet-class photos of the 202 Tiny classes: the real ILSVRC2012 validation photos (``acuity/``), then Tiny
  validation photos (``val/``) up to ``--imagenet`` photos, from the extracted ``data/imagenet-photos``
  (``python -m training.embedded.photos``; ``--imagenet-dir``), against Tiny class names;
* everyday photos of the everyday sets' validation split (``training.embedded.everyday.everyday_validation_split``:
  used by no build step) from ``../shared/data/everyday-photos``, ``--everyday`` of them, against their sets' class
  names.

Live-request delay: each ``balanced`` answer's queue time (admission to the start of its engine batch) minus the
batch wait the server ran with (``LRAEE_MAX_BATCH_WAIT_MS``, default 0: an idle engine starts at once), against one
image's full-depth pass (the median engine time of the ``full`` requests, one image each): a shadow check that is
running when a request arrives delays it by at most the rest of that check. At the default wait of 0 the figure is
the delay itself; with a wait set, a request that arrived during a check skipped the wait (the worker was busy), so
its delay reads up to that wait short.

Run: ``python -m bench.drift`` (writes ``bench/results/drift-<time>.json`` and ``.md``; several minutes on a quiet
machine); ``--smoke``: a few photos, rate 0.5 only, nothing written (under a minute).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageFilter

from app.local_server import serving
from app.settings import Settings
from lraee_core.paths import REPO_ROOT, photos_root

PROMISE_POINT = "balanced"
RESULTS = REPO_ROOT / "bench" / "results"
MAX_BATCH_WAIT_MS = float(Settings.model_fields["max_batch_wait_ms"].default)
DEFAULT_RATE = float(Settings.model_fields["shadow_rate"].default)


@dataclass(frozen=True)
class Photo:
    """One photo of the stream: its bytes, its true class name and the names it may be confused with."""

    data: bytes
    truth: str
    others: tuple[str, ...]  # the other class names of its set
    source: str  # "imagenet:<file>" or "everyday:<set>:<member>"


@dataclass
class PassResult:
    """One pass of the stream through the service."""

    phase: str  # "clean-start", "shifted-N", "clean-N"
    images: int
    agreement: float  # balanced top-1 == full top-1
    flops_saved: float  # mean over balanced answers
    exit_share: float  # balanced answers from an exit head
    offset: float | None  # the balanced band's threshold offset after the pass (K = 2); None: no controller
    shadow_checks: float  # shadow checks run so far (all points)
    shadow_dropped: float  # samples dropped so far
    queue_ms_over_wait: list[float] = field(default_factory=list, repr=False)  # per answer
    full_ms: list[float] = field(default_factory=list, repr=False)  # the full requests' engine time


def shift(data: bytes) -> bytes:
    """Grayscale, Gaussian blur r = 2, JPEG at quality 8 (the issue's shifted stream)."""
    image = Image.open(io.BytesIO(data)).convert("L").filter(ImageFilter.GaussianBlur(2)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=8)
    return buffer.getvalue()


def imagenet_photos(directory: Path, count: int, seed: int) -> list[Photo]:
    """ILSVRC2012 validation photos of the Tiny classes, then a seeded sample of Tiny validation photos, ``count`` in
    all, against the Tiny class names."""
    from training.embedded.photo_clip import scan_photos
    from training.embedded.photos import CLASSES_TSV

    if count <= 0:
        return []
    classes_tsv = photos_root() / CLASSES_TSV
    tiny = scan_photos(directory / "val", classes_tsv)
    ilsvrc = scan_photos(directory / "acuity", classes_tsv, tiny.wnids)
    chosen = list(zip(ilsvrc.paths, ilsvrc.labels, strict=True))[:count]
    rest = list(zip(tiny.paths, tiny.labels, strict=True))
    random.Random(seed).shuffle(rest)
    chosen += rest[: count - len(chosen)]
    names = tiny.names
    return [
        Photo(path.read_bytes(), names[label], tuple(n for n in names if n != names[label]), f"imagenet:{path.name}")
        for path, label in chosen
    ]


def everyday_photos(count: int) -> list[Photo]:
    """Everyday photos of the validation split, the sets' classes in turn, against their set's class names."""
    from bench.photos import SETS, _photos_by_class, everyday_dir
    from training.embedded.everyday import SET_CLASSES, EverydayClipConfig, everyday_validation_split

    if count <= 0:
        return []
    folder = everyday_dir()
    validation, _ = everyday_validation_split(EverydayClipConfig(everyday_dir=str(folder)))
    by_class: list[tuple[str, list[str], list[tuple[str, bytes]]]] = []
    for name in SETS:
        tar, classes = SET_CLASSES[name]
        found = _photos_by_class(folder / tar, per_class=count, wanted=set(validation[name]))
        labels = sorted(classes)
        for label in labels:
            by_class.append((label, [other for other in labels if other != label], found.get(label, [])))
    photos: list[Photo] = []
    for index in range(count):
        for label, others, members in by_class:
            if index < len(members) and len(photos) < count:
                member, data = members[index]
                photos.append(Photo(data, label, tuple(others), f"everyday:{member}"))
    return photos


def classify(client: httpx.Client, photo: bytes, labels: list[str], point: str) -> dict[str, Any]:
    response = client.post(
        "/classify",
        files={"image": ("photo", photo, "application/octet-stream")},
        data={"labels": labels, "operating_point": point, "top_k": "1"},
    )
    response.raise_for_status()
    return dict(response.json())


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def balanced_offset(client: httpx.Client) -> float | None:
    state = client.get("/thresholds").json()
    bands = [band for band in state.get("bands", []) if band["operating_point"] == PROMISE_POINT]
    for band in bands:  # the band holding K = 2
        start = band["labels"].split("-")[0].rstrip("+")
        end = band["labels"].split("-")[1] if "-" in band["labels"] else None
        if int(start) <= 2 and (end is None or int(end) >= 2):
            return float(band["offset"])
    return None


def server_batch_wait_ms(env: Mapping[str, str]) -> float:
    """The batch wait a server started with ``env`` runs with: its ``LRAEE_MAX_BATCH_WAIT_MS``, else the default."""
    value = env.get("LRAEE_MAX_BATCH_WAIT_MS")
    return MAX_BATCH_WAIT_MS if value is None else float(value)


def run_pass(
    client: httpx.Client, phase: str, photos: list[Photo], shifted: bool, rng: random.Random, batch_wait_ms: float
) -> PassResult:
    agreed = exits = 0
    saved = 0.0
    queue, full_ms = [], []
    for photo in photos:
        labels = [photo.truth, rng.choice(photo.others)]
        rng.shuffle(labels)
        data = shift(photo.data) if shifted else photo.data
        answer = classify(client, data, labels, PROMISE_POINT)
        reference = classify(client, data, labels, "full")
        agreed += answer["predictions"][0]["label"] == reference["predictions"][0]["label"]
        exits += answer["exit_path"] == "head"
        saved += answer["flops_saved"]
        queue.append(answer["timing_ms"]["queue"] - batch_wait_ms)
        full_ms.append(reference["timing_ms"]["inference"])
    exposition = client.get("/metrics").text
    return PassResult(
        phase,
        len(photos),
        agreed / len(photos),
        saved / len(photos),
        exits / len(photos),
        balanced_offset(client),
        metric(exposition, "lraee_shadow_checks_total"),
        metric(exposition, "lraee_shadow_dropped_total"),
        queue,
        full_ms,
    )


def run_rate(rate: float, photos: list[Photo], args: argparse.Namespace, log: Any = sys.stdout) -> dict[str, Any]:
    """One fresh service at shadow rate ``rate``: clean, shifted, clean passes."""
    env = {**os.environ, "LRAEE_SHADOW_RATE": str(rate), "LRAEE_THREADS": str(args.threads)}
    if args.checkpoint:
        env["LRAEE_CHECKPOINT"] = args.checkpoint
    batch_wait_ms = server_batch_wait_ms(env)
    passes: list[PassResult] = []
    rng = random.Random(args.seed)
    with (
        serving(env, output=subprocess.DEVNULL) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
    ):
        phases = [("clean-start", False)]
        phases += [(f"shifted-{n}", True) for n in range(1, args.shifted_passes + 1)]
        phases += [(f"clean-{n}", False) for n in range(1, args.clean_passes + 1)]
        for phase, shifted in phases:
            started = time.perf_counter()
            result = run_pass(client, phase, photos, shifted, rng, batch_wait_ms)
            passes.append(result)
            print(
                f"rate {rate:g} {phase:12s} agreement {100 * result.agreement:5.1f}%  saved "
                f"{100 * result.flops_saved:5.1f}%  exits {100 * result.exit_share:5.1f}%  offset {result.offset}  "
                f"checks {result.shadow_checks:.0f} dropped {result.shadow_dropped:.0f}  "
                f"({time.perf_counter() - started:.0f} s)",
                file=log,
                flush=True,
            )
        changes = client.get("/thresholds").json().get("changes", [])
    return {"rate": rate, "batch_wait_ms": batch_wait_ms, "passes": passes, "changes": changes}


def verdicts(run: dict[str, Any], recover_within: int) -> dict[str, Any]:
    """The issue's 'Done when' figures of one rate's run."""
    passes: list[PassResult] = run["passes"]
    start = passes[0]
    shifted = [p for p in passes if p.phase.startswith("shifted")]
    clean = [p for p in passes if p.phase.startswith("clean-") and p.phase != "clean-start"]
    # The pass after `recover_within` shifted passes (the third after two) is the one that must keep the promise.
    # The first shifted pass from which every later one keeps the promise (1-based; None: the last one misses it).
    kept = [p.agreement >= 0.96 and p.flops_saved >= 0.13 for p in shifted]
    recovered = next((i + 1 for i in range(len(kept)) if all(kept[i:])), None)
    measured = shifted[recover_within] if len(shifted) > recover_within else None
    after_clean = clean[2] if len(clean) > 2 else (clean[-1] if clean else None)
    queue = [q for p in passes for q in p.queue_ms_over_wait]
    full_ms = statistics.median([f for p in passes for f in p.full_ms])
    return {
        "rate": run["rate"],
        "shifted_pass_measured": None if measured is None else measured.phase,
        "shifted_agreement": None if measured is None else measured.agreement,
        "shifted_flops_saved": None if measured is None else measured.flops_saved,
        "shifted_ok": measured is not None and measured.agreement >= 0.96 and measured.flops_saved >= 0.13,
        "kept_from_shifted_pass": recovered,
        "clean_pass_measured": None if after_clean is None else after_clean.phase,
        "clean_saved_ratio": None
        if after_clean is None or start.flops_saved <= 0
        else after_clean.flops_saved / start.flops_saved,
        "clean_ok": after_clean is not None and after_clean.flops_saved >= 0.8 * start.flops_saved,
        "full_depth_ms_median": full_ms,
        "batch_wait_ms": run["batch_wait_ms"],
        "queue_over_wait_ms_max": max(queue),
        "queue_over_wait_ms_p99": sorted(queue)[int(0.99 * (len(queue) - 1))],
        "delay_ok": max(queue) <= full_ms,
    }


def report(runs: list[dict[str, Any]], summary: list[dict[str, Any]], command: str, note: str) -> str:
    lines = [f"# Threshold controller under shifted photos ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", ""]
    lines += [f"Command: `{command}`", "", note, ""]
    for run, done in zip(runs, summary, strict=True):
        lines += [f"## Shadow rate {run['rate']:g}", ""]
        lines += [
            "| pass | agreement | FLOPs saved | exits | offset | shadow checks (dropped) |",
            "|---|---|---|---|---|---|",
        ]
        for p in run["passes"]:
            lines.append(
                f"| {p.phase} | {100 * p.agreement:.1f}% | {100 * p.flops_saved:.1f}% | {100 * p.exit_share:.1f}% | "
                f"{p.offset} | {p.shadow_checks:.0f} ({p.shadow_dropped:.0f}) |"
            )
        lines += ["", "```", json.dumps(done, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checkpoint", default=None, help="LRAEE_CHECKPOINT (default: the service's default)")
    parser.add_argument("--imagenet-dir", type=Path, default=REPO_ROOT / "data" / "imagenet-photos")
    parser.add_argument("--imagenet", type=int, default=490, help="ImageNet-class photos per pass")
    parser.add_argument("--everyday", type=int, default=490, help="everyday validation photos per pass")
    parser.add_argument("--rates", default=f"0.5,{DEFAULT_RATE:g}", help="shadow rates, one fresh service each")
    parser.add_argument("--shifted-passes", type=int, default=6)
    parser.add_argument("--clean-passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="24 photos, rate 0.5, 2 + 1 passes; nothing written")
    args = parser.parse_args(argv)
    if args.smoke:
        args.imagenet, args.everyday, args.rates, args.shifted_passes, args.clean_passes = 12, 12, "0.5", 2, 1
    photos = imagenet_photos(args.imagenet_dir, args.imagenet, args.seed) + everyday_photos(args.everyday)
    if not photos:
        raise SystemExit("no photos: extract them (python -m training.embedded.photos) or pass --imagenet-dir")
    note = (
        f"{len(photos)} photos per pass ({sum(p.source.startswith('imagenet') for p in photos)} ImageNet-class, "
        f"{sum(p.source.startswith('everyday') for p in photos)} everyday validation), K = 2, one request at a time, "
        f"`{PROMISE_POINT}` then `full` for each photo."
    )
    print(note, flush=True)
    runs = [run_rate(float(rate), photos, args) for rate in args.rates.split(",")]
    summary = []
    for run in runs:
        within = 2 if run["rate"] >= 0.5 else 5
        summary.append(verdicts(run, within))
        print(json.dumps(summary[-1], indent=2))
    if args.smoke:
        return
    command = "python -m bench.drift " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "command": command,
        "note": note,
        "summary": summary,
        "runs": [{**run, "passes": [asdict(p) for p in run["passes"]]} for run in runs],
    }
    (RESULTS / f"drift-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"drift-{stamp}.md").write_text(report(runs, summary, command, note) + "\n")
    print(f"wrote bench/results/drift-{stamp}.md")


if __name__ == "__main__":
    main()
