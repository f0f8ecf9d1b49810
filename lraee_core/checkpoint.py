"""The checkpoint the service loads: ``manifest.json`` (:mod:`lraee_core.manifest`) + ``heads.safetensors``.

Loading rebuilds the backbone the manifest names and refuses, with the reason, anything that does not match: a
wrong backbone, a corrupt tensor file, gate tensors that do not fit the manifest's gate features, odd thresholds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .backbone import ClipBackbone, build_backbone, sha256_of_file
from .backends import DEFAULT_BACKEND, BackendChoice, BackendOptions, prepare_backbone, resolve_backend
from .config import BackboneConfig, QuantMode
from .engine import EarlyExitClassifier
from .errors import BackboneError, CheckpointError
from .gate import GateParams
from .heads import ExitHead
from .manifest import FORMAT_VERSION, BackboneRef, Manifest, PrunedLayer
from .static_quant import RANGES_FILE, STATIC_MODES, ActivationRanges

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "TENSORS",
    "BackboneRef",
    "Manifest",
    "PrunedLayer",
    "backbone_ref",
    "load_activation_ranges",
    "load_classifier",
    "load_heads_and_gates",
    "new_manifest",
    "read_manifest",
    "save_checkpoint",
    "write_manifest",
]

MANIFEST = "manifest.json"
TENSORS = "heads.safetensors"


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


def new_manifest(backbone: ClipBackbone, directory: Path, **fields: Any) -> Manifest:
    """The one constructor of a checkpoint's manifest, for every writer (the build pipeline, untrained checkpoints):
    what ``backbone`` says of itself (its reference, its architecture file copied into ``directory``, its shape)
    plus ``fields``, the rest of :class:`Manifest` (id, quant mode, heads, operating points, provenance). Giving a
    field the backbone decides is a TypeError."""
    shape = backbone.shape
    return Manifest(
        backbone=backbone_ref(backbone, directory),
        image_size=shape.image_size,
        num_layers=shape.num_layers,
        width=shape.width,
        embed_dim=shape.embed_dim,
        **fields,
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
    activation_ranges: ActivationRanges | None = None,
) -> Manifest:
    """Write heads/gates tensors and the manifest (with the tensors' SHA-256); returns the manifest written.

    ``activation_ranges``: the calibrated ranges of a static quant mode, written beside the heads and named in the
    manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranges_fields: dict[str, object] = {"activation_ranges": None, "activation_ranges_sha256": ""}
    if activation_ranges is not None:
        activation_ranges.save(directory / RANGES_FILE)
        readable_by_all(directory / RANGES_FILE)
        ranges_fields = {
            "activation_ranges": RANGES_FILE,
            "activation_ranges_sha256": sha256_of_file(directory / RANGES_FILE),
        }
    tensors: dict[str, torch.Tensor] = {}
    for layer, head in heads.items():
        for name, value in head.state_dict().items():
            tensors[f"heads.{layer}.{name}"] = value.detach().float().contiguous()
    for layer, gate in gates.items():
        if gate.features != tuple(manifest.gate_features):
            raise CheckpointError(
                f"layer {layer} gate reads {gate.features}, the manifest says {manifest.gate_features}"
            )
        tensors[f"gates.{layer}.weight"] = torch.tensor(gate.weight, dtype=torch.float32)
        tensors[f"gates.{layer}.bias"] = torch.tensor([gate.bias], dtype=torch.float32)
    # The feature names travel with the weights too, so a manifest naming other features of the same count is caught.
    save_file(tensors, str(directory / TENSORS), metadata={"gate_features": ",".join(manifest.gate_features)})
    readable_by_all(directory / TENSORS)
    final = Manifest(**{**manifest.__dict__, **ranges_fields, "heads_sha256": sha256_of_file(directory / TENSORS)})
    write_manifest(directory, final)
    return final


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Validate and write ``manifest.json`` atomically (e.g. to add figures measured after the tensors were saved)."""
    manifest.validate()
    tmp = Path(directory) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    tmp.replace(Path(directory) / MANIFEST)


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
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from exc
    features = tuple(manifest.gate_features)
    stored = metadata.get("gate_features")
    if stored is not None and tuple(stored.split(",")) != features:
        raise CheckpointError(
            f"the gates in {path} read features {stored.split(',')}; the manifest says {list(features)}"
        )
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
        if weight is None or bias is None or weight.shape != (len(features),) or bias.shape != (1,):
            raise CheckpointError(f"layer {layer} gate is missing or not {len(features)} weights + 1 bias")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise CheckpointError(f"layer {layer} gate has non-finite parameters")
        heads[layer] = head.eval()
        gates[layer] = GateParams(weight=tuple(weight.tolist()), bias=float(bias.item()), features=features)
    return heads, gates


def load_activation_ranges(directory: Path, manifest: Manifest) -> ActivationRanges:
    """The calibrated activation ranges a static checkpoint names, checked against their SHA-256."""
    if manifest.activation_ranges is None:
        raise CheckpointError(
            f"checkpoint {manifest.checkpoint_id!r} (quant mode {manifest.quant_mode!r}) carries no calibrated "
            f"activation ranges, which the static modes {STATIC_MODES} need"
        )
    path = directory / manifest.activation_ranges
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    if sha256_of_file(path) != manifest.activation_ranges_sha256:
        raise CheckpointError(f"{path} does not match the SHA-256 in the manifest (corrupt or replaced)")
    try:
        return ActivationRanges.load(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from exc


def load_classifier(
    path: str | Path,
    *,
    quant_mode: QuantMode | None = None,
    backend: BackendChoice | None = None,
    backend_options: BackendOptions | None = None,
    weights: str | None = None,
    activation_ranges: ActivationRanges | None = None,
    text_cache_capacity: int = 4096,
    cache_dir: str | None = None,
) -> EarlyExitClassifier:
    """Build the classifier a checkpoint directory (manifest.json + heads.safetensors) describes; the one loader.

    ``quant_mode`` overrides the manifest's quant mode (None: the manifest's; the heads and gates stay those
    calibrated under the manifest's mode). ``backend`` picks what runs the vision tower (:mod:`lraee_core.backends`;
    ``auto``: the fastest one for the quant mode; None: ``torch``; the classifier's ``backend`` says which ran),
    ``backend_options`` its threads and working directory. ``weights`` points at a local copy of
    the backbone weights (e.g. a mounted volume) instead of the manifest's source; its SHA-256 must still match when
    recorded. ``activation_ranges`` replaces the checkpoint's calibrated ranges for a static ``quant_mode`` (e.g. a
    ``paper`` checkpoint run static with ranges observed elsewhere, :func:`lraee_core.static_quant.observe_ranges`).
    :class:`~lraee_core.errors.CheckpointError` on anything that does not load or match.
    """
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
    mode = manifest.quant_mode if quant_mode is None else quant_mode
    named = backend or DEFAULT_BACKEND  # as the error messages name it until it is resolved
    try:
        named = chosen = resolve_backend(backend, mode)
        ranges = activation_ranges
        if ranges is None and mode in STATIC_MODES and chosen == "torch":
            ranges = load_activation_ranges(directory, manifest)
        backbone, report = prepare_backbone(backbone, mode, chosen, backend_options, ranges)
    except BackboneError as exc:
        raise CheckpointError(f"checkpoint {manifest.checkpoint_id!r}, backend {named}: {exc}") from exc
    # The manifest counts what its own mode converted with torch at calibration; other modes convert other modules.
    if chosen == "torch" and mode == manifest.quant_mode and len(report.converted) != manifest.quantized_modules:
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
        backend=chosen,
    )
