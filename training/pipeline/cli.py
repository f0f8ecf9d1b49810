"""``lraee-train <step>``: the offline jobs from the command line.

Every step takes the same options. The run's configuration is resolved as: defaults, then the work dir's
``config.json`` from an earlier call, then ``--config FILE``, then the options given on this command line; the
result is written back to ``<work dir>/config.json``, so later steps in the same work dir need only ``--work-dir``.
A step runs the steps it reads from first (each skipped when up to date), like ``make``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lraee_core.config import QUANT_MODES
from lraee_core.errors import LraeeError

from .build import STEPS, run_build
from .calibrate import OPERATING_POINTS
from .config import BuildConfig, ConfigError, load_build_config
from .evaluate import EngineMismatchError
from .jobs import Job, write_json

log = logging.getLogger("training")
CONFIG_FILE = "config.json"


def _path(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def _pretrained(value: str) -> str:
    """A weights file becomes an absolute path (config.json is reused from any directory); a tag stays a tag."""
    return _path(value) if Path(value).expanduser().exists() or "/" in value else value


def _split_size(value: str) -> float | int:
    """ "0.2" -> a fraction, "500" -> a count (scikit-learn's test_size convention)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def _layers(value: str) -> tuple[int, ...]:
    return tuple(sorted({int(part) for part in value.split(",") if part.strip()}))


def _counts(value: str) -> tuple[int, ...]:
    """ "2,5,10,0" -> label counts (0: every label)."""
    return tuple(int(part) for part in value.split(",") if part.strip())


def _on_off(value: str) -> bool:
    """ "on" / "off" -> a switch."""
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")
    return value == "on"


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Option:
    """A command-line option that sets one config field."""

    flag: str  # e.g. "--model"
    field: str  # dotted path into BuildConfig, e.g. "backbone.model_name"
    parse: Callable[[str], Any]  # text -> value
    help: str  # shown by --help
    choices: Sequence[str] | None = None  # allowed values


OPTIONS: tuple[Option, ...] = (
    Option("--model", "backbone.model_name", str, "open_clip model name, e.g. ViT-B-32"),
    Option("--pretrained", "backbone.pretrained", _pretrained, "open_clip pretrained tag or a local weights file"),
    Option("--model-config", "backbone.model_config_file", _path, "open_clip JSON architecture to register"),
    Option("--random-init-seed", "backbone.random_init_seed", int, "seed of a backbone without pretrained weights"),
    Option(
        "--quant",
        "quant_mode",
        str,
        "vision-tower quantization (default full: the fastest batch-invariant engine; paper: MLP-only INT8)",
        QUANT_MODES,
    ),
    Option("--data", "data.source", _path, "ImageFolder root or .csv/.jsonl manifest (path,label)"),
    Option("--eval-data", "data.eval_source", _path, "separate evaluation images (no eval split is carved)"),
    Option("--classes-tsv", "data.classes_tsv", _path, "ImageNet table wnid<TAB>index<TAB>name... for wnid folders"),
    Option("--classes-file", "data.classes_file", _path, "one class name per line: the label set"),
    Option(
        "--word-sets",
        "data.word_sets",
        _path,
        "JSON of coarse words per class (and class groups): word and group label sets for gates/calib",
    ),
    Option(
        "--label-space",
        "data.label_space",
        str,
        "label set: classes in --data, or all 1000 ImageNet ones",
        ("present", "imagenet-1k"),
    ),
    Option("--head-split", "data.head_split", _split_size, "head-training images: fraction or count"),
    Option("--gate-split", "data.gate_split", _split_size, "gate-fitting images: fraction or count"),
    Option("--calib-split", "data.calib_split", _split_size, "calibration images: fraction or count"),
    Option("--eval-split", "data.eval_split", _split_size, "evaluation images: fraction or count"),
    Option("--per-class-limit", "data.per_class_limit", int, "at most this many images per class"),
    Option("--eval-limit", "data.eval_limit", int, "at most this many evaluation images"),
    Option("--split-seed", "data.seed", int, "seed of the split"),
    Option("--profile-images", "profile.num_images", int, "calibration images profiled"),
    Option("--profile-batch-size", "profile.batch_size", int, "profile batch size"),
    Option(
        "--candidate-layers",
        "extract.candidate_layers",
        _layers,
        "cached layers, e.g. 6,7,8,9,10,11,12; unset: every layer >= depth/2",
    ),
    Option("--batch-size", "extract.batch_size", int, "extraction batch size"),
    Option("--shard-size", "extract.shard_size", int, "images per feature shard"),
    Option("--workers", "extract.num_workers", int, "image-decoding workers"),
    Option("--reuse-features", "extract.reuse_from", _path, "another work dir's extract dir to copy shards from"),
    Option("--epochs", "heads.epochs", int, "head-training epochs"),
    Option("--head-batch-size", "heads.batch_size", int, "head-training batch size"),
    Option("--lr", "heads.lr", float, "Adam learning rate"),
    Option("--weight-decay", "heads.weight_decay", float, "Adam weight decay"),
    Option("--cosine-weight", "heads.cosine_weight", float, "label-free heads: weight of 1 - cos to full depth"),
    Option("--mse-weight", "heads.mse_weight", float, "label-free heads: weight of the MSE to full depth"),
    Option("--distill-weight", "heads.distill_weight", float, "CE + cosine heads: lambda of the cosine term"),
    Option("--hidden-dim", "heads.hidden_dim", int, "exit-head MLP hidden width; unset: the token width"),
    Option("--head-seed", "heads.seed", int, "head initialisation and shuffling seed"),
    Option("--gate-l2", "gate.l2", float, "ridge penalty of the gate fit"),
    Option("--gate-max-iter", "gate.max_iter", int, "Newton iterations of the gate fit"),
    Option("--gate-label-sets", "gate.label_sets_per_image", int, "label sets drawn per gate-split image"),
    Option(
        "--gate-features",
        "gate.features",
        _names,
        "gate features, e.g. cos_top1,cos_gap,entropy_norm,log_k; unset: chosen by held-out AUC",
    ),
    Option("--accurate-promise", "calibrate.accurate_promise", float, "held-out agreement 'accurate' promises"),
    Option("--balanced-promise", "calibrate.balanced_promise", float, "held-out agreement 'balanced' promises"),
    Option("--fast-promise", "calibrate.fast_promise", float, "held-out agreement 'fast' promises"),
    Option("--promise-margin", "calibrate.promise_margin", float, "standard errors calib agreement must clear"),
    Option("--calib-label-counts", "calibrate.label_counts", _counts, "K where promises must hold (0: all labels)"),
    Option("--word-label-counts", "calibrate.word_label_counts", _counts, "K of word label sets (with --word-sets)"),
    Option("--threshold-candidates", "calibrate.threshold_candidates", int, "shared thresholds tried per point"),
    Option("--prune-fraction", "calibrate.prune_fraction", float, "prune INR < this x neighbours' mean (0: off)"),
    Option("--max-candidates", "calibrate.max_candidates", int, "most exit layers in the checkpoint"),
    Option(
        "--label-caps",
        "calibrate.label_caps",
        _on_off,
        "on or off: each point runs its exits only up to the label count where they still pay for the heads",
    ),
    Option(
        "--head-cost-blocks",
        "calibrate.head_cost_blocks",
        float,
        "blocks of time charged per head and gate run, with --charge constant (python -m training.pipeline.head_cost)",
    ),
    Option(
        "--charge",
        "calibrate.charge",
        str,
        "constant (--head-cost-blocks for every candidate) or measured (each candidate's own time on this machine)",
    ),
    Option("--charge-rounds", "calibrate.charge_rounds", int, "timing rounds per batch size with --charge measured"),
    Option(
        "--default-operating-point",
        "calibrate.default_operating_point",
        str,
        "operating point used when a request names none",
        OPERATING_POINTS,
    ),
    Option(
        "--ship",
        "calibrate.ship",
        str,
        "exits the checkpoint ships: SSA (lraee), [CLS] (cls-ee), or the one saving more calib FLOPs",
        ("auto", "lraee", "cls-ee"),
    ),
    Option("--checkpoint-id", "calibrate.checkpoint_id", str, "checkpoint name shown by the service"),
    Option("--label-counts", "evaluate.label_counts", _counts, "the evaluation's K-sweep (0: all labels)"),
    Option("--patience", "evaluate.patience", int, "PABEE patience (consecutive agreeing heads)"),
    Option("--engine-check-images", "evaluate.engine_check_images", int, "images run through the real engine"),
    Option(
        "--engine-check-tolerance",
        "evaluate.engine_check_tolerance",
        float,
        "engine check: a gate probability or top-1 cosine gap this close to its boundary may decide either way",
    ),
    Option("--out", "checkpoint_dir", _path, "checkpoint directory; unset: <work dir>/checkpoint"),
    Option("--report-dir", "report_dir", _path, "report directory; unset: <checkpoint>/report"),
)
STEP_HELP = {
    "split": "scan the data and write the disjoint head/gate/calib/eval splits",
    "profile": "QIRC profile: FP32 vs INT8 hidden states per layer (NSR, INR, cosine, MSE, max activation)",
    "extract": "run the frozen backbones once and cache per-layer features",
    "train-heads": "train label-free SSA heads (and the paper's CE variants, CLS baseline) on cached features",
    "fit-gate": "fit the per-layer agreement gates on label sets of every size",
    "calibrate": "prune layers, choose candidates and each operating point's threshold, write the checkpoint",
    "evaluate": "every method at every label count on the evaluation split; report + held-out figures",
    "build": "all of the above in order",
}


def _field_name(option: Option) -> str:
    return option.field.replace(".", "__")


def parser() -> argparse.ArgumentParser:
    """The ``lraee-train`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work-dir", required=True, type=_path, help="caches and step outputs")
    common.add_argument("--config", type=_path, help="a BuildConfig JSON file (e.g. a work dir's config.json)")
    common.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--force", action="store_true", help="redo this step (build: every step) even if up to date")
    common.add_argument(
        "--template", action="append", dest="templates", help="prompt template with {} (repeat; default: 7 simple)"
    )
    defaults = BuildConfig()
    for option in OPTIONS:
        default = _get(defaults, option.field)
        if isinstance(default, bool):  # a switch (_on_off) shows its default as it is typed
            default = "on" if default else "off"
        common.add_argument(
            option.flag,
            dest=_field_name(option),
            type=option.parse,
            choices=option.choices,
            metavar=None if option.choices else option.flag.lstrip("-").replace("-", "_").upper(),
            help=option.help if default in (None, "") else f"{option.help} (default: {default})",
        )
    root = argparse.ArgumentParser(
        prog="lraee-train",
        description=__doc__.split("\n\n")[0],
        epilog="the tiny-CLIP trainers of the embedded models moved to training.embedded: " + ", ".join(MOVED.values()),
    )
    commands = root.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, text in STEP_HELP.items():
        commands.add_parser(name, parents=[common], help=text, description=text)
    return root


def _get(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _set(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _set(getattr(config, head), rest, value)})


def resolve_config(args: argparse.Namespace) -> BuildConfig:
    """Defaults <- work dir config.json <- --config <- command-line options."""
    saved = Path(args.work_dir) / CONFIG_FILE
    config = BuildConfig()
    if args.config:
        config = load_build_config(args.config)
    elif saved.is_file():
        config = load_build_config(saved)
    for option in OPTIONS:
        value = getattr(args, _field_name(option))
        if value is not None:
            config = _set(config, option.field, value)
    if args.templates:
        config = _set(config, "data.templates", tuple(args.templates))
    return config


def _log_to_stderr() -> None:
    """Progress lines of the jobs on stderr. The root logger stays at WARNING so open_clip's INFO chatter stays
    quiet; an existing root handler (pytest's, an embedding application's) is left alone."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)


# Subcommands that trained this repository's own tiny CLIPs; they belong to the embedded models' package, which the
# pipeline does not import (it builds a checkpoint for any open_clip CLIP), and are run from there.
MOVED = {
    "world-clip": "python -m training.embedded.world_clip",
    "photo-clip": "python -m training.embedded.photo_clip",
    "everyday-clip": "python -m training.embedded.everyday",
    "photos": "python -m training.embedded.photos",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lraee-train``; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in MOVED:
        print(f"lraee-train {arguments[0]} moved: run {MOVED[arguments[0]]} (same options)", file=sys.stderr)
        return 2
    args = parser().parse_args(arguments)
    _log_to_stderr()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    config = resolve_config(args)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(work_dir / CONFIG_FILE, config.to_json())
    force = frozenset(STEPS) if args.force and args.step == "build" else frozenset({args.step} if args.force else ())
    job = Job(config=config, work_dir=work_dir, force=force, argv=("lraee-train", *arguments))
    started = time.perf_counter()
    try:
        if args.step == "build":
            run_build(job)
        else:
            STEPS[args.step](job)
    except (ConfigError, LraeeError, EngineMismatchError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        return 1
    summary = ", ".join(f"{step}: {status}" for step, status in job.statuses.items())
    log.info("done in %.1f s (%s)", time.perf_counter() - started, summary)
    if args.step in ("calibrate", "build", "evaluate"):
        log.info("checkpoint: %s", job.checkpoint_dir)
    if args.step in ("evaluate", "build"):
        log.info("report: %s", job.report_dir / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
