"""The checkpoint a build ships: the chosen method's heads and gates with a manifest saying how they were made."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lraee_core.backbone import build_backbone
from lraee_core.checkpoint import Manifest, PrunedLayer, new_manifest, save_checkpoint

from .config import to_jsonable
from .features import FeatureStore
from .gate_fit import load_gates
from .heads import load_heads
from .jobs import Job, path_roots, portable_paths
from .profile import LayerProfile
from .ranges import activation_ranges
from .search import Selection
from .simulate import CHECKPOINT_METHOD, METHODS


def write_checkpoint(
    job: Job,
    store: FeatureStore,
    selection: Selection,
    pruned: Sequence[PrunedLayer],
    profile: Sequence[LayerProfile],
    calibration: dict[str, Any],
    shipped: str = CHECKPOINT_METHOD,
    directory: Path | None = None,
) -> Manifest:
    """Save the shipped method's heads and gates of the chosen layers with a manifest saying how they were made
    (portable: paths relative to named roots, the command as a user would retype it), into the job's checkpoint
    directory or ``directory``."""
    from .data import load_splits

    config = job.config
    method = METHODS[shipped]
    head_config, heads = load_heads(job.step_dir("train-heads"), method.variant)
    bank = load_gates(job.step_dir("fit-gate"), method.gates)
    layers = selection.layers
    gates = bank.for_layers(layers)
    word_sets = store.word_sets()
    words_k = calibration.get("word_label_counts", [])
    directory = job.checkpoint_dir if directory is None else directory
    backbone = build_backbone(config.backbone)
    splits = load_splits(job)
    roots = path_roots(job)
    manifest = new_manifest(
        backbone,
        directory,
        checkpoint_id=config.calibrate.checkpoint_id,
        quant_mode=config.quant_mode,
        quantized_modules=int(store.meta["quantized_modules"]),
        head=head_config,
        candidate_layers=tuple(layers),
        operating_points={name: point.operating_point(name, layers) for name, point in selection.points.items()},
        default_operating_point=config.calibrate.default_operating_point,
        pruned_layers=tuple(pruned),
        gate_features=bank.features,
        templates=tuple(config.data.templates),
        calibration=portable_paths(
            {
                "kind": "lraee-train",
                "command": list(job.argv),
                "path_roots": {
                    "checkpoint": "this checkpoint's directory",
                    "work": "the build's work directory",
                    "repo": "the project's root",
                    "data": "the shared data folder (LRAEE_DATA_ROOT, default ../shared/data from the project)",
                },
                "data": splits.description,
                "templates": list(config.data.templates),
                "seeds": {"split": config.data.seed, "heads": config.heads.seed, "gate": config.gate.seed},
                "shipped_method": {"name": shipped, "title": method.title, **calibration["ship_choice"]},
                "head_loss": "label-free: 1 - cos to the served model's full-depth image embedding",
                "gate": {
                    "target": "exit top-1 == full-depth top-1 for the row's label set",
                    "label_sets": "true class + K-1 others, K log-uniform over 2..N"
                    + (
                        f"; and word label sets (a class's coarse word + K-1 others, K in {list(words_k)})"
                        if words_k
                        else ""
                    ),
                    "features": list(bank.features),
                },
                "search": "per point and calibrated K, one threshold shared by the layers: the calib quantile "
                "saving the most time (FLOPs less each candidate's charge) among those keeping the promise at that K"
                + (" and on the word label sets and class groups of that K" if words_k else "")
                + "; interpolated in log K between calibrated counts; no heads above the label cap",
                "charges": calibration.get("charges"),
                "word_sets": None
                if word_sets is None
                else {
                    "words": list(word_sets.words),
                    "classes_with_a_word": int((word_sets.word_of >= 0).sum()),
                },
                "promise_margin_se": config.calibrate.promise_margin,
                "candidate_pool": calibration["candidate_pool"],
                "profile": calibration["profile"],
                "config": to_jsonable(config),
            },
            roots,
        ),
        metrics={
            "calibration": {
                "split": "calib",
                "note": "in-sample: these images chose the thresholds",
                "images": calibration["calib_images"],
                "operating_points": {name: point.calibration for name, point in selection.points.items()},
            },
        },
    )
    kept = {layer: heads[layer] for layer in layers}
    return save_checkpoint(directory, manifest, kept, gates, activation_ranges(job))  # ranges: static modes only
