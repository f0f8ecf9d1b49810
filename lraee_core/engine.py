"""EarlyExitClassifier: a batch of preprocessed images + a label set in, one result per image out.

The vision blocks run once over the rows still alive. At each candidate layer the exit head and gate are evaluated
for those rows only; rows the exit rule (:mod:`lraee_core.exits`: an operating point's thresholds, ``full``, or a
forced benchmark mix) lets go leave the batch with their logits (batch compaction: the remaining blocks run on a
smaller batch, so FLOPs saved are time saved). Rows that reach the end take the ordinary full-depth CLIP path
([CLS] pooling + projection). Build one with :func:`lraee_core.checkpoint.load_classifier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .backbone import ClipBackbone
from .config import FULL_OPERATING_POINT, ExitPolicy, HeadConfig
from .errors import InputError
from .exits import ExitRule
from .flops import FlopsModel, flops_model
from .gate import GateParams, gate_features, spatial_activation_variance
from .heads import ExitHead, class_logits
from .manifest import Manifest
from .quantize import QuantReport
from .text import DEFAULT_TEMPLATES, TextEmbeddingCache, validate_labels, validate_templates

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

    def exit_rule(self, operating_point: str | None = None) -> ExitRule:
        """The rule of a named operating point (the default when None; ``full`` on every checkpoint);
        :class:`InputError` naming the known ones if unknown."""
        name = operating_point or self.policy.default_operating_point
        if name == FULL_OPERATING_POINT:
            return ExitRule.full()
        try:
            return ExitRule.from_thresholds(self.policy.thresholds(name), name)
        except KeyError:
            raise InputError(f"unknown operating point {name!r}; this model has {list(self.policy.names)}") from None

    @torch.inference_mode()
    def classify(
        self,
        images: torch.Tensor,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        operating_point: str | None = None,
        exit_rule: ExitRule | None = None,
    ) -> list[ExitResult]:
        """Classify preprocessed images [B, 3, H, W] against ``labels``.

        ``exit_rule`` (see :mod:`lraee_core.exits`) replaces the named ``operating_point``'s rule: custom
        thresholds, ``ExitRule.full()``, or a forced per-image exit mix for benchmarks.
        """
        if images.dim() != 4 or images.shape[0] == 0:
            raise InputError(f"expected a non-empty image batch [B, 3, H, W], got shape {tuple(images.shape)}")
        rule = exit_rule if exit_rule is not None else self.exit_rule(operating_point)
        try:
            rule.check(images.shape[0], self.policy.candidate_layers)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        labels = validate_labels(labels, self.max_labels)
        text = self.text_embeddings(labels, templates)  # [K, E] FP16
        cost = self.flops(len(labels))
        batch = images.shape[0]
        k = max(1, min(top_k, len(labels)))
        logits_out: list[torch.Tensor | None] = [None] * batch
        exit_layer = [self.num_layers] * batch
        exit_path: list[ExitPath] = ["full"] * batch
        gate_prob: list[float | None] = [None] * batch
        evaluated = [0] * batch
        heads = self.heads if rule.evaluate_heads else {}

        alive = torch.arange(batch)  # original row of each row still in the batch
        previous_top1: torch.Tensor | None = None  # previous candidate's answer per alive row (a gate feature)
        hidden = self.backbone.embed(images)  # [B, T, D]
        for layer in range(1, self.num_layers + 1):
            hidden = self.backbone.block(layer, hidden)
            if layer not in heads:
                continue
            head, gate = heads[layer], self.gates[layer]
            logits = class_logits(head(head.pool(hidden)), text, self._logit_scale)  # [b, K]
            sav = spatial_activation_variance(hidden) if "sav" in gate.features else None
            features = gate_features(gate.features, logits, self._logit_scale, sav, previous_top1)
            probability = gate.probability(features)  # [b]
            leave = rule.leave(layer, alive, probability)
            for row in alive.tolist():
                evaluated[row] += 1
            for position in leave.nonzero().flatten().tolist():
                row = int(alive[position])
                logits_out[row] = logits[position]
                exit_layer[row] = layer
                exit_path[row] = "head"
                gate_prob[row] = float(probability[position])
            previous_top1 = logits.argmax(dim=-1)
            if bool(leave.any()):
                keep = ~leave
                hidden, alive, previous_top1 = hidden[keep], alive[keep], previous_top1[keep]
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
