"""Contrastive training of the tiny open_clip CLIP (``lraee-tiny-vit12``) on the generated shape world.

The model is built from the project's JSON architecture through open_clip's own factory, and the result is a
plain open_clip state dict in ``weights.safetensors``, so the service loads it exactly like any pretrained CLIP:
``open_clip.create_model_and_transforms("lraee-tiny-vit12", pretrained=".../weights.safetensors")``.

Runs are resumable: ``state.pt`` in the output directory holds everything a run needs to continue bit for bit
(model, optimizer, step, RNG, log history). Batches are drawn by index from a generator seeded with
``(seed, step)`` and the learning rate is a pure function of the step, so neither needs state of its own.

Run: ``python -m training.clip.world_clip --steps 900 --output-dir runs/world_clip``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from lraee_core.checkpoint import readable_by_all
from training.clip.world import (
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

MODEL_NAME = "lraee-tiny-vit12"
MODEL_CONFIG_PATH = Path(str(files("lraee_core") / "assets" / "model_configs" / f"{MODEL_NAME}.json"))
STATE_FILE = "state.pt"
WEIGHTS_FILE = "weights.safetensors"
LOG_FILE = "training_log.json"
# A resumed run must draw the same data as the run it continues; other fields (steps, intervals, threads) may
# change between sessions.
_RESUME_MUST_MATCH = ("seed", "batch_size", "train_size", "world")
# Zero-shot is reported on these splits: "heldout" measures unseen (colour, shape) pairs, "test" all pairs.
EVAL_SPLITS = ("heldout", "test")
# CLIP's cap on the learned temperature: logit_scale = ln(100).
_MAX_LOGIT_SCALE = math.log(100.0)

PRECISIONS = ("fp32", "bf16")

Tokenizer = Callable[..., torch.Tensor]
Preprocess = Callable[[Image.Image], torch.Tensor]


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


def register_model_config() -> str:
    """Register the tiny architecture's JSON config with open_clip (once) and return its model name."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_PATH)
    return MODEL_NAME


def build_model(
    pretrained: str | Path | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, Preprocess, Tokenizer]:
    """The tiny CLIP, its evaluation preprocessing and its tokenizer.

    With ``pretrained`` None the weights are a random init drawn from ``seed``, without touching the caller's RNG.
    """
    name = register_model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if pretrained is None else str(pretrained), device=device, output_dict=True
        )
    return model, preprocess, open_clip.get_tokenizer(name)


def learning_rate(step: int, cfg: WorldClipConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def save_weights(model: torch.nn.Module, path: str | Path, half: bool = False) -> Path:
    """Write ``model``'s state dict as safetensors (FP16 when ``half``), loadable as open_clip ``pretrained``."""
    dtype = torch.float16 if half else torch.float32
    tensors = {
        name: tensor.detach()
        .to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        # safetensors refuses views into shared storage
        .contiguous()
        .clone()
        for name, tensor in model.state_dict().items()
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "pt", "model_name": MODEL_NAME})
    readable_by_all(path)
    return path


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
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model, preprocess, tokenizer = build_model(seed=cfg.seed, device=device)
    optimizer = _optimizer(model, cfg)

    step, train_seconds = 0, 0.0
    history: list[dict[str, Any]] = []
    state_path = output_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resumable(json.loads(state["config"]), cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, history, train_seconds = state["step"], json.loads(state["history"]), state["train_seconds"]
    else:
        torch.manual_seed(cfg.seed)

    dataset = WorldDataset("train", cfg.train_size, cfg.world, preprocess, tokenizer)
    loader = DataLoader(dataset, batch_sampler=_StepBatches(cfg, step), num_workers=cfg.num_workers)
    loss_fn = open_clip.ClipLoss()
    model.train()
    window_losses: list[float] = []
    window_data_seconds = 0.0  # time spent waiting for batches since the last history entry
    session_start = window_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="world-clip", disable=not cfg.progress, dynamic_ncols=True)
    batch_requested = time.perf_counter()
    for images, texts in loader:
        window_data_seconds += time.perf_counter() - batch_requested
        lr = learning_rate(step, cfg)
        window_losses.append(_train_step(model, optimizer, loss_fn, images.to(device), texts.to(device), lr, cfg))
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            entry = history_entry(step, window_losses, lr, model, train_seconds + now - session_start)
            # share of the wall time spent generating data: the figure that says whether to add workers
            entry["data_fraction"] = round(window_data_seconds / max(1e-9, now - window_start), 3)
            history.append(entry)
            bar.set_postfix(
                loss=f"{history[-1]['loss']:.3f}", lr=f"{lr:.2e}", scale=f"{history[-1]['logit_scale']:.1f}"
            )
            window_losses, window_data_seconds, window_start = [], 0.0, now
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_state(
                state_path, model, optimizer, cfg, step, history, train_seconds + time.perf_counter() - session_start
            )
        batch_requested = time.perf_counter()
    bar.close()
    train_seconds += time.perf_counter() - session_start

    model.eval()
    weights_path = save_weights(model, output_dir / WEIGHTS_FILE, half=cfg.half)
    zero_shot = evaluate_zero_shot(model, tokenizer, preprocess, cfg.eval_images, cfg.world) if cfg.eval_images else {}
    log = {
        "model_name": MODEL_NAME,
        "config": asdict(cfg),
        "steps": step,
        "final_loss": history[-1]["loss"] if history else None,
        "wall_time_s": round(train_seconds, 3),
        "steps_per_s": round(step / train_seconds, 4) if train_seconds > 0 else None,
        "weights": WEIGHTS_FILE,
        "weights_dtype": "float16" if cfg.half else "float32",
        "zero_shot": zero_shot,  # FP32, held-out prompt wordings, {split: {label_set: accuracy}}
        "zero_shot_chance": {label_set: 1.0 / len(label_names(label_set)) for label_set in LABEL_SETS},
        "zero_shot_images": cfg.eval_images,
        "zero_shot_templates": list(HELD_OUT_TEMPLATES),
        "held_out_combos": sorted(map(list, HELD_OUT_COMBOS)),
        "history": history,
    }
    (output_dir / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
    return weights_path


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One ``--flag`` per scalar field of the dataclass instance ``defaults`` (bools as --x / --no-x)."""
    for config_field in dataclasses.fields(defaults):
        default = getattr(defaults, config_field.name)
        flag = "--" + config_field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, int | float | str):
            parser.add_argument(flag, type=type(default), default=default)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: every scalar WorldClipConfig field is a flag (``--steps 900 --output-dir runs/x``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = WorldClipConfig()
    add_config_flags(parser, defaults)
    parser.add_argument("--world-seed", type=int, default=defaults.world.seed)
    args = vars(parser.parse_args(argv))
    world = dataclasses.replace(defaults.world, seed=args.pop("world_seed"))
    print(train_world_clip(WorldClipConfig(**args, world=world)))


def _train_step(
    model: open_clip.CLIP,
    optimizer: torch.optim.Optimizer,
    loss_fn: open_clip.ClipLoss,
    images: torch.Tensor,  # [B, 3, H, W]
    texts: torch.Tensor,  # [B, context_length]
    lr: float,
    cfg: WorldClipConfig,
) -> float:
    """One optimizer step on one batch; returns the batch's contrastive loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        output = model(images, texts)
    # The loss in FP32: bf16 logits would round the softmax over the batch.
    loss = loss_fn(output["image_features"].float(), output["text_features"].float(), output["logit_scale"].float())
    return optimize(model, optimizer, loss, cfg.grad_clip_norm)


def history_entry(
    step: int, losses: Sequence[float], lr: float, model: open_clip.CLIP, elapsed_s: float
) -> dict[str, Any]:
    """One training-log entry: the mean loss over the steps since the last entry, the learning rate, CLIP's
    temperature and the training time so far."""
    return {
        "step": step,
        "loss": float(np.mean(losses)),
        "lr": lr,
        "logit_scale": model.logit_scale.detach().exp().item(),
        "elapsed_s": round(elapsed_s, 3),
    }


def optimize(
    model: open_clip.CLIP, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip_norm: float | None
) -> float:
    """Backward, optional global-norm clip, step, and CLIP's cap on the temperature; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, _MAX_LOGIT_SCALE)
    return float(loss.item())


def _optimizer(model: torch.nn.Module, cfg: WorldClipConfig) -> torch.optim.AdamW:
    # open_clip's rule: decay only matrices; 1-d gains/biases, embeddings and the temperature are left alone.
    def exempt(name: str, parameter: torch.nn.Parameter) -> bool:
        return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in named if exempt(name, p)], "weight_decay": 0.0},
        {"params": [p for name, p in named if not exempt(name, p)], "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate(0, cfg), betas=(0.9, cfg.beta2), eps=1e-6)


def _check_resumable(saved: dict[str, Any], cfg: WorldClipConfig) -> None:
    current = asdict(cfg)
    changed = [name for name in _RESUME_MUST_MATCH if saved.get(name) != current[name]]
    if changed:
        raise ValueError(
            f"{cfg.output_dir}/{STATE_FILE} was written with different {', '.join(changed)}; "
            "resuming would mix two data streams. Use a new output_dir or restore the old values."
        )


def _save_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: WorldClipConfig,
    step: int,
    history: list[dict[str, Any]],
    train_seconds: float,
) -> None:
    # Config and history travel as JSON strings so the file loads with weights_only=True.
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "train_seconds": train_seconds,
        "config": json.dumps(asdict(cfg)),
        "history": json.dumps(history),
    }
    # Write then rename, so an interrupted save never leaves a truncated state behind.
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
