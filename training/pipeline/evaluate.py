"""Step ``evaluate``: every method on the evaluation split at every label count, and an engine cross-check.

The K-sweep: for each K of ``label_counts`` (0: every label), every evaluation image gets one label set (its true
class + K - 1 others, seeded) and every method answers it. Per K (FLOPs saved against the INT8 full-depth path of
that K; heads and gates are charged):

* FP32 / INT8 full depth (the `full` operating point is the INT8 row: no head runs);
* every method of :data:`training.pipeline.calibrate.METHODS` at every operating point, with the layers and
  threshold ``calibrate`` chose: top-1, agreement with INT8 full depth, FLOPs saved, exit shares, and the calib
  split's figures beside them;
* PABEE: the shipped SSA heads of every unpruned cached layer; an image leaves at the first layer where the last
  ``patience`` heads agree on the top-1 class; heads are charged, no gate;
* SSA-Last: one head set's deepest SSA head answers every image, no exit;
* the four-quadrant split of the shipped method at the default point against INT8 full depth;
* each head set's exits alone (every image leaving at that layer): agreement and top-1, which shows what the head
  training changed.

Then the real :class:`EarlyExitClassifier` loaded from the checkpoint runs a subsample at the largest and the
smallest K (per-image label sets), at every operating point, ``full`` and a probe setting; its exits, answers and
FLOPs must match the simulation except where a deciding number lies within ``engine_check_tolerance`` of its
boundary: a gate probability of its threshold, or a row's top-1 cosine of its runner-up at a candidate exit or at
full depth (the two paths run other batch shapes, so other kernels, and may round a near tie either way). The
held-out figures of the shipped method go into the checkpoint's manifest (``metrics.held_out``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from lraee_core.checkpoint import load_classifier, read_manifest, write_manifest
from lraee_core.config import OperatingPoint
from lraee_core.exits import ExitRule
from lraee_core.images import load_image

from .calibrate import load_calibration, run_calibrate
from .config import ConfigError
from .data import load_splits
from .features import FeatureStore
from .gate_fit import load_gates
from .heads import SHIPPED_VARIANT, VARIANTS, load_heads
from .jobs import Job, config_hash, path_roots, portable_paths, read_json, step, write_json, write_record
from .label_sets import ExitView, LabelSets, auc, exit_view, label_sets_for, resolve_counts
from .profile import load_profile
from .search import OPERATING_POINTS, candidate_thresholds, recorded_point
from .simulate import (
    CHECKPOINT_METHOD,
    METHODS,
    Outcome,
    by_label_count,
    full_outcome,
    method_scores,
    per_row,
    simulate,
    sweep_view,
)
from .word_sets import group_of

REPORT_FILE = "report.json"


class EngineMismatchError(RuntimeError):
    """The real engine disagreed with the simulation the thresholds were chosen on."""


def pabee(view: ExitView, layers: Sequence[int], patience: int) -> Outcome:
    """Patience-based exit over ``layers`` (module docstring)."""
    if patience < 1:
        raise ConfigError("patience must be at least 1")
    any_model = next(iter(view.flops.values()))
    size = view.size
    alive = np.ones(size, dtype=bool)
    run = np.zeros(size, dtype=np.int64)
    previous = np.full(size, -1)
    exit_layer = np.full(size, any_model.num_layers)
    predictions = view.full_top1.copy()
    evaluated = np.zeros(size, dtype=np.int64)
    for layer in layers:
        current = view.top1[layer]
        evaluated[alive] += 1
        run = np.where(current == previous, run + 1, 1)
        previous = current
        leave = alive & (run >= patience)
        exit_layer[leave] = layer
        predictions[leave] = current[leave]
        alive &= ~leave
    spent = (
        any_model.embed
        + exit_layer * any_model.block
        + evaluated * per_row(view, "head")
        + np.where(alive, per_row(view, "final"), 0)
    )
    return Outcome(
        exit_layer,
        ~alive,
        predictions,
        predictions == view.full_top1,
        predictions == view.truth,
        spent,
        per_row(view, "full_depth"),
        evaluated,
    )


def single_exit(view: ExitView, layer: int) -> Outcome:
    """Every image answered by one exit head (SSA-Last when it is the deepest): no gate, one head charged."""
    any_model = next(iter(view.flops.values()))
    predictions = view.top1[layer]
    spent = any_model.embed + layer * any_model.block + per_row(view, "head")
    return Outcome(
        np.full(view.size, layer),
        np.ones(view.size, dtype=bool),
        predictions,
        predictions == view.full_top1,
        predictions == view.truth,
        spent,
        per_row(view, "full_depth"),
        np.ones(view.size, dtype=np.int64),
    )


def cut_depth_baseline(
    points: dict[str, Any], alone: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The honest baseline beside each operating point: a plain shallower model at the same FLOPs, i.e. the first N
    blocks and the shipped head at N answering every image (no gate). Per point and K: the shallowest N whose
    FLOPs saving does not exceed the point's held-out saving (so it spends at least as much), and its figures."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    layers = sorted(alone, key=int)
    for point, values in points.items():
        for k, held in values["held_out"].items():
            if k not in alone[layers[0]]:
                continue
            spent_enough = [layer for layer in layers if alone[layer][k]["flops_saved"] <= held["flops_saved"] + 1e-12]
            if not spent_enough:
                continue
            layer = spent_enough[0]
            figures = alone[layer][k]
            out.setdefault(point, {})[k] = {
                "layer": int(layer),
                "flops_saved": figures["flops_saved"],
                "top1": figures["top1"],
                "agreement": figures["agreement"],
            }
    return out


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


def _per_k(outcome: Outcome, view: ExitView) -> dict[str, dict[str, Any]]:
    return by_label_count(outcome, view, [])


def _curve(view: ExitView, layers: Sequence[int], scores: dict[int, np.ndarray], points: int = 60) -> dict[str, Any]:
    """(FLOPs saved, agreement) per K over shared thresholds on this view: the trade-off the points sit on."""
    curve: dict[str, list[tuple[float, float, float]]] = {}
    for threshold in candidate_thresholds(scores, points):
        figures = by_label_count(simulate(view, layers, scores, [float(threshold)] * len(layers)), view, layers)
        for k, f in figures.items():
            curve.setdefault(k, []).append((float(threshold), f["flops_saved"], f["agreement"]))
    return curve


def _remapped(sets: LabelSets, rows: np.ndarray) -> LabelSets:
    return LabelSets(images=rows[sets.images], counts=sets.counts, groups=sets.groups)


def top1_gaps(
    store: FeatureStore, split: str, view: ExitView, images: np.ndarray, label_rows: np.ndarray, layers: Sequence[int]
) -> np.ndarray:
    """[N, len(layers) + 1] each row's top-1 minus runner-up cosine over its label set at each candidate exit of
    ``layers`` and, last, at full depth (INT8): how close each of its answers comes to a tie. Row i of ``view`` is
    image ``images[i]`` of ``split`` with the label indices ``label_rows[i]``."""
    gaps = [view.features[layer]["cos_gap"].astype(np.float64) for layer in layers]
    final = store.load(split, ["int8_final"])["int8_final"][torch.from_numpy(images)]  # [N, E], unit-norm
    cosines = (final.float() @ store.view_text().float().T).numpy()  # [N, labels]
    ranked = np.sort(np.take_along_axis(cosines, label_rows, axis=1), axis=1)
    gaps.append(ranked[:, -1] - ranked[:, -2] if label_rows.shape[1] > 1 else np.full(len(images), np.inf))
    return np.stack(gaps, axis=1)


def _engine_check(job: Job, store: FeatureStore, calibration: dict[str, Any]) -> dict[str, Any]:
    """Run the checkpoint through the real engine on a subsample and compare with the simulation."""
    config = job.config.evaluate
    count = store.count("eval")
    wanted = min(config.engine_check_images, count)
    rows = np.unique(np.linspace(0, count - 1, wanted).round().astype(int))
    classifier = load_classifier(job.checkpoint_dir)
    paths = load_splits(job).splits["eval"].paths
    images = torch.stack([classifier.backbone.preprocess(load_image(paths[int(row)])) for row in rows])
    truth = store.load("eval", ["labels"])["labels"].numpy()[rows]
    shipped = calibration.get("shipped_method", CHECKPOINT_METHOD)
    method = METHODS[shipped]
    record = calibration["methods"][shipped]
    layers = tuple(record["layers"])
    _, heads = load_heads(job.step_dir("train-heads"), method.variant)
    bank = load_gates(job.step_dir("fit-gate"), method.gates)
    hidden = job.config.heads.hidden_dim or store.shape.width
    num_labels = len(store.labels)
    checks: dict[str, Any] = {}
    all_ok = True
    for k in sorted({resolve_counts([2], num_labels)[0], num_labels}):
        sets = _remapped(label_sets_for(truth, num_labels, [k], 1, np.random.default_rng(config.seed + k)), rows)
        view = exit_view(store, "eval", heads, VARIANTS[method.variant].pooling, sets, hidden)
        label_rows = np.zeros((len(rows), k), dtype=np.int64)
        for positions, members in sets.groups.values():
            label_rows[positions] = members
        scores = method_scores(view, method, bank, layers)
        ties = top1_gaps(store, "eval", view, rows, label_rows, layers).min(axis=1) <= config.engine_check_tolerance
        # A probe setting at the subsample's median gate probabilities exercises every exit path, even when the
        # operating points let (almost) nobody leave.
        probe = [float(min(np.median(scores[layer]), 0.999)) for layer in layers]
        settings: dict[str, OperatingPoint | None] = {
            name: recorded_point(name, layers, setting) for name, setting in record["operating_points"].items()
        }
        settings["probe-median"] = OperatingPoint.uniform("probe-median", dict(zip(layers, probe, strict=True)))
        settings["full"] = None
        for name, point in settings.items():
            rule = ExitRule.full() if point is None else ExitRule.of_point(point)
            thresholds = None if point is None else point.thresholds_at(k)
            cap = None if point is None else point.label_cap
            results = []
            for position in range(len(rows)):
                labels = [store.labels[int(i)] for i in label_rows[position]]
                results += classifier.classify(
                    images[position : position + 1],
                    labels,
                    templates=job.config.data.templates,
                    top_k=1,
                    exit_rule=rule,
                )
            simulated = full_outcome(view) if point is None else simulate(view, layers, scores, point)
            index = {name: i for i, name in enumerate(store.labels)}
            engine_exit = np.array([r.exit_layer for r in results])
            engine_head = np.array([r.exit_path == "head" for r in results])
            engine_prediction = np.array([index[r.predictions[0].label] for r in results])
            engine_flops = np.array([r.flops for r in results])
            same = (
                (engine_exit == simulated.exit_layer)
                & (engine_head == simulated.exited)
                & (engine_prediction == simulated.predictions)
            )
            near = ties.copy()
            for layer, threshold in (thresholds or {}).items():
                if threshold < 1.0:
                    near |= np.abs(scores[layer] - threshold) <= config.engine_check_tolerance
            unexplained = int((~same & ~near).sum())
            flops_agree = int((engine_flops == simulated.flops)[same].sum())
            all_ok &= unexplained == 0 and flops_agree == int(same.sum())
            checks[f"K={k} {name}"] = {
                "k": k,
                "thresholds": None if thresholds is None else {str(la): t for la, t in thresholds.items()},
                "label_cap": cap,
                "images": len(rows),
                "agree": int(same.sum()),
                "near_threshold": int(near.sum()),
                "unexplained_disagreements": unexplained,
                "engine_agreement_with_full": float((engine_prediction == view.full_top1).mean()),
                "simulated_agreement_with_full": simulated.agreement,
                "engine_exits": int(engine_head.sum()),
                "simulated_exits": int(simulated.exited.sum()),
                "flops_agree": flops_agree,
            }
    return {"images": len(rows), "ok": all_ok, "settings": checks}


def evaluate_hash(job: Job, calibrate_hash: str) -> str:
    """Identity of the report."""
    return config_hash("evaluate", calibrate_hash, job.config.evaluate, str(job.report_dir))


def _method_sweep(
    view: ExitView, method_name: str, record: dict[str, Any], job: Job
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    method = METHODS[method_name]
    bank = load_gates(job.step_dir("fit-gate"), method.gates)
    layers = record["layers"]
    scores = method_scores(view, method, bank, layers)
    points = {}
    for point, setting in record["operating_points"].items():
        outcome = simulate(view, layers, scores, recorded_point(point, layers, setting))
        points[point] = {
            "thresholds": setting["thresholds"],
            "label_cap": setting.get("label_cap"),
            "promise": setting["promise"],
            "held_out": by_label_count(outcome, view, layers),
            "calibration": setting["calibration"],
        }
    return {"title": method.title, "layers": layers, "operating_points": points}, scores


def _word_rows(
    store: FeatureStore, job: Job, calibration: dict[str, Any], method_name: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The held-out figures of ``method_name`` on the client rows: label sets of everyday words ("words-K": an
    image's word and K-1 words beside it, one set per image and K of ``calibrate.word_label_counts``) and of class
    groups ("group-NAME"), per operating point, and full depth's INT8 and FP32 figures on the same rows. The
    class-name sets are drawn first from the sweep's seed, so the client sets are the ones the sweep would draw after
    them."""
    config = job.config
    view = sweep_view(
        store,
        job,
        "eval",
        METHODS[method_name].variant,
        config.evaluate.label_counts,
        1,
        config.evaluate.seed,
        config.calibrate.word_label_counts,
        words_only=True,
    )
    if view.size == 0:
        return {}, {}, {}
    sweep, _ = _method_sweep(view, method_name, calibration["methods"][method_name], job)
    points = {point: values["held_out"] for point, values in sweep["operating_points"].items()}
    return points, _per_k(full_outcome(view), view), _per_k(full_outcome(view, fp32=True), view)


def _gate_auc(view: ExitView, scores: dict[int, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """ROC AUC of each layer's scores for agreement with full depth, per K."""
    result: dict[str, dict[str, float | None]] = {}
    for k in sorted(view.flops):
        rows = view.counts == k
        result[str(k)] = {str(layer): auc(s[rows], view.agrees(layer)[rows]) for layer, s in scores.items()}
    return result


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
    counts = config.evaluate.label_counts
    views = {variant: sweep_view(store, job, "eval", variant, counts, 1, config.evaluate.seed) for variant in VARIANTS}
    shipped = views[SHIPPED_VARIANT]
    methods: dict[str, Any] = {}
    scores_of: dict[str, dict[int, np.ndarray]] = {}
    for name, method in METHODS.items():
        methods[name], scores_of[name] = _method_sweep(views[method.variant], name, calibration["methods"][name], job)
    pool = calibration["candidate_pool"]
    patience = config.evaluate.patience
    deepest = store.layers[-1]
    baselines = {
        "int8_full_depth": _per_k(full_outcome(shipped), shipped),
        "fp32_full_depth": _per_k(full_outcome(shipped, fp32=True), shipped),
        f"pabee_patience_{patience}": _per_k(pabee(shipped, pool, patience), shipped),
        **{
            f"ssa_last_{variant}": _per_k(single_exit(views[variant], deepest), views[variant])
            for variant in VARIANTS
            if VARIANTS[variant].pooling == "ssa"
        },
    }
    shipped_name = calibration.get("shipped_method", CHECKPOINT_METHOD)
    shipped_view = views[METHODS[shipped_name].variant]
    word_counts = list(config.calibrate.word_label_counts) if store.word_sets() is not None else []
    groups: list[str] = []  # the class groups with rows on the eval split
    if word_counts:  # the shipped method's held-out figures gain "words-K" (and "group-NAME") rows beside "K" ones
        word_points, word_int8, word_fp32 = _word_rows(store, job, calibration, shipped_name)
        for point, figures in word_points.items():
            methods[shipped_name]["operating_points"][point]["held_out"].update(figures)
        baselines["int8_full_depth"].update(word_int8)
        groups = [group for key in word_int8 if (group := group_of(key)) is not None]
        baselines["fp32_full_depth"].update(word_fp32)
    main = methods[shipped_name]
    main_layers = main["layers"]
    main_outcome = simulate(
        shipped_view,
        main_layers,
        scores_of[shipped_name],
        recorded_point(default, main_layers, main["operating_points"][default]),
    )
    full_correct = shipped_view.full_top1 == shipped_view.truth
    rows_of = {k: shipped_view.counts == k for k in sorted(shipped_view.flops)}
    quadrants = {str(k): four_quadrants(main_outcome.correct[rows], full_correct[rows]) for k, rows in rows_of.items()}
    heads_alone = {
        variant: {str(layer): _per_k(single_exit(view, layer), view) for layer in store.layers}
        for variant, view in views.items()
    }
    shipped_variant = METHODS[shipped_name].variant
    depth_baseline = cut_depth_baseline(main["operating_points"], heads_alone[shipped_variant])
    fit = read_json(job.step_dir("fit-gate") / "gates.json")
    report: dict[str, Any] = {
        "eval_images": store.count("eval"),
        "label_counts": sorted(int(k) for k in shipped.flops),
        "word_label_counts": word_counts,  # the shipped method's held-out figures also have "words-K" keys
        "class_groups": groups,  # ... and "group-NAME" keys (a class group's images, labelled with the whole group;
        # groups with no image on the eval split have none)
        "num_labels": len(store.labels),
        "default_operating_point": default,
        "operating_points": list(OPERATING_POINTS),
        "shipped_method": shipped_name,
        "ship_choice": calibration.get("ship_choice"),
        "checkpoint": str(job.checkpoint_dir),
        "data": load_splits(job).description,
        "pruned_layers": calibration["pruned_layers"],
        "candidate_pool": pool,
        "methods": methods,
        "baselines": baselines,
        "four_quadrants": quadrants,
        "heads_alone": heads_alone,
        "cut_depth_baseline": depth_baseline,
        "gate_features": {
            "chosen": fit["features"],
            "selection_calib_auc": fit["selection"],
            "eval_auc": {
                name: _gate_auc(views[METHODS[name].variant], scores_of[name]) for name in ("lraee", "cls-ee", "paper")
            },
        },
        "curves": {
            name: _curve(views[METHODS[name].variant], methods[name]["layers"], scores_of[name])
            for name in dict.fromkeys((shipped_name, CHECKPOINT_METHOD, "confidence"))
        },
        "profile": [asdict(p) for p in load_profile(job)],
        "heads": read_json(job.step_dir("train-heads") / "heads.json"),
    }
    engine = (
        _engine_check(job, store, calibration)
        if config.evaluate.engine_check_images > 0
        else {"images": 0, "ok": True, "settings": {}}
    )
    report["engine_check"] = engine
    report = portable_paths(report, path_roots(job))
    write_report(report, job.report_dir)
    write_json(job.report_dir / REPORT_FILE, report)
    if not engine["ok"]:
        raise EngineMismatchError(
            f"the engine disagreed with the simulation beyond near-threshold cases: {engine['settings']} "
            f"(report written to {job.report_dir})"
        )
    record_held_out(job, report)
    write_record(job.step_dir("evaluate"), "evaluate", wanted, {"report_dir": str(job.report_dir)})
    return report


HELD_OUT_NOTE = (
    "held out of the build (not the head, gate or calib splits: no threshold was chosen on them), but validation "
    "images, not a sealed test set: a recipe may have been tuned after reading them; one label set per image and K: "
    "its true class + K-1 other classes of the data"
)


def record_held_out(job: Job, report: dict[str, Any]) -> None:
    """Put the shipped method's held-out figures per K and operating point (and `full`'s) into the manifest."""
    manifest = read_manifest(job.checkpoint_dir)
    main = report["methods"][report["shipped_method"]]["operating_points"]
    held_out = {
        "split": "eval",
        "note": HELD_OUT_NOTE,
        "images": report["eval_images"],
        "source": report["data"]["eval_source"] or report["data"]["source"],
        "operating_points": {
            **{point: values["held_out"] for point, values in main.items()},
            "full": report["baselines"]["int8_full_depth"],
        },
    }
    metrics = {**manifest.metrics, "held_out": held_out}
    write_manifest(job.checkpoint_dir, dataclasses.replace(manifest, metrics=metrics))
