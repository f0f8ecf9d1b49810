"""Step ``calibrate``: pathological-layer pruning, candidate selection, operating points as promises, checkpoint.

The step runs the searches of :mod:`training.pipeline.search` on the calib split for every method of
:mod:`training.pipeline.simulate`, writes ``calibrate/calibration.json`` (every method's layers and thresholds, the
profile, the full-depth baselines) and ships one method through :mod:`training.pipeline.checkpoint_writer`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from lraee_core.checkpoint import MANIFEST

from .checkpoint_writer import write_checkpoint
from .config import CalibrateConfig, ConfigError
from .features import FeatureStore
from .gate_fit import load_gates, run_fit_gate
from .heads import VARIANTS
from .jobs import Job, config_hash, read_json, step, write_json, write_record
from .label_sets import ExitView
from .profile import load_profile, run_profile
from .search import OPERATING_POINTS, PointSetting, Selection, promises, prune_layers, select_candidates
from .simulate import METHODS, SHIPPABLE, Method, by_label_count, full_outcome, sweep_view

CALIBRATION_FILE = "calibration.json"
log = logging.getLogger(__name__)


def shipped_method(selections: dict[str, Selection], config: CalibrateConfig) -> str:
    """The method the checkpoint ships: ``config.ship``, or with "auto" the shippable method whose default point
    has the best objective on the calib split (FLOPs saved less the head charge, mean over K; ties: SSA, the
    paper's head; see training.pipeline.search)."""
    if config.ship != "auto":
        return config.ship
    return max(SHIPPABLE, key=lambda name: round(selections[name].points[config.default_operating_point].objective, 6))


def calibrate_hash(job: Job, gate_hash: str, profile_hash: str) -> str:
    """Identity of the calibration and checkpoint."""
    return config_hash("calibrate", gate_hash, profile_hash, job.config.calibrate, str(job.checkpoint_dir))


def _validate(config: CalibrateConfig) -> None:
    if config.default_operating_point not in OPERATING_POINTS:
        raise ConfigError(f"default operating point must be one of {OPERATING_POINTS}")
    if config.max_candidates < 1:
        raise ConfigError("max_candidates must be at least 1")
    if not all(0.0 <= p <= 1.0 for p in promises(config).values()):
        raise ConfigError("promises are agreement fractions in [0, 1]")
    if not config.label_counts:
        raise ConfigError("calibration needs at least one label count")
    if any(k < 2 for k in config.word_label_counts):
        raise ConfigError("word label sets need K >= 2 (the word and at least one other)")
    if config.ship not in (*SHIPPABLE, "auto"):
        raise ConfigError(f"ship must be one of {(*SHIPPABLE, 'auto')}")
    if config.charge not in ("constant", "measured"):
        raise ConfigError("charge must be 'constant' or 'measured'")


def method_record(selection: Selection, method: Method) -> dict[str, Any]:
    """What calibration.json says about one method."""
    return {
        "variant": method.variant,
        "scoring": method.scoring,
        "gates": method.gates,
        "layers": list(selection.layers),
        "operating_points": {name: asdict(setting) for name, setting in selection.points.items()},
        "subset_ranking": selection.ranking,
    }


@step("calibrate")
def run_calibrate(job: Job) -> str:
    """Step ``calibrate``: write ``calibrate/calibration.json`` and the checkpoint; returns the step hash."""
    config = job.config.calibrate
    _validate(config)
    wanted = calibrate_hash(job, run_fit_gate(job), run_profile(job))
    directory = job.step_dir("calibrate")
    if job.should_skip("calibrate", wanted, outputs=[job.checkpoint_dir / MANIFEST]):
        return wanted
    store = FeatureStore(job.step_dir("extract"))
    profile = load_profile(job)
    inr = {p.layer: p.inr for p in profile}
    pool, pruned = prune_layers(inr, store.layers, config.prune_fraction)
    views: dict[str, ExitView] = {}
    methods: dict[str, Any] = {}
    selections: dict[str, Selection] = {}
    timing = measure_charges(job, store, pool) if config.charge == "measured" else {}
    for name, method in METHODS.items():
        if method.variant not in views:
            views[method.variant] = sweep_view(
                store,
                job,
                "calib",
                method.variant,
                config.label_counts,
                config.label_sets_per_image,
                config.seed,
                config.word_label_counts,
            )
        bank = load_gates(job.step_dir("fit-gate"), method.gates)
        charges = None
        if timing:  # heads of the same pooling cost the same: methods share their pooling's measurement
            measured = timing[VARIANTS[method.variant].pooling]["charges"]
            charges = {int(layer): float(value) for layer, value in measured.items()}
        selection = select_candidates(views[method.variant], method, bank, pool, config, desc=name, charges=charges)
        selections[name] = selection
        methods[name] = method_record(selection, method)
    any_view = next(iter(views.values()))
    calibration = {
        "calib_images": store.count("calib"),
        "label_counts": sorted(int(k) for k in any_view.flops),
        "label_sets_per_image": config.label_sets_per_image,
        "word_label_counts": list(config.word_label_counts) if store.word_sets() is not None else [],
        "cached_layers": list(store.layers),
        "candidate_pool": list(pool),
        "pruned_layers": [asdict(p) for p in pruned],
        "profile": {str(p.layer): {"nsr": p.nsr, "inr": p.inr} for p in profile},
        "full_depth": {
            "int8": by_label_count(full_outcome(any_view), any_view, []),
            "fp32": by_label_count(full_outcome(any_view, fp32=True), any_view, []),
        },
        "methods": methods,
        "charges": timing
        or {"constant_blocks": config.head_cost_blocks, "note": "every candidate charged head_cost_blocks"},
    }
    shipped = shipped_method(selections, config)
    calibration["shipped_method"] = shipped
    calibration["ship_choice"] = {
        "rule": config.ship,
        "calib_mean_saving_at_default_point": {
            name: selections[name].points[config.default_operating_point].mean_saving for name in SHIPPABLE
        },
        "head_cost_blocks": config.head_cost_blocks,
        "calib_objective_at_default_point": {
            name: selections[name].points[config.default_operating_point].objective for name in SHIPPABLE
        },
    }
    write_json(directory / CALIBRATION_FILE, calibration)
    write_checkpoint(job, store, selections[shipped], pruned, profile, calibration, shipped)
    write_record(directory, "calibrate", wanted, {"layers": list(selections[shipped].layers), "shipped": shipped})
    return wanted


def measure_charges(job: Job, store: FeatureStore, pool: Sequence[int]) -> dict[str, Any]:
    """Each pool layer's time charge per head pooling (training.pipeline.head_cost.candidate_charges), measured on
    a checkpoint with exit heads at every pool layer written into the calibrate step's folder."""
    from .head_cost import candidate_charges

    config = job.config.calibrate
    timing: dict[str, Any] = {}
    for name in SHIPPABLE:
        pooling = VARIANTS[METHODS[name].variant].pooling
        if pooling in timing:
            continue
        never = PointSetting(((1, 1.0),), 1.0, True, 0.0, 0.0, {}, None)
        selection = Selection(tuple(pool), {config.default_operating_point: never}, [])
        draft = {"calib_images": 0, "candidate_pool": list(pool), "profile": {}, "ship_choice": {}}
        directory = job.step_dir("calibrate") / f"timing-{pooling}"
        write_checkpoint(job, store, selection, (), [], draft, name, directory=directory)
        timing[pooling] = candidate_charges(directory, rounds=config.charge_rounds)
        log.info("calibrate: measured charges (%s heads, blocks): %s", pooling, timing[pooling]["charges"])
    return timing


def load_calibration(job: Job) -> dict[str, Any]:
    """What the ``calibrate`` step wrote."""
    result: dict[str, Any] = read_json(job.step_dir("calibrate") / CALIBRATION_FILE)
    return result
