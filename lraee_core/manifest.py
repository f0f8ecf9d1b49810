"""The checkpoint's self-description: pure data, versioned, validated; no tensors and no loading.

The manifest names the backbone (open_clip architecture, weights source and their SHA-256), the quant mode and how
many modules it converts, the head and gate shapes (the gate's input features by name), the candidate and pruned
layers, the thresholds of every named operating point with the agreement it promises, how it was calibrated (paths
relative to the checkpoint or to a named root, never absolute) and what it measured on calibration and held-out
images. :mod:`lraee_core.checkpoint` reads and writes it next to the tensors.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import FULL_OPERATING_POINT, QUANT_MODES, ExitPolicy, HeadConfig, OperatingPoint, QuantMode
from .errors import CheckpointError, InputError
from .gate import PAPER_FEATURES, validate_feature_names
from .text import validate_templates

# 2: gate features by name, agreement promises, a built-in `full` point; 3: label caps; 4: one record per operating
# point (promise, thresholds per label count, label cap) instead of three parallel maps
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # version 1 manifests hold the paper's 3-feature gates and no promises


@dataclass(frozen=True)
class BackboneRef:
    """How to rebuild the backbone. Relative file paths are relative to the checkpoint directory."""

    model_name: str  # open_clip architecture name
    pretrained: str | None  # open_clip tag, weights file, or None for seeded random init
    pretrained_kind: str  # "tag", "file" or "random"
    model_config_file: str | None  # JSON architecture to register first, or None for built-in names
    weights_sha256: str | None  # SHA-256 of the weights file, checked on load when known
    random_init_seed: int = 0  # seed of a random-init backbone


@dataclass(frozen=True)
class PrunedLayer:
    """A candidate layer removed by pathological-layer pruning."""

    layer: int  # 1-based layer
    inr: float  # its information-to-noise ratio
    reason: str  # why it was pruned


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild and trust a checkpoint."""

    checkpoint_id: str  # short name shown by the service and in metrics
    backbone: BackboneRef  # what to build
    quant_mode: QuantMode  # vision-tower quantization
    quantized_modules: int  # how many modules quant_mode converts on this backbone (checked on load)
    image_size: int  # input side in pixels
    num_layers: int  # blocks in the vision tower
    width: int  # token width
    embed_dim: int  # joint embedding width
    head: HeadConfig  # exit head shape
    candidate_layers: tuple[int, ...]  # layers with an exit head and gate
    # name -> the point's record: the agreement with the full-depth top-1 it promises, its thresholds per label
    # count and its label cap (lraee_core.config.OperatingPoint; `full` is built in, never stored)
    operating_points: dict[str, OperatingPoint]
    default_operating_point: str  # used when a request names none (a stored point or "full")
    pruned_layers: tuple[PrunedLayer, ...] = ()  # candidates removed by INR pruning
    gate_features: tuple[str, ...] = PAPER_FEATURES  # the gate's input features by name, in weight order
    templates: tuple[str, ...] = ()  # prompt templates the heads and gates were calibrated with: the default
    # prompts of requests that name none; () means the engine's DEFAULT_TEMPLATES
    calibration: dict[str, Any] = field(default_factory=dict)  # data, splits, seeds, search (portable paths)
    metrics: dict[str, Any] = field(default_factory=dict)  # figures measured at build time; "held_out" holds
    # agreement and FLOPs saved per label count K and operating point on images never used to choose anything
    heads_sha256: str = ""  # SHA-256 of heads.safetensors
    format_version: int = FORMAT_VERSION  # manifest layout version
    activation_ranges: str | None = None  # static quant modes: the file of calibrated activation ranges, relative
    # to the checkpoint directory (lraee_core.static_quant); None for modes that need none
    activation_ranges_sha256: str = ""  # SHA-256 of that file

    def policy(self) -> ExitPolicy:
        """The exit policy these thresholds define."""
        return ExitPolicy(
            candidate_layers=self.candidate_layers,
            operating_points=tuple(self.operating_points.values()),
            default_operating_point=self.default_operating_point,
        )

    @property
    def promises(self) -> dict[str, float]:
        """Operating point -> the agreement it promises (points without a promise left out)."""
        return {name: p.promise for name, p in self.operating_points.items() if p.promise is not None}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (integer layer and label-count keys become strings)."""
        data = asdict(self)
        data["operating_points"] = {name: point_to_json(point) for name, point in self.operating_points.items()}
        data["format_version"] = FORMAT_VERSION  # whatever it was read from, it is written in this layout
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Parse and type-check a manifest dict; :class:`CheckpointError` on anything missing or malformed."""
        try:
            version = int(data["format_version"])
            if version not in READABLE_VERSIONS:
                raise CheckpointError(
                    f"manifest format {version} is not supported (this engine reads {READABLE_VERSIONS})"
                )
            return cls(
                checkpoint_id=str(data["checkpoint_id"]),
                backbone=BackboneRef(**data["backbone"]),
                quant_mode=data["quant_mode"],
                quantized_modules=int(data["quantized_modules"]),
                image_size=int(data["image_size"]),
                num_layers=int(data["num_layers"]),
                width=int(data["width"]),
                embed_dim=int(data["embed_dim"]),
                head=HeadConfig(**data["head"]),
                candidate_layers=tuple(int(layer) for layer in data["candidate_layers"]),
                operating_points=points_from_json(data, version),
                default_operating_point=str(data["default_operating_point"]),
                pruned_layers=tuple(PrunedLayer(**p) for p in data.get("pruned_layers", [])),
                gate_features=tuple(str(name) for name in data.get("gate_features", PAPER_FEATURES)),
                templates=tuple(str(t) for t in data.get("templates", ())),
                calibration=dict(data.get("calibration", {})),
                metrics=dict(data.get("metrics", {})),
                heads_sha256=str(data["heads_sha256"]),
                format_version=version,
                activation_ranges=data.get("activation_ranges"),
                activation_ranges_sha256=str(data.get("activation_ranges_sha256", "")),
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"malformed manifest: {type(exc).__name__}: {exc}") from exc

    def validate(self) -> None:
        """Internal consistency: layers, thresholds, operating points, promises, gate features, quant mode."""
        if self.quant_mode not in QUANT_MODES:
            raise CheckpointError(f"unknown quant mode {self.quant_mode!r}")
        if self.quant_mode.startswith("static") and not self.activation_ranges:
            raise CheckpointError(f"quant mode {self.quant_mode!r} needs its calibrated activation ranges file")
        if self.activation_ranges is not None and (
            Path(self.activation_ranges).is_absolute() or ".." in Path(self.activation_ranges).parts
        ):
            raise CheckpointError(f"activation ranges {self.activation_ranges!r} must lie inside the checkpoint")
        layers = list(self.candidate_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > self.num_layers:
            raise CheckpointError(f"candidate layers {layers} must be ascending, unique, within 1..{self.num_layers}")
        try:
            validate_feature_names(self.gate_features)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        if FULL_OPERATING_POINT in self.operating_points:
            raise CheckpointError(f"{FULL_OPERATING_POINT!r} is built in and cannot be stored as thresholds")
        if self.default_operating_point not in (*self.operating_points, FULL_OPERATING_POINT):
            raise CheckpointError(f"default operating point {self.default_operating_point!r} is not stored")
        for name, point in self.operating_points.items():
            if point.name != name or not point.by_label_count:
                raise CheckpointError(f"operating point {name!r} must carry its name and thresholds")
            for _, thresholds in point.by_label_count:
                if not set(thresholds) <= set(layers):
                    raise CheckpointError(f"operating point {name!r} names layers outside the candidates")
                if any(not 0.0 <= t <= 1.0 for t in thresholds.values()):
                    raise CheckpointError(f"operating point {name!r} has a threshold outside [0, 1]")
            if point.promise is not None and not 0.0 <= point.promise <= 1.0:
                raise CheckpointError(f"promise of {name!r}: {point.promise} must be an agreement in [0, 1]")
            cap = point.label_cap
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
                raise CheckpointError(f"label cap of {name!r}: {cap!r} must be a label count >= 1")
        if self.head.width != self.width or self.head.embed_dim != self.embed_dim:
            raise CheckpointError("head shape does not match the backbone width / embedding width in the manifest")
        if self.templates:
            try:
                validate_templates(self.templates)
            except InputError as exc:
                raise CheckpointError(f"manifest templates: {exc}") from exc


def point_to_json(point: OperatingPoint) -> dict[str, Any]:
    """A point's manifest record (format 4): promise, label cap, thresholds per label count."""
    return {
        "promise": point.promise,
        "label_cap": point.label_cap,
        "thresholds": {
            str(count): {str(layer): value for layer, value in sorted(thresholds.items())}
            for count, thresholds in point.by_label_count
        },
    }


def points_from_json(data: dict[str, Any], version: int) -> dict[str, OperatingPoint]:
    """The operating points of a manifest dict: format 4 records, or (formats 1-3) the three parallel maps of
    thresholds, promises and label caps, whose thresholds hold at every label count."""
    stored = data["operating_points"]
    if version >= 4:
        return {
            str(name): OperatingPoint(
                str(name),
                tuple(
                    (int(count), {int(layer): float(t) for layer, t in thresholds.items()})
                    for count, thresholds in sorted(record["thresholds"].items(), key=lambda item: int(item[0]))
                ),
                None if record.get("promise") is None else float(record["promise"]),
                record.get("label_cap"),  # validate() checks it
            )
            for name, record in stored.items()
        }
    promises, caps = data.get("promises", {}), data.get("label_caps", {})
    return {
        str(name): OperatingPoint.uniform(
            str(name),
            {int(layer): float(t) for layer, t in thresholds.items()},
            None if promises.get(name) is None else float(promises[name]),
            caps.get(name),
        )
        for name, thresholds in stored.items()
    }


def portable_paths(value: Any, roots: dict[str, str]) -> Any:
    """``value`` with every absolute path string rewritten as ``${root}/relative`` under the most specific named
    root, or ``${elsewhere}/<file name>`` when none holds it: what a manifest or report may record."""
    if isinstance(value, dict):
        return {key: portable_paths(item, roots) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(item, roots) for item in value]
    if not isinstance(value, str) or not value.startswith(os.sep):
        return value
    path = Path(value)
    best: tuple[int, str] | None = None
    for name, root in roots.items():
        base = Path(root).resolve()
        if path == base or base in path.parents:
            depth = len(base.parts)
            if best is None or depth > best[0]:
                best = (depth, f"${{{name}}}" + ("" if path == base else "/" + path.relative_to(base).as_posix()))
    return best[1] if best is not None else f"${{elsewhere}}/{path.name}"
