"""Contrastive training of the tiny open_clip CLIP (``lraee-tiny-vit12``) on the generated shape world.

The loop, the optimizer, resumable state and the weights file are the shared ones of ``training.embedded.trainer``; what
is the world's own is its config, its batches (scene indices drawn from a generator seeded with ``(seed, step)``,
generated on the fly, optionally by DataLoader workers), CLIP's loss (optionally under bf16 autocast) and the final
zero-shot evaluation on held-out (colour, shape) pairs with wordings training never saw.

Run: ``python -m training.embedded.world_clip --steps 900 --output-dir runs/world_clip``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch.utils.data import DataLoader, Sampler

from training.embedded.trainer import Preprocess, Tokenizer, TrainingRun, config_parser
from training.embedded.world import (
    HELD_OUT_COMBOS,
    HELD_OUT_TEMPLATES,
    LABEL_SETS,
    WorldDataset,
    WorldSpec,
    class_phrases,
    fill_template,
    generate_labelled,
    label_names,
)

# A resumed run must draw the same data as the run it continues; other fields (steps, intervals, threads) may
# change between sessions.
_RESUME_MUST_MATCH = ("seed", "batch_size", "train_size", "world")
# Zero-shot is reported on these splits: "heldout" measures unseen (colour, shape) pairs, "test" all pairs.
EVAL_SPLITS = ("heldout", "test")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class WorldClipConfig:
    """One contrastive training run of the tiny CLIP on the shape world."""

    output_dir: str = "runs/world_clip"  # holds state.pt, weights.safetensors and training_log.json
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 128  # image-caption pairs per step; every other pair in the batch is a negative
    lr: float = 1e-3  # peak learning rate, reached after warmup, then cosine decay to min_lr
    min_lr: float = 0.0  # learning rate at the last step
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decay of matrices only: gains, biases, embeddings and logit_scale are
    # exempt, as in open_clip's training
    beta2: float = 0.98  # AdamW second-moment decay; CLIP's 0.98 is steadier than 0.999 with a learned temperature
    grad_clip_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    seed: int = 0  # model init and batch draws; the world's own seed is world.seed
    train_size: int = 10_000_000  # number of distinct training scenes indices are drawn from; scenes are
    # generated on the fly, so this costs nothing
    world: WorldSpec = field(default_factory=WorldSpec)  # the generated world
    num_workers: int = 0  # DataLoader worker processes; 0 generates in the training process
    threads: int = 2  # torch.set_num_threads for the training process
    device: str = "cpu"  # torch device, e.g. "cpu" or "cuda"
    precision: str = "fp32"  # "fp32", or "bf16": autocast forward (weights and optimizer stay FP32)
    log_every: int = 10  # steps between entries of the log history (and tqdm loss updates)
    checkpoint_every: int = 100  # steps between writes of state.pt; it is also written at the last step
    eval_images: int = 512  # single-object images per split and label set in the final zero-shot evaluation;
    # 0 skips it
    half: bool = False  # store weights.safetensors in FP16 (half the size); training and evaluation stay FP32
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2: a contrastive batch needs negatives")
        if self.steps < 1 or self.warmup_steps < 0 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, log_every and checkpoint_every must be positive, warmup_steps non-negative")


def batch_indices(step: int, cfg: WorldClipConfig) -> list[int]:
    """Scene indices of the batch of step ``step``: a pure function of (seed, step), so resuming needs no state."""
    rng = np.random.default_rng([cfg.seed, step])
    return rng.integers(0, cfg.train_size, size=cfg.batch_size).tolist()


class _StepBatches(Sampler[list[int]]):
    """Batches of steps ``start .. cfg.steps - 1``."""

    def __init__(self, cfg: WorldClipConfig, start: int) -> None:
        self.cfg = cfg
        self.start = start

    def __len__(self) -> int:
        return max(0, self.cfg.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.cfg.steps):
            yield batch_indices(step, self.cfg)


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    label_set: str,
    split: str,
    n: int,
    templates: Sequence[str] = HELD_OUT_TEMPLATES,
    spec: WorldSpec | None = None,
    batch_size: int = 256,
) -> float:
    """Top-1 zero-shot accuracy on the first ``n`` single-object scenes of ``split`` for one label set.

    Each class's text embedding is the renormalised mean of its normalised prompt embeddings over ``templates``
    (world templates with ``{what}``; by default the wordings training never saw). The model's train/eval mode
    is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        prompts = [partial(fill_template, template) for template in templates]
        classifier = build_zero_shot_classifier(
            model, tokenizer, class_phrases(label_set), prompts, num_classes_per_batch=None, device=device
        )  # [D, C]
        correct = 0
        for start in range(0, n, batch_size):
            samples = [generate_labelled(i, split, label_set, spec) for i in range(start, min(n, start + batch_size))]
            images = torch.stack([preprocess(sample.image) for sample in samples]).to(device)  # [B, 3, H, W]
            features = model.encode_image(images, normalize=True)  # [B, D]
            predictions = (features @ classifier).argmax(dim=1).cpu()  # [B]
            correct += int((predictions == torch.tensor([sample.label for sample in samples])).sum())
        return correct / n
    finally:
        model.train(was_training)


def evaluate_zero_shot(
    model: open_clip.CLIP, tokenizer: Tokenizer, preprocess: Preprocess, n: int, spec: WorldSpec | None = None
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy with held-out wordings, ``{split: {label_set: accuracy}}`` for EVAL_SPLITS."""
    return {
        split: {
            label_set: zero_shot_accuracy(model, tokenizer, preprocess, label_set, split, n, spec=spec)
            for label_set in LABEL_SETS
        }
        for split in EVAL_SPLITS
    }


def train_world_clip(cfg: WorldClipConfig) -> Path:
    """Train (or resume training) the tiny CLIP on the world; returns the path of ``weights.safetensors``.

    Writes ``state.pt`` every ``checkpoint_every`` steps and at the end, then ``weights.safetensors`` and
    ``training_log.json`` (config, loss, wall time, FP32 zero-shot accuracy on held-out and test scenes).
    Re-running a finished run only rewrites the weights and the log.
    """
    run = TrainingRun(cfg, must_match=_RESUME_MUST_MATCH)
    model, preprocess, tokenizer = run.model, run.preprocess, run.tokenizer
    dataset = WorldDataset("train", cfg.train_size, cfg.world, preprocess, tokenizer)
    loader = DataLoader(dataset, batch_sampler=_StepBatches(cfg, run.step), num_workers=cfg.num_workers)
    loss_fn = open_clip.ClipLoss()

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, texts = batch[0].to(run.device), batch[1].to(run.device)  # [B, 3, H, W], [B, context_length]
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            output = model(images, texts)
        # The loss in FP32: bf16 logits would round the softmax over the batch.
        return loss_fn(output["image_features"].float(), output["text_features"].float(), output["logit_scale"].float())

    run.train(loader, batch_loss, cfg.steps, desc="world-clip")
    return run.finish(
        lambda: {
            # FP32, held-out prompt wordings, {split: {label_set: accuracy}}
            "zero_shot": evaluate_zero_shot(model, tokenizer, preprocess, cfg.eval_images, cfg.world)
            if cfg.eval_images
            else {},
            "zero_shot_chance": {label_set: 1.0 / len(label_names(label_set)) for label_set in LABEL_SETS},
            "zero_shot_images": cfg.eval_images,
            "zero_shot_templates": list(HELD_OUT_TEMPLATES),
            "held_out_combos": sorted(map(list, HELD_OUT_COMBOS)),
        }
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: every scalar WorldClipConfig field is a flag (``--steps 900 --output-dir runs/x``)."""
    defaults = WorldClipConfig()
    parser = config_parser(__doc__, defaults)
    parser.add_argument("--world-seed", type=int, default=defaults.world.seed)
    args = vars(parser.parse_args(argv))
    world = dataclasses.replace(defaults.world, seed=args.pop("world_seed"))
    print(train_world_clip(WorldClipConfig(**args, world=world)))


if __name__ == "__main__":
    main()
