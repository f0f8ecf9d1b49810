"""Step ``train-heads``: an exit head per cached layer, trained on cached features of the head split.

Three head sets are trained, because the evaluation compares them:

* ``ssa-distilled``: SSA pooling, cross-entropy + lambda x (1 - cos(head embedding, FP32 final embedding)): LRA-EE;
* ``ssa-hard``: SSA pooling, cross-entropy only: the ablation's "hard" rows;
* ``cls-distilled``: [CLS] pooling with the LRA-EE loss: the CLS-EE baseline.

Logits are ``logit_scale x cosine`` against the label set's prompt-ensembled text embeddings (the engine's own
:func:`lraee_core.heads.class_logits`), so a head is trained on exactly the scores it is later judged by.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lraee_core.config import HeadConfig, Loss, Pooling
from lraee_core.heads import ExitHead, class_logits

from .config import HeadTrainConfig, Job, config_hash, read_json, step, write_json, write_record
from .features import FeatureStore, run_extract

HEADS_FILE = "heads.json"


@dataclass(frozen=True)
class Variant:
    """How one head set pools and is supervised."""

    pooling: Pooling  # "ssa" or "cls"
    loss: Loss  # "distilled" or "hard"


# LRA-EE, its hard-label ablation, and the CLS-EE baseline.
VARIANTS: dict[str, Variant] = {
    "ssa-distilled": Variant("ssa", "distilled"),
    "ssa-hard": Variant("ssa", "hard"),
    "cls-distilled": Variant("cls", "distilled"),
}


def head_config(store: FeatureStore, pooling: Pooling, train: HeadTrainConfig) -> HeadConfig:
    """Head shape for this backbone (hidden width defaults to the token width)."""
    shape = store.shape
    return HeadConfig(
        pooling=pooling, width=shape.width, hidden_dim=train.hidden_dim or shape.width, embed_dim=shape.embed_dim
    )


def head_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    loss: Loss,
    targets: torch.Tensor | None,
    distill_weight: float,
) -> torch.Tensor:
    """Cross-entropy on zero-shot logits, plus ``distill_weight`` x mean(1 - cos) to ``targets`` when distilled."""
    value = F.cross_entropy(class_logits(embeddings, text, logit_scale), labels)
    if loss == "distilled":
        if targets is None:
            raise ValueError("distilled heads need FP32 target embeddings")
        value = value + distill_weight * (1.0 - F.cosine_similarity(embeddings, targets, dim=-1)).mean()
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
            value = head_loss(
                head(inputs[batch]),
                labels[batch],
                text,
                logit_scale,
                loss,
                None if targets is None else targets[batch],
                train.distill_weight,
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
    split = store.load("head", ["labels", "fp32_final"])
    labels, targets = split["labels"], split["fp32_final"]
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
                inputs, labels, targets, text, store.logit_scale, config, variant.loss, train, train.seed + layer
            )
            accuracy = float((head_logits(head, inputs, text, store.logit_scale).argmax(-1) == labels).float().mean())
            per_layer[str(layer)] = {"loss_per_epoch": history, "head_split_accuracy": accuracy}
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
