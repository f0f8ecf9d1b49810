"""Step ``evaluate``: every method on the evaluation split, the rescue-effect analyses, and an engine cross-check.

Rows of the comparison (FLOPs saving against the INT8 full-depth path; heads and gates are charged):

* FP32 / INT8 full depth: the plain CLIP path of each tower;
* CLS-EE, Confidence-only EE, LRA-EE (hard), LRA-EE (distilled): exit tables of their head sets with the layers and
  thresholds ``calibrate`` chose, at the default operating point (LRA-EE distilled at every operating point too);
* PABEE: the distilled SSA heads of every unpruned cached layer; an image leaves at the first layer where the last
  ``patience`` heads (this one included) agree on the top-1 class, answering that class; otherwise full depth.
  Heads are charged, no gate (its test is an argmax comparison);
* SSA-Last (hard / distilled): the SSA head of the deepest cached layer answers every image, no exit.

Then, for LRA-EE (distilled) at the default operating point against INT8 full depth: the four-quadrant split
(both correct / rescue / loss / both wrong), gate selectivity (accuracy of exited vs continued images) and the exit
distribution; the Pareto sweep of LRA-EE vs confidence-only over their threshold grids; and the real
:class:`EarlyExitClassifier` loaded from the checkpoint on a subsample, whose exits and answers must match the
simulation except where a gate probability lies within ``engine_check_tolerance`` of its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from lraee_core.engine import EarlyExitClassifier
from lraee_core.images import load_image

from .calibrate import (
    CHECKPOINT_METHOD,
    METHODS,
    ExitTable,
    Outcome,
    build_table,
    exit_shares,
    flops_for,
    full_depth_predictions,
    load_calibration,
    pareto_front,
    run_calibrate,
    simulate,
    sweep,
    threshold_grid,
)
from .config import CalibrateConfig, ConfigError, Job, config_hash, read_json, step, write_json, write_record
from .data import load_splits
from .features import FeatureStore
from .heads import head_logits, load_heads
from .profile import load_profile

REPORT_FILE = "report.json"


class EngineMismatchError(RuntimeError):
    """The real engine disagreed with the simulation the thresholds were chosen on."""


def pabee(table: ExitTable, layers: Sequence[int], patience: int) -> Outcome:
    """Patience-based exit over ``layers`` (module docstring); ``table.scores`` are not used."""
    if patience < 1:
        raise ConfigError("patience must be at least 1")
    flops, size = table.flops, table.size
    alive = np.ones(size, dtype=bool)
    run = np.zeros(size, dtype=np.int64)
    previous = np.full(size, -1)
    exit_layer = np.full(size, flops.num_layers)
    predictions = table.full_predictions.copy()
    evaluated = np.zeros(size, dtype=np.int64)
    for layer in layers:
        current = table.predictions[layer]
        evaluated[alive] += 1
        run = np.where(current == previous, run + 1, 1)
        previous = current
        leave = alive & (run >= patience)
        exit_layer[leave] = layer
        predictions[leave] = current[leave]
        alive &= ~leave
    spent = flops.embed + exit_layer * flops.block + evaluated * flops.head + np.where(alive, flops.final, 0)
    correct = predictions == table.labels
    return Outcome(exit_layer, ~alive, predictions, correct, spent, 1.0 - float(spent.mean()) / flops.full_depth)


def four_quadrants(early_correct: np.ndarray, full_correct: np.ndarray) -> dict[str, Any]:
    """Counts and percentages of both correct / rescue / loss / both wrong, early exit vs full depth."""
    early, full = early_correct.astype(bool), full_correct.astype(bool)
    counts = {
        "both_correct": int((early & full).sum()),
        "rescue": int((early & ~full).sum()),
        "loss": int((~early & full).sum()),
        "both_wrong": int((~early & ~full).sum()),
    }
    total = len(early)
    return {
        "images": total,
        "counts": counts,
        "percent": {name: 100.0 * count / max(1, total) for name, count in counts.items()},
        "net_gain": counts["rescue"] - counts["loss"],
        "net_gain_points": 100.0 * (counts["rescue"] - counts["loss"]) / max(1, total),
    }


def gate_selectivity(outcome: Outcome, full_correct: np.ndarray) -> dict[str, Any]:
    """Accuracy of the images that exited vs those that continued (and INT8 full depth on each group)."""

    def group(mask: np.ndarray) -> dict[str, Any]:
        count = int(mask.sum())
        return {
            "images": count,
            "accuracy": float(outcome.correct[mask].mean()) if count else None,
            "int8_full_depth_accuracy": float(full_correct[mask].mean()) if count else None,
        }

    return {"exited": group(outcome.exited), "continued": group(~outcome.exited)}


def _row(name: str, outcome: Outcome | None, accuracy: float | None = None, saving: float = 0.0) -> dict[str, Any]:
    if outcome is not None:
        accuracy, saving = outcome.accuracy, outcome.saving
    return {"method": name, "accuracy": accuracy, "flops_saved": saving}


def _engine_check(
    job: Job, store: FeatureStore, table: ExitTable, layers: Sequence[int], settings: dict[str, list[float]]
) -> dict[str, Any]:
    """Run the checkpoint through the real engine on a subsample and compare with the simulation."""
    config = job.config.evaluate
    count = store.count("eval")
    wanted = min(config.engine_check_images, count)
    rows = np.unique(np.linspace(0, count - 1, wanted).round().astype(int))
    classifier = EarlyExitClassifier.from_checkpoint(job.checkpoint_dir)
    split = load_splits(job).splits["eval"]
    paths = split.paths
    images = torch.stack([classifier.backbone.preprocess(load_image(paths[int(row)])) for row in rows])
    labels = list(store.labels)
    index = {name: i for i, name in enumerate(labels)}
    sub = table.subset(rows)
    # A probe setting whose thresholds are the subsample's median gate probabilities exercises every exit path,
    # even when the calibrated thresholds let (almost) nobody leave.
    probe = [float(min(np.median(sub.scores[layer]), 0.999)) for layer in layers]
    checks: dict[str, Any] = {}
    all_ok = True
    for name, thresholds in {**settings, "probe-median": probe}.items():
        same_as = next((other for other, c in checks.items() if c["thresholds"] == thresholds), None)
        if same_as is not None:  # operating points often coincide on small data; one engine run covers them
            checks[name] = {**checks[same_as], "same_as": same_as}
            continue
        results = []
        for start in range(0, len(rows), 32):
            results += classifier.classify(
                images[start : start + 32],
                labels,
                templates=job.config.data.templates,
                top_k=1,
                thresholds=dict(zip(layers, thresholds, strict=True)),
            )
        simulated = simulate(sub, layers, thresholds)
        engine_exit = np.array([r.exit_layer for r in results])
        engine_head = np.array([r.exit_path == "head" for r in results])
        engine_prediction = np.array([index[r.predictions[0].label] for r in results])
        engine_flops = np.array([r.flops for r in results])
        same = (
            (engine_exit == simulated.exit_layer)
            & (engine_head == simulated.exited)
            & (engine_prediction == simulated.predictions)
        )
        near = np.zeros(len(rows), dtype=bool)
        for layer, threshold in zip(layers, thresholds, strict=True):
            if threshold < 1.0:
                near |= np.abs(sub.scores[layer] - threshold) <= config.engine_check_tolerance
        unexplained = int((~same & ~near).sum())
        all_ok &= unexplained == 0
        checks[name] = {
            "thresholds": thresholds,
            "images": len(rows),
            "agree": int(same.sum()),
            "near_threshold": int(near.sum()),
            "unexplained_disagreements": unexplained,
            "engine_accuracy": float((engine_prediction == sub.labels).mean()),
            "simulated_accuracy": simulated.accuracy,
            "engine_exits": int(engine_head.sum()),
            "simulated_exits": int(simulated.exited.sum()),
            "flops_agree": int((engine_flops == simulated.flops)[same].sum()),
        }
    return {"images": len(rows), "ok": all_ok, "settings": checks}


def _pareto(table: ExitTable, layers: Sequence[int], config: CalibrateConfig) -> dict[str, Any]:
    """Accuracy vs FLOPs saving over the threshold grid on the evaluation split, and its Pareto front."""
    grid = threshold_grid(config.grid_points)
    if len(layers) <= config.joint_search_max_layers:
        result = sweep(table, layers, grid)
        accuracy, saving, kind = result.accuracy, result.saving, "joint grid"
    else:  # too many combinations: one shared threshold for every layer
        outcomes = [simulate(table, layers, [float(t)] * len(layers)) for t in grid]
        accuracy = np.array([o.accuracy for o in outcomes])
        saving = np.array([o.saving for o in outcomes])
        kind = "shared threshold"
    front = pareto_front(accuracy, saving)
    return {"layers": list(layers), "settings": int(accuracy.size), "kind": kind, "front": front}


def evaluate_hash(job: Job, calibrate_hash: str) -> str:
    """Identity of the report."""
    return config_hash("evaluate", calibrate_hash, job.config.evaluate, str(job.report_dir))


@step("evaluate")
def run_evaluate(job: Job) -> dict[str, Any]:
    """Step ``evaluate``: write report.json, report.md and the plots into the report dir; returns the report."""
    from .report import write_report  # matplotlib only when a report is drawn

    wanted = evaluate_hash(job, run_calibrate(job))
    if job.should_skip("evaluate", wanted, outputs=[job.report_dir / REPORT_FILE]):
        result: dict[str, Any] = read_json(job.report_dir / REPORT_FILE)
        return result
    config = job.config
    store = FeatureStore(job.step_dir("extract"))
    calibration = load_calibration(job)
    default = config.calibrate.default_operating_point
    labels = store.load("eval", ["labels"])["labels"].numpy()
    int8_correct = full_depth_predictions(store, "eval") == labels
    fp32_correct = full_depth_predictions(store, "eval", "fp32_final") == labels
    rows = [
        _row("FP32 full depth", None, float(fp32_correct.mean())),
        _row("INT8 full depth", None, float(int8_correct.mean())),
    ]
    outcomes: dict[str, Outcome] = {}
    tables: dict[str, ExitTable] = {}
    methods: dict[str, Any] = {}
    for name, method in METHODS.items():
        record = calibration["methods"][name]
        layers = record["layers"]
        tables[name] = build_table(store, job, "eval", method, layers)
        points = {}
        for point, setting in record["operating_points"].items():
            outcome = simulate(tables[name], layers, setting["thresholds"])
            if point == default:
                outcomes[name] = outcome
            points[point] = {
                "thresholds": setting["thresholds"],
                "accuracy": outcome.accuracy,
                "flops_saved": outcome.saving,
                "calib_accuracy": setting["accuracy"],
                "calib_flops_saved": setting["saving"],
                "exit_shares": exit_shares(outcome, layers),
            }
        methods[name] = {"title": method.title, "layers": layers, "operating_points": points}
    pool = calibration["candidate_pool"]
    patience = config.evaluate.patience
    pabee_outcome = pabee(build_table(store, job, "eval", METHODS[CHECKPOINT_METHOD], pool), pool, patience)
    deepest = store.layers[-1]
    flops = flops_for(store, job)
    last_saving = 1.0 - (flops.embed + deepest * flops.block + flops.head) / flops.full_depth
    text = store.text_embeddings()
    ssa_inputs = store.load("eval", [f"ssa.{deepest}"])[f"ssa.{deepest}"]
    ssa_last = {}
    for variant in ("ssa-hard", "ssa-distilled"):
        _, heads = load_heads(job.step_dir("train-heads"), variant)
        predictions = head_logits(heads[deepest], ssa_inputs, text, store.logit_scale).argmax(-1).numpy()
        ssa_last[variant] = float((predictions == labels).mean())
    rows += [
        _row(f"CLS-EE ({default})", outcomes["cls-ee"]),
        _row(f"Confidence-only EE ({default})", outcomes["confidence"]),
        _row(f"PABEE (patience {patience})", pabee_outcome),
        _row(f"SSA-Last hard (layer {deepest})", None, ssa_last["ssa-hard"], last_saving),
        _row(f"SSA-Last distilled (layer {deepest})", None, ssa_last["ssa-distilled"], last_saving),
        _row(f"LRA-EE hard ({default})", outcomes["lraee-hard"]),
        _row(f"LRA-EE distilled ({default})", outcomes["lraee-distilled"]),
    ]
    main = outcomes[CHECKPOINT_METHOD]
    main_layers = methods[CHECKPOINT_METHOD]["layers"]
    settings = {point: s["thresholds"] for point, s in methods[CHECKPOINT_METHOD]["operating_points"].items()}
    engine = (
        _engine_check(job, store, tables[CHECKPOINT_METHOD], main_layers, settings)
        if config.evaluate.engine_check_images > 0
        else {"images": 0, "ok": True, "settings": {}}
    )
    report: dict[str, Any] = {
        "eval_images": len(labels),
        "default_operating_point": default,
        "checkpoint": str(job.checkpoint_dir),
        "data": load_splits(job).description,
        "pruned_layers": calibration["pruned_layers"],
        "candidate_pool": pool,
        "comparison": rows,
        "methods": methods,
        "pabee": {"patience": patience, "layers": pool, "exit_shares": exit_shares(pabee_outcome, pool)},
        "four_quadrants": four_quadrants(main.correct, int8_correct),
        "gate_selectivity": gate_selectivity(main, int8_correct),
        "exit_distribution": exit_shares(main, main_layers),
        "pareto": {
            name: _pareto(tables[name], methods[name]["layers"], config.calibrate)
            for name in (CHECKPOINT_METHOD, "confidence")
        },
        "profile": [asdict(p) for p in load_profile(job)],
        "heads": read_json(job.step_dir("train-heads") / "heads.json"),
        "engine_check": engine,
    }
    write_report(report, job.report_dir)
    write_json(job.report_dir / REPORT_FILE, report)
    if not engine["ok"]:
        raise EngineMismatchError(
            f"the engine disagreed with the simulation beyond near-threshold cases: {engine['settings']} "
            f"(report written to {job.report_dir})"
        )
    write_record(job.step_dir("evaluate"), "evaluate", wanted, {"report_dir": str(job.report_dir)})
    return report
