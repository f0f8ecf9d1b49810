"""Frozen configuration of the offline jobs and its JSON round trip.

One :class:`BuildConfig` describes a whole run (backbone, data, every step); :mod:`training.pipeline.jobs` turns it
into a job whose steps are resumable.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from lraee_core.config import BackboneConfig, QuantMode
from lraee_core.text import DEFAULT_TEMPLATES

LabelSpace = Literal["present", "imagenet-1k"]
SplitSize = float | int  # like scikit-learn's test_size: a float is a fraction of the images, an int a count


class ConfigError(ValueError):
    """A setting that cannot work (the message says which and why)."""


SPLIT_NAMES: tuple[str, ...] = ("head", "gate", "calib", "eval")  # head training, gate fitting, calibration, eval


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled images come from, how labels become prompts, and how the images are split."""

    source: str = ""  # ImageFolder root or a .csv/.jsonl manifest (path,label)
    classes_tsv: str | None = None  # ImageNet table (wnid, index, name, ...): wnid folders -> IMAGENET_CLASSNAMES
    classes_file: str | None = None  # one class name per line: the label set in index order (else inferred)
    label_space: LabelSpace = "present"  # "present": classes found in the data; "imagenet-1k": all 1000 names
    eval_source: str | None = None  # separate evaluation images (same formats); then no eval split is carved
    head_split: SplitSize = 0.5  # images that train the exit heads
    gate_split: SplitSize = 0.2  # images that fit the gates
    calib_split: SplitSize = 0.15  # images for the QIRC profile, pruning and the threshold search
    eval_split: SplitSize = 0.15  # images for the report (ignored when eval_source is set)
    per_class_limit: int | None = None  # cap on images per class of ``source`` before splitting (quick runs)
    eval_limit: int | None = None  # cap on the evaluation images (a stratified subsample)
    seed: int = 0  # seed of the split
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # prompt templates of the label ensemble ("{}" = class name)
    word_sets: str | None = None  # JSON file of coarse words per class (label_sets.WordSets): adds word label sets
    # to gate fitting and calibration, so the promises hold where clients type "dog" rather than class names; its
    # optional "groups" (name -> class names) add label sets that are one group whole, each kept to the promises


@dataclass(frozen=True)
class ProfileConfig:
    """The QIRC profile: FP32 vs INT8 hidden states block by block."""

    num_images: int = 512  # calibration images profiled (the first N of the calib split)
    batch_size: int = 32  # images per forward pass


@dataclass(frozen=True)
class ExtractConfig:
    """The one pass of the frozen INT8 backbone whose outputs every later step reads."""

    candidate_layers: tuple[int, ...] | None = None  # layers cached for heads; None: every layer from 3 up (the
    # candidate search weighs each by the time it saves, so shallow layers are considered and kept only where they pay)
    batch_size: int = 64  # images per forward pass
    shard_size: int = 2048  # images per feature shard on disk
    num_workers: int = 0  # DataLoader workers decoding images
    reuse_from: str | None = None  # another build's extract dir whose identical split shards are copied, not redone


HeadLoss = Literal["embed", "distilled", "hard"]


@dataclass(frozen=True)
class HeadTrainConfig:
    """Exit-head training on cached features.

    The shipped heads are label-free: each one learns to reproduce the served model's full-depth image embedding
    (``cosine_weight`` x (1 - cos) + ``mse_weight`` x MSE), so they answer any label set as full depth would. The
    paper's variants (cross-entropy + cosine, cross-entropy only) are trained too, as ablation rows; their
    cross-entropy runs over a label subset sampled per batch (the batch's own classes plus random others, K
    log-uniform), not over one fixed list.
    """

    epochs: int = 3  # passes over the head split
    batch_size: int = 64  # images per Adam step
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    cosine_weight: float = 1.0  # label-free heads: weight of 1 - cos(head, full-depth embedding)
    mse_weight: float = 0.0  # label-free heads: weight of the MSE between the unit embeddings
    distill_weight: float = 1.0  # lambda of the cosine term of the paper's CE + cosine ("distilled") heads
    hidden_dim: int | None = None  # MLP hidden width; None: the backbone's token width
    seed: int = 0  # head initialisation, shuffling and label subsets


@dataclass(frozen=True)
class GateFitConfig:
    """Per-layer logistic regression of "this exit's top-1 equals the full-depth top-1 for this label set"."""

    l2: float = 1e-3  # ridge penalty on the standardised weights (keeps separable data finite)
    max_iter: int = 100  # Newton iterations
    tol: float = 1e-9  # stop when the loss improves less than this
    label_sets_per_image: int = 4  # label sets drawn per gate-split image (K log-uniform over 2..N each)
    features: tuple[str, ...] | None = None  # the gate's features; None: the candidate set with the best
    # held-out AUC (fitted on the gate split, measured on the calib split)
    seed: int = 0  # label-set sampling


@dataclass(frozen=True)
class CalibrateConfig:
    """Layer pruning, candidate selection and the operating points' thresholds (one shared threshold each)."""

    accurate_promise: float = 0.99  # "accurate": held-out agreement with the full-depth top-1 at least this
    balanced_promise: float = 0.97  # "balanced": the same promise, looser
    fast_promise: float = 0.93  # "fast": the loosest promise
    promise_margin: float = 1.0  # calibration agreement must clear the promise by this many standard errors
    label_counts: tuple[int, ...] = (2, 3, 5, 10, 20, 50, 0)  # K at which every promise must hold (0: every label);
    # also the label counts a point's label cap can take
    label_sets_per_image: int = 1  # label sets drawn per calib image and K
    word_label_counts: tuple[int, ...] = (2, 5, 10)  # K of the word label sets (with data.word_sets) at which
    # every promise must hold too
    threshold_candidates: int = 200  # shared thresholds tried per point: quantiles of the calib gate scores
    prune_fraction: float = 0.5  # prune a layer whose INR < this x mean INR of its neighbouring layers (0: none)
    max_candidates: int = 3  # most exit layers kept (each one costs a head and a gate on every image reaching it)
    head_cost_blocks: float = 0.0  # the search charges every head-and-gate evaluation this many blocks of time
    # (0: their FLOPs only, a fraction of a block; on a small model served by ONNX Runtime each candidate is one
    # more graph call and dozens of small ops, which at batch 1 cost more than a block: see the everyday recipe)
    # What a candidate's head and gate cost in the search: "constant" (head_cost_blocks for every layer) or
    # "measured" (each candidate layer's own time on the service's backend, at batch 1 and 32, measured by this
    # build on this machine: training.pipeline.head_cost.candidate_charges)
    charge: str = "constant"
    charge_rounds: int = 30  # interleaved timing rounds per batch size when charge is "measured"
    label_caps: bool = True  # give each point a label cap: above the label count where its exits stop paying for
    # the heads on the calib split, requests run no heads (training.pipeline.search, "Label caps")
    default_operating_point: str = "balanced"  # used when a request names none
    ship: str = "auto"  # exits the checkpoint ships: "lraee" (SSA heads), "cls-ee" ([CLS] heads), or "auto": the
    # one of the two saving more calib FLOPs at the default point (both keep the same promises)
    checkpoint_id: str = "lraee"  # name shown by the service
    seed: int = 1  # label-set sampling


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation report."""

    label_counts: tuple[int, ...] = (2, 3, 5, 10, 20, 50, 0)  # the K-sweep (0: every label of the data)
    patience: int = 2  # PABEE: leave once this many consecutive exit heads agree on the top-1 class
    engine_check_images: int = 32  # evaluation images also run through the real engine (0: skip the check)
    engine_check_tolerance: float = 1e-4  # gate probabilities this close to a threshold, and top-1 cosines this
    # close to the runner-up, may decide either way between the engine and the simulation
    seed: int = 2  # label-set sampling


DEFAULT_BACKBONE = BackboneConfig("ViT-B-32")  # random weights unless --pretrained names some


@dataclass(frozen=True)
class BuildConfig:
    """A whole run: which backbone, which data, and every step's settings."""

    backbone: BackboneConfig = DEFAULT_BACKBONE  # the open_clip CLIP to calibrate
    # INT8 mode of the vision tower: "full" (every Linear of the blocks INT8, attention projections included, with
    # per-image activation scales on the onnxruntime backend) is the fastest batch-invariant engine measured
    # (issue 41); "paper" (the MLP Linears only, as open_clip's quantize_dynamic converts) stays, by name, for the
    # paper's comparison
    quant_mode: QuantMode = "full"
    data: DataConfig = DataConfig()  # images, labels, splits
    profile: ProfileConfig = ProfileConfig()  # QIRC profile
    extract: ExtractConfig = ExtractConfig()  # feature cache
    heads: HeadTrainConfig = HeadTrainConfig()  # exit heads
    gate: GateFitConfig = GateFitConfig()  # gates
    calibrate: CalibrateConfig = CalibrateConfig()  # pruning, candidates, thresholds
    evaluate: EvaluateConfig = EvaluateConfig()  # report
    checkpoint_dir: str | None = None  # where the checkpoint goes; None: <work dir>/checkpoint
    report_dir: str | None = None  # where the report goes; None: <checkpoint dir>/report

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return to_jsonable(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildConfig:
        """Inverse of :meth:`to_json`; ``ValueError`` naming any unknown key."""
        return from_jsonable(cls, data)


# ---- JSON round trip ---------------------------------------------------------------------------------------------
Config = TypeVar("Config")


def to_jsonable(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def _decode(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _decode(arg, value)
        if isinstance(value, list):
            return tuple(value)
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return from_jsonable(annotation, value)
    if origin is tuple or isinstance(value, list):
        return tuple(value)
    return value


def from_jsonable(cls: type[Config], data: dict[str, Any]) -> Config:
    """Build dataclass ``cls`` from a dict written by :func:`to_jsonable`; missing keys take their defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(names)}")
    return cls(**{name: _decode(hints[name], value) for name, value in data.items()})


def replace_field(config: Config, path: str, value: Any) -> Config:
    """A copy of the frozen ``config`` with the field at dotted ``path`` (e.g. ``"data.head_split"``) set to
    ``value``."""
    head, _, rest = path.partition(".")
    if rest:
        value = replace_field(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})  # type: ignore[type-var]


def load_build_config(path: str | Path) -> BuildConfig:
    """Read a BuildConfig JSON file."""
    return BuildConfig.from_json(json.loads(Path(path).read_text()))
