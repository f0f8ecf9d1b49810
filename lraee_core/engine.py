"""EarlyExitClassifier: a batch of preprocessed images + a label set in, one result per image out.

The vision blocks run once over the rows still alive. At each candidate layer the exit head and gate are evaluated
for those rows only; rows whose gate probability reaches the layer's threshold leave the batch with their logits
(batch compaction: the remaining blocks run on a smaller batch, so FLOPs saved are time saved). Rows that reach the
end take the ordinary full-depth CLIP path ([CLS] pooling + projection).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from .backbone import ClipBackbone
from .config import ExitPolicy, HeadConfig
from .errors import InputError
from .flops import FlopsModel, flops_model
from .gate import GateParams, exits, gate_features
from .heads import ExitHead, class_logits
from .quantize import QuantReport
from .text import DEFAULT_TEMPLATES, TextEmbeddingCache, validate_labels, validate_templates

if TYPE_CHECKING:
    from .checkpoint import Manifest

ExitPath = Literal["head", "full"]


@dataclass(frozen=True)
class Prediction:
    """One label and its probability over the request's label set."""

    label: str
    score: float


@dataclass(frozen=True)
class ExitResult:
    """What happened to one image."""

    predictions: tuple[Prediction, ...]  # top-k, highest score first
    exit_layer: int  # 1-based layer the answer came from; num_layers for the full-depth path
    num_layers: int  # blocks in the vision tower
    exit_path: ExitPath  # "head": an exit head answered; "full": the full-depth CLIP path answered
    gate_probability: float | None  # the gate's probability at the exit layer (None on the full path)
    flops: int  # FLOPs actually spent on this image, heads and gates included
    flops_saved: float  # 1 - flops / flops_full
    flops_full: int  # FLOPs of the plain full-depth CLIP path for this label set (the reference)

    @property
    def exited_early(self) -> bool:
        """True when the image skipped at least one block."""
        return self.exit_layer < self.num_layers


class EarlyExitClassifier:
    """LRA-EE inference over a (possibly INT8) open_clip ViT backbone."""

    max_labels = 10_000  # engine-level bound on a label set; the service sets a tighter one

    def __init__(
        self,
        backbone: ClipBackbone,
        quant_report: QuantReport,
        heads: dict[int, ExitHead],
        gates: dict[int, GateParams],
        policy: ExitPolicy,
        head_config: HeadConfig,
        *,
        text_cache_capacity: int = 4096,
        checkpoint_id: str = "uncheckpointed",
        manifest: Manifest | None = None,
    ) -> None:
        if set(heads) != set(policy.candidate_layers) or set(gates) != set(policy.candidate_layers):
            raise ValueError("heads, gates and the policy's candidate layers must name the same layers")
        self.backbone = backbone
        self.quant_report = quant_report
        self.heads = {layer: head.eval() for layer, head in heads.items()}
        self.gates = gates
        self.policy = policy
        self.head_config = head_config
        self.checkpoint_id = checkpoint_id
        self.manifest = manifest
        self.text_cache = TextEmbeddingCache(backbone.encode_text, model_id=checkpoint_id, capacity=text_cache_capacity)
        self._logit_scale = backbone.logit_scale

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, text_cache_capacity: int = 4096, cache_dir: str | None = None
    ) -> EarlyExitClassifier:
        """Load a checkpoint directory (manifest.json + heads.safetensors) with its backbone; the one entry point."""
        from .checkpoint import load_classifier

        return load_classifier(path, text_cache_capacity=text_cache_capacity, cache_dir=cache_dir)

    @property
    def default_templates(self) -> tuple[str, ...]:
        """Prompts of a request that names none: the checkpoint's calibration templates, else DEFAULT_TEMPLATES."""
        if self.manifest is not None and self.manifest.templates:
            return tuple(self.manifest.templates)
        return tuple(DEFAULT_TEMPLATES)

    @property
    def num_layers(self) -> int:
        """Blocks in the vision tower."""
        return self.backbone.shape.num_layers

    def flops(self, num_labels: int) -> FlopsModel:
        """Per-stage FLOPs for a label set of ``num_labels``."""
        return flops_model(self.backbone.shape, self.head_config.hidden_dim, num_labels)

    def text_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Cached FP16 unit label embeddings [K, E] (prompt-ensembled over ``templates``)."""
        chosen = self.default_templates if templates is None else validate_templates(templates)
        return self.text_cache.get(labels, chosen)

    def thresholds(self, operating_point: str | None) -> dict[int, float]:
        """Thresholds of a stored operating point; :class:`InputError` naming the known ones if unknown."""
        try:
            return self.policy.thresholds(operating_point)
        except KeyError:
            raise InputError(
                f"unknown operating point {operating_point!r}; this model has {list(self.policy.names)}"
            ) from None

    @torch.inference_mode()
    def classify(
        self,
        images: torch.Tensor,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        operating_point: str | None = None,
        thresholds: dict[int, float] | None = None,
        forced_exits: Sequence[int | None] | None = None,
    ) -> list[ExitResult]:
        """Classify preprocessed images [B, 3, H, W] against ``labels``.

        ``thresholds`` overrides the operating point's (layer -> threshold). ``forced_exits`` (benchmarks only)
        replaces the gates' decisions: per image, the candidate layer to leave at, or None for full depth.
        """
        if images.dim() != 4 or images.shape[0] == 0:
            raise InputError(f"expected a non-empty image batch [B, 3, H, W], got shape {tuple(images.shape)}")
        if forced_exits is not None and len(forced_exits) != images.shape[0]:
            raise InputError("forced_exits needs one entry per image")
        labels = validate_labels(labels, self.max_labels)
        layer_thresholds = thresholds if thresholds is not None else self.thresholds(operating_point)
        text = self.text_embeddings(labels, templates)  # [K, E] FP16
        cost = self.flops(len(labels))
        batch = images.shape[0]
        k = max(1, min(top_k, len(labels)))
        logits_out: list[torch.Tensor | None] = [None] * batch
        exit_layer = [self.num_layers] * batch
        exit_path: list[ExitPath] = ["full"] * batch
        gate_prob: list[float | None] = [None] * batch
        evaluated = [0] * batch
        forced = None
        if forced_exits is not None:
            forced = torch.tensor([-1 if f is None else f for f in forced_exits])

        alive = torch.arange(batch)  # original row of each row still in the batch
        hidden = self.backbone.embed(images)  # [B, T, D]
        for layer in range(1, self.num_layers + 1):
            hidden = self.backbone.block(layer, hidden)
            if layer not in self.heads:
                continue
            head = self.heads[layer]
            logits = class_logits(head(head.pool(hidden)), text, self._logit_scale)  # [b, K]
            probability = self.gates[layer].probability(gate_features(logits, hidden))  # [b]
            if forced is not None:
                leave = forced[alive] == layer
            else:
                leave = exits(probability, layer_thresholds.get(layer, 1.0))
            for row in alive.tolist():
                evaluated[row] += 1
            for position in leave.nonzero().flatten().tolist():
                row = int(alive[position])
                logits_out[row] = logits[position]
                exit_layer[row] = layer
                exit_path[row] = "head"
                gate_prob[row] = float(probability[position])
            if bool(leave.any()):
                keep = ~leave
                hidden, alive = hidden[keep], alive[keep]
                if alive.numel() == 0:
                    break
        if alive.numel() > 0:
            final = F.normalize(self.backbone.pool_final(hidden).float(), dim=-1)
            logits = class_logits(final, text, self._logit_scale)
            for position, row in enumerate(alive.tolist()):
                logits_out[row] = logits[position]

        results = []
        for row in range(batch):
            row_logits = logits_out[row]
            assert row_logits is not None
            probs = row_logits.float().softmax(dim=-1)
            top = probs.topk(k)
            spent = cost.spent(exit_layer[row], evaluated[row], exit_path[row] == "full")
            results.append(
                ExitResult(
                    predictions=tuple(
                        Prediction(labels[int(i)], float(p))
                        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ),
                    exit_layer=exit_layer[row],
                    num_layers=self.num_layers,
                    exit_path=exit_path[row],
                    gate_probability=gate_prob[row],
                    flops=spent,
                    flops_saved=cost.saved(spent),
                    flops_full=cost.full_depth,
                )
            )
        return results
