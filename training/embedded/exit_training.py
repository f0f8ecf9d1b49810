"""Training the tiny CLIP to exit: auxiliary exit heads at intermediate depths, trained with the CLIP.

LRA-EE's exits only act where an intermediate layer already carries the final answer. A CLIP trained for its last
layer alone keeps what it knows in its deep blocks, so its exits rarely pass the gate's bar. Here the CLIP trains
with an exit head at each of ``layers`` (the engine's own :class:`lraee_core.heads.ExitHead`: pooled tokens ->
LayerNorm -> 2-layer GELU MLP -> unit joint-space embedding), and every head adds two losses to the CLIP's own:

* ``distill``: the KL divergence from the full-depth answer to the exit's, image -> caption over the batch's captions
  (both at CLIP's temperature; the full-depth side detached, so it is the teacher and is not pulled toward the
  exits). This asks an intermediate layer for what the service promises: the same answer as full depth.
* ``contrastive``: the CLIP's own loss (the caller's, e.g. the everyday concept InfoNCE) on the exit's embedding
  against the captions' embeddings, the text side detached (the text tower learns from the full-depth loss only).

The loss of a step is ``full + mean over heads of (distill_weight x distill + contrastive_weight x contrastive)``.
The gradients of the exit losses flow into the blocks below each head: that is what moves the answer earlier.

The heads are trained beside the CLIP (``TrainingRun(auxiliary=...)``) and saved as ``auxiliary.safetensors``; the
LRA-EE build (``lraee-train build``) still trains its own heads on the frozen CLIP, as it does for any user's CLIP.
:func:`probe` measures, per layer, how often such a head's answer equals the full-depth answer on a label set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lraee_core.config import HeadConfig, Pooling
from lraee_core.heads import ExitHead

# A contrastive loss: (image features [B, E] unit, text features [B, E] unit, logit scale, positives [B, B]) -> loss
ContrastiveLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExitTraining:
    """Which exit heads train with the CLIP, and how much each loss weighs."""

    layers: tuple[int, ...]  # 1-based layers (hidden state after that many blocks) that carry a training exit head
    pooling: Pooling = "cls"  # what a head reads: the [CLS] token or the mean of the patch tokens ("ssa")
    distill_weight: float = 1.0  # weight of the KL from the full-depth answer to the exit's, per head (mean)
    contrastive_weight: float = 0.0  # weight of the caller's contrastive loss on the exit's embedding, per head
    # False: the heads read a detached hidden state, so they learn while the CLIP trains as it would without them
    # (the control arm of the ablation: what heads on an unchanged CLIP can do)
    into_backbone: bool = True

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
            raise ValueError(f"exit layers {self.layers} must be distinct, ascending and >= 1")
        if self.distill_weight < 0 or self.contrastive_weight < 0:
            raise ValueError("exit loss weights must be >= 0")

    @classmethod
    def parse(
        cls, layers: str, pooling: str, distill: float, contrastive: float, into_backbone: bool = True
    ) -> ExitTraining | None:
        """From a trainer config's fields: ``layers`` "3,4,6" (empty: no exit training, None)."""
        if not layers.strip():
            return None
        if pooling not in ("cls", "ssa"):
            raise ValueError(f"exit pooling {pooling!r} must be 'cls' or 'ssa'")
        parsed = tuple(int(part) for part in layers.split(",") if part.strip())
        return cls(parsed, pooling, distill, contrastive, into_backbone)  # type: ignore[arg-type]


def exit_heads(model: Any, plan: ExitTraining, seed: int = 0) -> nn.ModuleDict:
    """One fresh :class:`ExitHead` per layer of ``plan``, shaped for ``model``'s vision tower (keys: the layers),
    initialised from ``seed`` without touching the caller's RNG (a run and its resumption start alike)."""
    visual = model.visual
    width, embed_dim = visual.transformer.width, visual.output_dim
    if plan.layers[-1] >= len(visual.transformer.resblocks):
        raise ValueError(
            f"exit layers {plan.layers} must lie below the top block ({len(visual.transformer.resblocks)})"
        )
    config = HeadConfig(pooling=plan.pooling, width=width, hidden_dim=width, embed_dim=embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({str(layer): ExitHead(config) for layer in plan.layers})


def encode_image_with_exits(
    model: Any, heads: nn.ModuleDict, images: torch.Tensor, into_backbone: bool = True
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The full-depth unit image embedding [B, E] (exactly open_clip's ``encode_image``, normalised) and each
    head's unit exit embedding [B, E] at its layer, in one pass over the blocks. Without ``into_backbone`` the heads
    read the hidden state detached: their losses train them and nothing below them."""
    visual = model.visual
    hidden = visual._embeds(images)  # [B, T, D]
    exits: dict[int, torch.Tensor] = {}
    for layer, block in enumerate(visual.transformer.resblocks, start=1):
        hidden = block(hidden)
        if str(layer) in heads:  # (a ModuleDict has no .get)
            head: ExitHead = heads[str(layer)]  # type: ignore[assignment]
            exits[layer] = head(head.pool(hidden if into_backbone else hidden.detach()))
    pooled, _ = visual._pool(hidden)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return F.normalize(pooled, dim=-1), exits


def distillation(
    exit_features: torch.Tensor, final_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """KL(full-depth answer || exit answer), image -> caption over the batch's captions, mean over images; the
    full-depth side and the captions are constants here."""
    text = text_features.detach()
    teacher = F.log_softmax(logit_scale.detach() * final_features.detach() @ text.T, dim=-1)  # [B, B]
    student = F.log_softmax(logit_scale.detach() * exit_features @ text.T, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def exit_loss(
    plan: ExitTraining,
    exits: dict[int, torch.Tensor],
    final_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor,
    contrastive: ContrastiveLoss,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over heads of the weighted exit losses (module docstring), and each part's value for the log."""
    total = final_features.new_zeros(())
    parts: dict[str, float] = {}
    for layer, features in exits.items():
        loss = final_features.new_zeros(())
        if plan.distill_weight > 0:
            kd = distillation(features, final_features, text_features, logit_scale)
            loss = loss + plan.distill_weight * kd
            parts[f"distill_{layer}"] = float(kd.detach())
        if plan.contrastive_weight > 0:
            own = contrastive(features, text_features.detach(), logit_scale.detach(), positives)
            loss = loss + plan.contrastive_weight * own
            parts[f"contrastive_{layer}"] = float(own.detach())
        total = total + loss
    return total / max(1, len(exits)), parts


@torch.inference_mode()
def probe(
    model: Any,
    heads: nn.ModuleDict,
    images: torch.Tensor,  # [N, 3, S, S] preprocessed
    text: torch.Tensor,  # [S_labels, E] unit text embeddings of every label of every set
    label_sets: Sequence[Sequence[int]],  # per image: the rows of ``text`` it is asked against
    truth: Sequence[int],  # per image: the index of the right label within its own set
    batch: int = 256,
) -> dict[str, dict[str, float]]:
    """Per layer with a head, and ``full``: top-1 on the images' own label sets, and (heads) how often the head's
    top-1 equals the full-depth top-1 (what the gate can let leave without breaking a promise)."""
    model.eval()
    heads.eval()
    answers: dict[str, list[int]] = {}
    for start in range(0, len(images), batch):
        final, exits = encode_image_with_exits(model, heads, images[start : start + batch])
        for key, features in [("full", final), *((str(layer), f) for layer, f in exits.items())]:
            scores = features.float() @ text.float().T  # [b, S]
            for row, sets in enumerate(label_sets[start : start + batch]):
                answers.setdefault(key, []).append(int(scores[row, list(sets)].argmax()))
    full = answers["full"]
    report: dict[str, dict[str, float]] = {}
    for key, chosen in answers.items():
        entry = {"top1": sum(c == t for c, t in zip(chosen, truth, strict=True)) / len(truth)}
        if key != "full":
            entry["agreement_with_full"] = sum(c == f for c, f in zip(chosen, full, strict=True)) / len(full)
        report[key] = entry
    return report
