"""The checkpoint the service loads: ``manifest.json`` (describes everything) + ``heads.safetensors``.

The manifest names the backbone (open_clip architecture, weights source and their SHA-256), the quant mode and
how many modules it converts, the head and gate shapes, the candidate and pruned layers, thresholds per named
operating point, how it was calibrated and what it measured then. Loading rebuilds the backbone from it and
refuses, with the reason, anything that does not match: a wrong backbone, a corrupt tensor file, odd thresholds.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import ClipBackbone, build_backbone, sha256_of_file
from .config import QUANT_MODES, BackboneConfig, ExitPolicy, HeadConfig, OperatingPoint, QuantMode
from .engine import EarlyExitClassifier
from .errors import BackboneError, CheckpointError, InputError
from .gate import FEATURE_NAMES, NUM_FEATURES, GateParams
from .heads import ExitHead
from .quantize import quantize_vision
from .text import validate_templates

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "heads.safetensors"


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
    operating_points: dict[str, dict[int, float]]  # name -> layer -> threshold
    default_operating_point: str  # used when a request names none
    pruned_layers: tuple[PrunedLayer, ...] = ()  # candidates removed by INR pruning
    gate_features: tuple[str, ...] = FEATURE_NAMES  # gate input order
    templates: tuple[str, ...] = ()  # prompt templates the heads and gates were calibrated with: the default
    # prompts of requests that name none; () means the engine's DEFAULT_TEMPLATES
    calibration: dict[str, Any] = field(default_factory=dict)  # data, splits, sizes, budgets, grid, seeds
    metrics: dict[str, Any] = field(default_factory=dict)  # accuracies and FLOPs measured at calibration
    heads_sha256: str = ""  # SHA-256 of heads.safetensors
    format_version: int = FORMAT_VERSION  # manifest layout version

    def policy(self) -> ExitPolicy:
        """The exit policy these thresholds define."""
        return ExitPolicy(
            candidate_layers=self.candidate_layers,
            operating_points=tuple(
                OperatingPoint(name, dict(thresholds)) for name, thresholds in self.operating_points.items()
            ),
            default_operating_point=self.default_operating_point,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (integer layer keys become strings)."""
        data = asdict(self)
        data["operating_points"] = {
            name: {str(layer): value for layer, value in points.items()}
            for name, points in self.operating_points.items()
        }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Parse and type-check a manifest dict; :class:`CheckpointError` on anything missing or malformed."""
        try:
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise CheckpointError(f"manifest format {version} is not supported (expected {FORMAT_VERSION})")
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
                operating_points={
                    str(name): {int(layer): float(t) for layer, t in points.items()}
                    for name, points in data["operating_points"].items()
                },
                default_operating_point=str(data["default_operating_point"]),
                pruned_layers=tuple(PrunedLayer(**p) for p in data.get("pruned_layers", [])),
                gate_features=tuple(data.get("gate_features", FEATURE_NAMES)),
                templates=tuple(str(t) for t in data.get("templates", ())),
                calibration=dict(data.get("calibration", {})),
                metrics=dict(data.get("metrics", {})),
                heads_sha256=str(data["heads_sha256"]),
                format_version=version,
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"malformed manifest: {type(exc).__name__}: {exc}") from exc

    def validate(self) -> None:
        """Internal consistency: layers, thresholds, operating points, gate features, quant mode."""
        if self.quant_mode not in QUANT_MODES:
            raise CheckpointError(f"unknown quant mode {self.quant_mode!r}")
        layers = list(self.candidate_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > self.num_layers:
            raise CheckpointError(f"candidate layers {layers} must be ascending, unique, within 1..{self.num_layers}")
        if tuple(self.gate_features) != FEATURE_NAMES:
            raise CheckpointError(f"gate features {self.gate_features} differ from this engine's {FEATURE_NAMES}")
        if self.default_operating_point not in self.operating_points:
            raise CheckpointError(f"default operating point {self.default_operating_point!r} is not stored")
        for name, thresholds in self.operating_points.items():
            if not set(thresholds) <= set(layers):
                raise CheckpointError(f"operating point {name!r} names layers outside the candidates")
            if any(not 0.0 <= t <= 1.0 for t in thresholds.values()):
                raise CheckpointError(f"operating point {name!r} has a threshold outside [0, 1]")
        if self.head.width != self.width or self.head.embed_dim != self.embed_dim:
            raise CheckpointError("head shape does not match the backbone width / embedding width in the manifest")
        if self.templates:
            try:
                validate_templates(self.templates)
            except InputError as exc:
                raise CheckpointError(f"manifest templates: {exc}") from exc


def _inside_or_absolute(path: Path, directory: Path | None) -> str:
    """Relative to ``directory`` when the file lies inside it (the checkpoint moves with it), else absolute."""
    resolved = path.resolve()
    if directory is not None and resolved.is_relative_to(directory.resolve()):
        return str(resolved.relative_to(directory.resolve()))
    return str(resolved)


def backbone_ref(backbone: ClipBackbone, checkpoint_dir: Path | None = None) -> BackboneRef:
    """Describe a built backbone for a manifest; copies its JSON architecture into ``checkpoint_dir``."""
    cfg = backbone.config
    pretrained, kind = cfg.pretrained, "random"
    if pretrained is not None:
        path = Path(pretrained)
        kind = "file" if path.is_file() else "tag"
        if kind == "file":
            pretrained = _inside_or_absolute(path, checkpoint_dir)
    config_file = cfg.model_config_file
    if config_file is not None and checkpoint_dir is not None:
        # The architecture travels with the checkpoint (open_clip registers a config under its file stem).
        source = Path(config_file)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        target = checkpoint_dir / source.name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        config_file = source.name
    return BackboneRef(
        model_name=cfg.model_name,
        pretrained=pretrained,
        pretrained_kind=kind,
        model_config_file=config_file,
        weights_sha256=backbone.weights_sha256,
        random_init_seed=cfg.random_init_seed,
    )


def readable_by_all(path: Path) -> None:
    """Give a written file the umask's usual mode: safetensors creates files 0600, which a container's non-root
    user cannot read once the file is copied in by root."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_checkpoint(
    directory: str | Path,
    manifest: Manifest,
    heads: dict[int, ExitHead],
    gates: dict[int, GateParams],
) -> Manifest:
    """Write heads/gates tensors and the manifest (with the tensors' SHA-256); returns the manifest written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for layer, head in heads.items():
        for name, value in head.state_dict().items():
            tensors[f"heads.{layer}.{name}"] = value.detach().float().contiguous()
    for layer, gate in gates.items():
        tensors[f"gates.{layer}.weight"] = torch.tensor(gate.weight, dtype=torch.float32)
        tensors[f"gates.{layer}.bias"] = torch.tensor([gate.bias], dtype=torch.float32)
    save_file(tensors, str(directory / TENSORS))
    readable_by_all(directory / TENSORS)
    final = Manifest(**{**manifest.__dict__, "heads_sha256": sha256_of_file(directory / TENSORS)})
    final.validate()
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(final.to_json(), indent=2, sort_keys=False) + "\n")
    tmp.replace(directory / MANIFEST)
    return final


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``manifest.json`` of a checkpoint directory."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no {MANIFEST} in {directory} (expected an LRA-EE checkpoint directory)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    manifest = Manifest.from_json(data)
    manifest.validate()
    return manifest


def _resolve(directory: Path, relative: str | None) -> str | None:
    if relative is None:
        return None
    path = Path(relative)
    return str(path if path.is_absolute() else directory / path)


def load_heads_and_gates(directory: Path, manifest: Manifest) -> tuple[dict[int, ExitHead], dict[int, GateParams]]:
    """Load and shape-check the tensors of every candidate layer."""
    path = directory / TENSORS
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    if sha256_of_file(path) != manifest.heads_sha256:
        raise CheckpointError(f"{path} does not match the SHA-256 in the manifest (corrupt or replaced)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from exc
    heads: dict[int, ExitHead] = {}
    gates: dict[int, GateParams] = {}
    for layer in manifest.candidate_layers:
        head = ExitHead(manifest.head)
        prefix = f"heads.{layer}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"layer {layer} head does not match {manifest.head}: {exc}") from exc
        weight, bias = tensors.get(f"gates.{layer}.weight"), tensors.get(f"gates.{layer}.bias")
        if weight is None or bias is None or weight.shape != (NUM_FEATURES,) or bias.shape != (1,):
            raise CheckpointError(f"layer {layer} gate is missing or not {NUM_FEATURES} weights + 1 bias")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise CheckpointError(f"layer {layer} gate has non-finite parameters")
        w = weight.tolist()
        heads[layer] = head.eval()
        gates[layer] = GateParams(weight=(w[0], w[1], w[2]), bias=float(bias.item()))
    return heads, gates


def load_classifier(
    path: str | Path,
    *,
    weights: str | None = None,
    text_cache_capacity: int = 4096,
    cache_dir: str | None = None,
) -> EarlyExitClassifier:
    """Build the classifier a checkpoint describes. ``weights`` points at a local copy of the backbone weights
    (e.g. a mounted volume) instead of the manifest's source; its SHA-256 must still match when recorded."""
    directory = Path(path)
    manifest = read_manifest(directory)
    ref = manifest.backbone
    pretrained = ref.pretrained
    if weights is not None:
        pretrained = weights
    elif ref.pretrained_kind == "file":
        pretrained = _resolve(directory, ref.pretrained)
    config = BackboneConfig(
        model_name=ref.model_name,
        pretrained=pretrained,
        model_config_file=_resolve(directory, ref.model_config_file),
        random_init_seed=ref.random_init_seed,
    )
    try:
        backbone = build_backbone(config, cache_dir=cache_dir)
    except BackboneError as exc:
        raise CheckpointError(f"checkpoint {manifest.checkpoint_id!r}: {exc}") from exc
    if ref.weights_sha256 and backbone.weights_sha256 and ref.weights_sha256 != backbone.weights_sha256:
        raise CheckpointError(
            f"backbone weights {pretrained} (sha256 {backbone.weights_sha256[:12]}...) are not the ones this "
            f"checkpoint was calibrated on (sha256 {ref.weights_sha256[:12]}...)"
        )
    shape = backbone.shape
    expected = (manifest.num_layers, manifest.width, manifest.embed_dim, manifest.image_size)
    actual = (shape.num_layers, shape.width, shape.embed_dim, shape.image_size)
    if expected != actual:
        raise CheckpointError(
            f"backbone {ref.model_name} has (layers, width, embed_dim, image_size) = {actual}; "
            f"the checkpoint expects {expected}"
        )
    heads, gates = load_heads_and_gates(directory, manifest)
    report = quantize_vision(backbone.visual, manifest.quant_mode)
    if len(report.converted) != manifest.quantized_modules:
        raise CheckpointError(
            f"quant mode {manifest.quant_mode!r} converted {len(report.converted)} modules here but "
            f"{manifest.quantized_modules} at calibration (different open_clip/torch version?)"
        )
    return EarlyExitClassifier(
        backbone,
        report,
        heads,
        gates,
        manifest.policy(),
        manifest.head,
        text_cache_capacity=text_cache_capacity,
        checkpoint_id=manifest.checkpoint_id,
        manifest=manifest,
    )
