"""Checkpoints with untrained heads and gates, for tests and benchmarks on backbones nobody has calibrated.

The manifest says so (``calibration.kind == "untrained"``) so such a checkpoint is never mistaken for a real one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .backbone import ClipBackbone, build_backbone
from .checkpoint import Manifest, new_manifest, save_checkpoint
from .config import BackboneConfig, HeadConfig, OperatingPoint, QuantMode
from .gate import GateParams
from .heads import ExitHead
from .quantize import quantize_vision
from .static_quant import ActivationRanges


def untrained_checkpoint(
    directory: str | Path,
    backbone_config: BackboneConfig,
    *,
    candidate_layers: tuple[int, ...] | None = None,
    quant_mode: QuantMode = "paper",
    hidden_dim: int | None = None,
    seed: int = 0,
    checkpoint_id: str = "untrained",
    backbone: ClipBackbone | None = None,
    activation_ranges: ActivationRanges | None = None,
) -> Manifest:
    """Write a checkpoint with seeded random heads and gates for ``backbone_config``.

    Default candidates are the paper's layers scaled to the tower's depth (9, 11, 12 of 12). Thresholds: operating
    points ``never`` (1.0 everywhere), ``always`` (0.0) and ``half`` (0.5, the default). A static ``quant_mode``
    needs ``activation_ranges`` (:func:`lraee_core.static_quant.observe_ranges`); they are saved with the heads.
    """
    directory = Path(directory)
    backbone = backbone or build_backbone(backbone_config)
    shape = backbone.shape
    if candidate_layers is None:
        depth = shape.num_layers
        candidate_layers = tuple(sorted({max(1, round(depth * 9 / 12)), max(1, depth - 1), depth}))
    head_config = HeadConfig(
        pooling="ssa", width=shape.width, hidden_dim=hidden_dim or shape.width, embed_dim=shape.embed_dim
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = {layer: ExitHead(head_config) for layer in candidate_layers}
    gates = {}
    for layer in candidate_layers:
        w = (torch.rand(3, generator=generator) * 4 - 2).tolist()
        gates[layer] = GateParams(weight=(w[0], w[1], w[2]), bias=float(torch.randn(1, generator=generator)))
    # Count what this quant mode converts on a throwaway copy of the tower so loading can check it.
    converted = len(quantize_vision(copy.deepcopy(backbone.visual), quant_mode, activation_ranges).converted)
    manifest = new_manifest(
        backbone,
        directory,
        checkpoint_id=checkpoint_id,
        quant_mode=quant_mode,
        quantized_modules=converted,
        head=head_config,
        candidate_layers=tuple(candidate_layers),
        operating_points={
            name: OperatingPoint.uniform(name, dict.fromkeys(candidate_layers, threshold))
            for name, threshold in (("half", 0.5), ("never", 1.0), ("always", 0.0))
        },
        default_operating_point="half",
        calibration={"kind": "untrained", "seed": seed, "note": "random heads and gates; for tests and benchmarks"},
    )
    return save_checkpoint(directory, manifest, heads, gates, activation_ranges)
