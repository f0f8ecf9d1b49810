"""Step ``train-heads``: an exit head per cached layer, trained on cached features of the head split.

Four head sets are trained, because the evaluation compares them:

* ``ssa-embed`` (shipped): SSA pooling, label-free: the head reproduces the served model's full-depth image
  embedding (INT8 when the tower is quantized), ``cosine_weight x (1 - cos) + mse_weight x MSE``. No label list is
  involved, so the exit answers any label set the way full depth would;
* ``ssa-distilled``: the paper's loss, cross-entropy + lambda x (1 - cos(head, FP32 final embedding));
* ``ssa-hard``: cross-entropy only, the ablation's "hard" rows;
* ``cls-embed``: [CLS] pooling with the shipped loss: the CLS-EE baseline.

Cross-entropy is computed over a label subset drawn per batch: the batch's classes plus random other classes up to
a K drawn log-uniform over 2..N, so the paper's heads are not trained as one closed-set classifier. Logits are
``logit_scale x cosine`` against prompt-ensembled text embeddings (the engine's
:func:`lraee_core.heads.class_logits`), so a head is trained on exactly the scores it is later judged by.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lraee_core.config import HeadConfig, Loss, Pooling
from lraee_core.heads import ExitHead, class_logits

from .config import HeadTrainConfig
from .features import FeatureStore, run_extract
from .jobs import Job, config_hash, read_json, step, write_json, write_record

HEADS_FILE = "heads.json"


@dataclass(frozen=True)
class Variant:
    """How one head set pools and is supervised."""

    pooling: Pooling  # "ssa" or "cls"
    loss: Loss  # "embed" (label-free), "distilled" (CE + cosine) or "hard" (CE)


# LRA-EE, its hard-label ablation, and the CLS-EE baseline.
VARIANTS: dict[str, Variant] = {
    "ssa-embed": Variant("ssa", "embed"),
    "ssa-distilled": Variant("ssa", "distilled"),
    "ssa-hard": Variant("ssa", "hard"),
    "cls-embed": Variant("cls", "embed"),
}
SHIPPED_VARIANT = "ssa-embed"


def head_config(store: FeatureStore, pooling: Pooling, train: HeadTrainConfig) -> HeadConfig:
    """Head shape for this backbone (hidden width defaults to the token width)."""
    shape = store.shape
    return HeadConfig(
        pooling=pooling, width=shape.width, hidden_dim=train.hidden_dim or shape.width, embed_dim=shape.embed_dim
    )


def label_subset(
    labels: torch.Tensor, num_labels: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(subset of label indices [K], batch targets remapped into it [B]): the batch's classes plus random others,
    K log-uniform over max(2, classes in the batch)..N."""
    present = labels.unique()
    low = min(max(2, len(present)), num_labels)
    draw = float(torch.rand(1, generator=generator))
    k = min(num_labels, int(math.exp(math.log(low) + draw * (math.log(num_labels + 1) - math.log(low)))))
    k = max(k, low)
    mask = torch.ones(num_labels, dtype=torch.bool)
    mask[present] = False
    others = torch.nonzero(mask).flatten()
    others = others[torch.randperm(len(others), generator=generator)[: k - len(present)]]
    subset = torch.cat([present, others])
    position = torch.full((num_labels,), -1, dtype=torch.long)
    position[subset] = torch.arange(len(subset))
    return subset, position[labels]


def head_loss(
    embeddings: torch.Tensor,
    loss: Loss,
    train: HeadTrainConfig,
    *,
    target: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """One batch's loss. ``embed``: cosine (+ MSE) to ``target``, the full-depth embedding; ``distilled``:
    cross-entropy over ``text`` (the batch's label subset) + ``distill_weight`` x (1 - cos) to ``target``;
    ``hard``: cross-entropy only."""
    if loss == "embed":
        if target is None:
            raise ValueError("label-free heads need the full-depth target embeddings")
        value = train.cosine_weight * (1.0 - F.cosine_similarity(embeddings, target, dim=-1)).mean()
        if train.mse_weight:
            value = value + train.mse_weight * F.mse_loss(embeddings, target)
        return value
    if labels is None or text is None:
        raise ValueError(f"{loss} heads need labels and text embeddings")
    value = F.cross_entropy(class_logits(embeddings, text, logit_scale), labels)
    if loss == "distilled":
        if target is None:
            raise ValueError("distilled heads need FP32 target embeddings")
        value = value + train.distill_weight * (1.0 - F.cosine_similarity(embeddings, target, dim=-1)).mean()
    return value


def train_head(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None,
    text: torch.Tensor,
    logit_scale: float,
    config: HeadConfig,
    loss: Loss,
    train: HeadTrainConfig,
    seed: int,
) -> tuple[ExitHead, list[float]]:
    """Train one head with Adam on pooled features [N, D]; returns the head (eval mode) and the mean loss per epoch."""
    torch.manual_seed(seed)
    head = ExitHead(config)
    optimizer = torch.optim.Adam(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    head.train()
    for _ in range(train.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), train.batch_size):
            batch = order[start : start + train.batch_size]
            target = None if targets is None else targets[batch]
            if loss == "embed":
                value = head_loss(head(inputs[batch]), loss, train, target=target)
            else:
                subset, remapped = label_subset(labels[batch], len(text), generator)
                value = head_loss(
                    head(inputs[batch]),
                    loss,
                    train,
                    target=target,
                    labels=remapped,
                    text=text[subset],
                    logit_scale=logit_scale,
                )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += float(value.detach()) * len(batch)
            seen += len(batch)
        history.append(total / max(1, seen))
    return head.eval(), history


@torch.inference_mode()
def head_logits(
    head: ExitHead, inputs: torch.Tensor, text: torch.Tensor, logit_scale: float, batch_size: int = 4096
) -> torch.Tensor:
    """Zero-shot logits [N, K] of a head on pooled features [N, D], as the engine computes them."""
    chunks = [
        class_logits(head(inputs[start : start + batch_size]), text, logit_scale)
        for start in range(0, len(inputs), batch_size)
    ]
    return torch.cat(chunks)


def heads_hash(job: Job, extract_hash: str) -> str:
    """Identity of the trained heads."""
    return config_hash("train-heads", extract_hash, job.config.heads)


@step("train-heads")
def run_train_heads(job: Job) -> str:
    """Step ``train-heads``: write ``<variant>.safetensors`` and ``heads.json``; returns the step hash."""
    wanted = heads_hash(job, run_extract(job))
    directory = job.step_dir("train-heads")
    if job.should_skip("train-heads", wanted):
        return wanted
    train = job.config.heads
    store = FeatureStore(job.step_dir("extract"))
    text = store.text_embeddings()
    split = store.load("head", ["labels", "fp32_final", "int8_final"])
    labels = split["labels"]
    # Label-free heads copy the served model's answer (the INT8 tower's own final embedding); the paper's
    # distilled heads copy the FP32 one.
    target_of = {"embed": split["int8_final"], "distilled": split["fp32_final"], "hard": None}
    report: dict[str, Any] = {"head_images": len(labels), "variants": {}}
    progress = tqdm(total=len(VARIANTS) * len(store.layers), desc="train heads", unit="head", leave=False)
    for name, variant in VARIANTS.items():
        config = head_config(store, variant.pooling, train)
        tensors: dict[str, torch.Tensor] = {}
        per_layer: dict[str, Any] = {}
        for layer in store.layers:
            inputs = store.load("head", [f"{variant.pooling}.{layer}"])[f"{variant.pooling}.{layer}"]
            # Seeded per layer so a head does not depend on which other layers were trained before it.
            head, history = train_head(
                inputs,
                labels,
                target_of[variant.loss],
                text,
                store.logit_scale,
                config,
                variant.loss,
                train,
                train.seed + layer,
            )
            with torch.inference_mode():
                cosine = F.cosine_similarity(head(inputs), split["int8_final"], dim=-1).mean()
            accuracy = float((head_logits(head, inputs, text, store.logit_scale).argmax(-1) == labels).float().mean())
            per_layer[str(layer)] = {
                "loss_per_epoch": history,
                "head_split_accuracy": accuracy,
                "head_split_cosine_to_full_depth": float(cosine),
            }
            tensors.update({f"{layer}.{key}": value.detach().contiguous() for key, value in head.state_dict().items()})
            progress.update()
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / f"{name}.safetensors"))
        report["variants"][name] = {"head": asdict(config), "loss": variant.loss, "layers": per_layer}
    progress.close()
    write_json(directory / HEADS_FILE, report)
    write_record(directory, "train-heads", wanted, {"variants": list(VARIANTS), "layers": list(store.layers)})
    return wanted


def load_heads(directory: Path, variant: str) -> tuple[HeadConfig, dict[int, ExitHead]]:
    """The trained heads of one variant, by layer (eval mode)."""
    info = read_json(directory / HEADS_FILE)["variants"][variant]
    config = HeadConfig(**info["head"])
    tensors = load_file(str(directory / f"{variant}.safetensors"))
    heads = {}
    for layer in (int(key) for key in info["layers"]):
        head = ExitHead(config)
        prefix = f"{layer}."
        head.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        heads[layer] = head.eval()
    return config, heads
