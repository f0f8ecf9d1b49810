"""The one training loop of the tiny-CLIP trainers (shape world, photos, everyday mixture).

A trainer keeps only what is its own: its config (a frozen dataclass carrying the fields of :class:`TrainerConfig`),
its data and its loss. It opens a :class:`TrainingRun` (the model built from the project's JSON architecture through
open_clip's own factory, AdamW with open_clip's decay rule, ``state.pt`` resumed when present), prepares its data,
hands :meth:`TrainingRun.train` one batch per step and a function from a batch to its loss, and ends with
:meth:`TrainingRun.finish`, which writes ``weights.safetensors`` (a plain open_clip state dict, loadable as
``pretrained``) and ``training_log.json``.

Runs are resumable: ``state.pt`` holds everything a run needs to continue bit for bit (model, optimizer, step, torch
RNG, log history), written atomically every ``checkpoint_every`` steps and at the last one. Each trainer draws its
batch as a pure function of (seed, step) and the learning rate is a pure function of the step, so neither needs state
of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Any, ClassVar, Protocol, TypeVar, cast

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lraee_core.backbone import create_model
from lraee_core.checkpoint import readable_by_all
from lraee_core.config import BackboneConfig

MODEL_NAME = "lraee-tiny-vit12"
MODEL_CONFIG_PATH = Path(str(files("lraee_core") / "assets" / "model_configs" / f"{MODEL_NAME}.json"))
STATE_FILE = "state.pt"
WEIGHTS_FILE = "weights.safetensors"
LOG_FILE = "training_log.json"
AUXILIARY_FILE = "auxiliary.safetensors"  # modules trained beside the CLIP, not part of it (exit heads)
# CLIP's cap on the learned temperature: logit_scale = ln(100).
_MAX_LOGIT_SCALE = math.log(100.0)

Tokenizer = Callable[..., torch.Tensor]
Preprocess = Callable[[Image.Image], torch.Tensor]
Batch = TypeVar("Batch")
Item = TypeVar("Item")


class TrainerConfig(Protocol):
    """The fields every trainer's config carries (read-only, as in a frozen dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # every trainer's config is a dataclass (asdict, replace)

    @property
    def output_dir(self) -> str: ...  # holds state.pt, weights.safetensors and training_log.json
    @property
    def steps(self) -> int: ...  # optimizer steps the learning-rate schedule spans
    @property
    def lr(self) -> float: ...  # peak learning rate, reached after warmup, then cosine decay to min_lr
    @property
    def min_lr(self) -> float: ...  # learning rate at the last step
    @property
    def warmup_steps(self) -> int: ...  # linear warmup from lr / warmup_steps to lr
    @property
    def weight_decay(self) -> float: ...  # AdamW decay of matrices only
    @property
    def beta2(self) -> float: ...  # AdamW second-moment decay
    @property
    def grad_clip_norm(self) -> float | None: ...  # global gradient-norm clip; None: none
    @property
    def seed(self) -> int: ...  # model init and the run's draws
    @property
    def threads(self) -> int: ...  # torch.set_num_threads
    @property
    def device(self) -> str: ...  # torch device
    @property
    def log_every(self) -> int: ...  # steps between entries of the log history
    @property
    def checkpoint_every(self) -> int: ...  # steps between writes of state.pt (and at the last step)
    @property
    def half(self) -> bool: ...  # store weights.safetensors in FP16
    @property
    def progress(self) -> bool: ...  # show a tqdm progress bar


def register_model_config() -> str:
    """Register the tiny architecture's JSON config with open_clip (once) and return its model name."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_PATH)
    return MODEL_NAME


def build_model(
    pretrained: str | Path | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, Preprocess, Tokenizer]:
    """The tiny CLIP, its evaluation preprocessing and its tokenizer, from the library's one factory
    (:func:`lraee_core.backbone.create_model`, which also serves the engine's backbones).

    With ``pretrained`` None the weights are a random init drawn from ``seed``, without touching the caller's RNG.
    """
    config = BackboneConfig(
        MODEL_NAME,
        pretrained=None if pretrained is None else str(pretrained),
        model_config_file=str(MODEL_CONFIG_PATH),
        random_init_seed=seed,
    )
    with torch.random.fork_rng(devices=[]):
        model, preprocess, tokenizer, _ = create_model(config, device=device, output_dict=True)
    return cast(open_clip.CLIP, model), preprocess, tokenizer


def image_size(model: open_clip.CLIP) -> int:
    """Side of the square images the vision tower takes."""
    size = model.visual.image_size
    return size[0] if isinstance(size, tuple) else int(size)


def learning_rate(step: int, cfg: TrainerConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with open_clip's rule: decay only matrices; 1-d gains/biases, embeddings and the temperature are left
    alone. CLIP's beta2 of 0.98 is steadier than 0.999 with a learned temperature. ``model`` may hold more than the
    CLIP (its auxiliary exit heads, :class:`TrainingRun`): every trainable parameter in it is optimised."""

    def exempt(name: str, parameter: torch.nn.Parameter) -> bool:
        return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in named if exempt(name, p)], "weight_decay": 0.0},
        {"params": [p for name, p in named if not exempt(name, p)], "weight_decay": cfg.weight_decay},
    ]
    # On CUDA the fused kernel: one launch per step instead of several per parameter, the same update.
    fused = True if next(model.parameters()).device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=learning_rate(0, cfg), betas=(0.9, cfg.beta2), eps=1e-6, fused=fused)


class CachedTokenizer:
    """A tokenizer that keeps the token rows of the texts it has seen: training captions repeat (templates × class
    names), and tokenizing a batch of them in Python costs more than a GPU step. Returns what the tokenizer would."""

    def __init__(self, tokenizer: Tokenizer, capacity: int = 1_000_000) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity  # texts remembered at most; later new texts are tokenized every time
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [text for text in dict.fromkeys(texts) if text not in self.rows]
        fresh = dict(zip(missing, self.tokenizer(missing), strict=True)) if missing else {}
        for text, row in fresh.items():
            if len(self.rows) < self.capacity:
                self.rows[text] = row
        return torch.stack([self.rows[text] if text in self.rows else fresh[text] for text in texts])


def prefetched(items: Iterable[Item], depth: int) -> Generator[Item, None, None]:
    """``items`` produced ``depth`` ahead in a background thread (``depth`` 0: in the caller's thread), in order;
    an error in the producer is raised in the consumer. Closing the iterator stops the producer."""
    if depth <= 0:
        yield from items
        return
    queue: Queue[tuple[str, Any]] = Queue(depth)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                queue.put(message, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as error:  # handed to the consumer, which raises it
            put(("error", error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = queue.get(timeout=1.0)
            except Empty:
                if not thread.is_alive():
                    raise RuntimeError("the prefetch thread ended without a word") from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def optimize(
    model: open_clip.CLIP,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    grad_clip_norm: float | None,
    trained: torch.nn.Module | None = None,
) -> float:
    """Backward, optional global-norm clip (over ``trained``, default ``model``), step, and CLIP's cap on the
    temperature; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_((trained or model).parameters(), grad_clip_norm)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, _MAX_LOGIT_SCALE)
    return float(loss.item())


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


def finished_elsewhere(cfg: TrainerConfig, must_match: Sequence[str], end: int) -> Path | None:
    """The weights of this config's run when it was trained to ``end`` on another machine (a lent GPU) and came back
    as ``weights.safetensors`` and ``training_log.json``; its ``state.pt``, with the optimizer's moments, stayed
    there. None when the output folder holds a ``state.pt`` or no such pair. A log that ``must_match`` (fields that fix
    the data stream, compared as written) or the step count contradicts is an error, not a run to redo."""
    folder = Path(cfg.output_dir)
    weights, log_path = folder / WEIGHTS_FILE, folder / LOG_FILE
    if (folder / STATE_FILE).exists() or not weights.is_file() or not log_path.is_file():
        return None
    log = json.loads(log_path.read_text())
    current = dataclasses.asdict(cfg)
    changed = [name for name in (*must_match, "steps", "lr") if log["config"].get(name) != current[name]]
    if changed or log["steps"] != end:
        raise ValueError(
            f"{folder} holds weights trained elsewhere with other {', '.join(changed) or 'steps'} "
            f"({log['steps']} of {end} steps): move them away to train this config"
        )
    return weights


class TrainingRun:
    """One resumable contrastive run of the tiny CLIP: model, optimizer, step, log history and training time.

    Opening a run builds the model (from ``init_weights`` when given, else a random init from ``cfg.seed``) and its
    optimizer, then continues ``state.pt`` when the output directory holds one. ``must_match`` names the config
    fields that fix the data stream: a resumed run must not change them (``path_fields`` among them compare as
    resolved paths, so a relative and an absolute spelling of one folder are the same data).

    ``auxiliary`` is trained with the CLIP but is not part of it (the exit heads of
    :mod:`training.embedded.exit_training`): the optimizer, the gradient clip and ``state.pt`` cover it, and ``finish``
    writes it beside the weights as ``auxiliary.safetensors``; ``weights.safetensors`` stays a plain open_clip CLIP.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        must_match: Sequence[str],
        path_fields: Collection[str] = (),
        init_weights: str = "",
        auxiliary: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.model, self.preprocess, self.tokenizer = build_model(seed=cfg.seed, device=self.device)
        if init_weights:
            self.model.load_state_dict({k: v.float() for k, v in load_file(init_weights).items()})
        self.auxiliary = None if auxiliary is None else auxiliary.to(self.device)
        # What the optimizer updates: the CLIP alone (parameter order as before auxiliaries existed, so older
        # state.pt files resume), or the CLIP and its auxiliary modules.
        self.trained: torch.nn.Module = (
            self.model
            if self.auxiliary is None
            else torch.nn.ModuleDict({"clip": self.model, "auxiliary": self.auxiliary})
        )
        self.optimizer = adamw(self.trained, cfg)
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self._stepped = False  # whether this session took an optimizer step (else finish may keep earlier outputs)
        self._must_match = tuple(must_match)
        self._path_fields = frozenset(path_fields)
        if self.state_path.exists():
            self._resume()
        else:
            torch.manual_seed(cfg.seed)

    @property
    def state_path(self) -> Path:
        """The run's resumable state."""
        return self.output_dir / STATE_FILE

    def train(
        self,
        batches: Iterable[Batch],
        batch_loss: Callable[[Batch], torch.Tensor],
        end: int,
        desc: str = "clip",
        time_limit_s: float = 0.0,
    ) -> None:
        """Optimizer steps from ``self.step`` up to ``end``, one per batch of ``batches`` (the batches of those steps,
        in order); ``batch_loss`` turns a batch into its loss. Logs every ``log_every`` steps, saves ``state.pt``
        every ``checkpoint_every`` steps and at ``end``. With ``time_limit_s`` > 0 the session ends after the first
        step past that much training time, logged and saved there, so a later run continues from it."""
        cfg = self.cfg
        self.trained.train()
        losses: list[float] = []
        data_seconds = 0.0  # time spent waiting for batches since the last history entry
        session_start = window_start = time.perf_counter()
        bar = tqdm(total=end, initial=self.step, desc=desc, disable=not cfg.progress, dynamic_ncols=True)
        requested = time.perf_counter()
        for batch in batches:
            data_seconds += time.perf_counter() - requested
            lr = learning_rate(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            losses.append(optimize(self.model, self.optimizer, batch_loss(batch), cfg.grad_clip_norm, self.trained))
            self.step += 1
            self._stepped = True
            bar.update(1)
            out_of_time = 0 < time_limit_s <= time.perf_counter() - session_start
            if self.step % cfg.log_every == 0 or self.step == end or out_of_time:
                now = time.perf_counter()
                entry = self._history_entry(losses, lr, self.train_seconds + now - session_start)
                # share of the wall time spent producing batches: the figure that says whether to add workers
                entry["data_fraction"] = round(data_seconds / max(1e-9, now - window_start), 3)
                self.history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}", scale=f"{entry['logit_scale']:.1f}")
                losses, data_seconds, window_start = [], 0.0, now
            if self.step % cfg.checkpoint_every == 0 or self.step == end or out_of_time:
                self._save_state(self.train_seconds + time.perf_counter() - session_start)
            if out_of_time:
                break
            requested = time.perf_counter()
        close = getattr(batches, "close", None)
        if close is not None:  # a prefetching producer stops here rather than drawing batches nobody takes
            close()
        bar.close()
        self.train_seconds += time.perf_counter() - session_start

    def finish(self, extras: Callable[[], dict[str, Any]] | None = None) -> Path:
        """Write ``weights.safetensors`` and ``training_log.json`` (config, loss, wall time, history, and the
        trainer's ``extras()``, measured on the model in eval mode after the weights are saved); returns the
        weights' path. A run that took no step in this session and already wrote both at its current step keeps
        them as written: rerunning a recipe over finished runs rewrites nothing (safetensors orders its metadata
        at random, so a rewrite changes the file's bytes) and keeps each log the record of its own session."""
        cfg = self.cfg
        self.model.eval()
        weights_path, log_path = self.output_dir / WEIGHTS_FILE, self.output_dir / LOG_FILE
        finished = not self._stepped and weights_path.is_file() and log_path.is_file()
        if finished and json.loads(log_path.read_text()).get("steps") == self.step:
            return weights_path
        weights_path = save_weights(self.model, weights_path, half=cfg.half)
        if self.auxiliary is not None:
            self.auxiliary.eval()
            save_weights(self.auxiliary, self.output_dir / AUXILIARY_FILE, half=False)
        extra = extras() if extras is not None else {}
        log = training_log(dataclasses.asdict(cfg), self.step, self.train_seconds, self.history, cfg.half, extra)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        return weights_path

    def _history_entry(self, losses: Sequence[float], lr: float, elapsed_s: float) -> dict[str, Any]:
        """The mean loss over the steps since the last entry, the learning rate, CLIP's temperature and the
        training time so far."""
        return {
            "step": self.step,
            "loss": float(np.mean(losses)),
            "lr": lr,
            "logit_scale": self.model.logit_scale.detach().exp().item(),
            "elapsed_s": round(elapsed_s, 3),
        }

    def _comparable(self, name: str, value: Any) -> Any:
        return str(Path(value).resolve()) if name in self._path_fields and value is not None else value

    def _resume(self) -> None:
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
        current = dataclasses.asdict(self.cfg)
        # A field added after a state was written reads as its default there (a new field keeps old behaviour at it).
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)}
        changed = [
            name
            for name in self._must_match
            if self._comparable(name, saved.get(name, defaults[name])) != self._comparable(name, current[name])
        ]
        if changed:
            raise ValueError(
                f"{self.state_path} was written with different {', '.join(changed)}; "
                "resuming would mix two data streams. Use a new output_dir or restore the old values."
            )
        self.model.load_state_dict(state["model"])
        if self.auxiliary is not None:
            if "auxiliary" not in state:
                raise ValueError(f"{self.state_path} holds no auxiliary modules (exit heads); this config trains some")
            self.auxiliary.load_state_dict(state["auxiliary"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.history = json.loads(state["history"])

    def _save_state(self, train_seconds: float) -> None:
        # Config and history travel as JSON strings so the file loads with weights_only=True.
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "train_seconds": train_seconds,
            "config": json.dumps(dataclasses.asdict(self.cfg)),
            "history": json.dumps(self.history),
        }
        if self.auxiliary is not None:
            state["auxiliary"] = self.auxiliary.state_dict()
        # Write then rename, so an interrupted save never leaves a truncated state behind.
        temporary = self.state_path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.state_path)


def salvage_state(state_path: Path, out_dir: Path) -> int:
    """A stopped run's last ``state.pt`` as what its machine can send back: its model as FP16
    ``weights.safetensors`` (what ``TrainingRun.finish`` would save at that step) and its step, training time,
    config and history as ``state_meta.json`` (the input of :func:`salvaged_log`), both in ``out_dir``. Returns
    the state's step."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model, _, _ = build_model()
    model.load_state_dict(state["model"])
    save_weights(model, out_dir / WEIGHTS_FILE, half=True)
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "torch_rng")}
    (out_dir / "state_meta.json").write_text(json.dumps(meta) + "\n")
    return int(state["step"])


def salvaged_log(state_meta: dict[str, Any], extras: dict[str, Any], ended: str) -> dict[str, Any]:
    """The training log ``TrainingRun.finish`` writes, for a run stopped before it wrote one: ``state_meta`` is its
    last ``state.pt`` without model and optimizer (``training/embedded/device_stage.sh salvage`` brings it back beside
    that state's model as FP16 weights, which is what ``finish`` saves). The config's ``stop_step`` becomes the
    state's step, so the stage entry that records the run (``stop_step``) finds it finished; ``ended`` says why."""
    config, history = json.loads(state_meta["config"]), json.loads(state_meta["history"])
    step, seconds = int(state_meta["step"]), float(state_meta["train_seconds"])
    return training_log(config | {"stop_step": step}, step, seconds, history, True, extras | {"ended": ended})


def training_log(
    config: dict[str, Any],
    step: int,
    seconds: float,
    history: list[dict[str, Any]],
    half: bool,
    extras: dict[str, Any],
) -> dict[str, Any]:
    """A run's ``training_log.json``: config, steps, last loss, training time and rate, the weights file and dtype,
    the trainer's ``extras``, then the history."""
    return {
        "model_name": MODEL_NAME,
        "config": config,
        "steps": step,
        "final_loss": history[-1]["loss"] if history else None,
        "wall_time_s": round(seconds, 3),
        "steps_per_s": round(step / seconds, 4) if seconds > 0 else None,
        "weights": WEIGHTS_FILE,
        "weights_dtype": "float16" if half else "float32",
        **extras,
        "history": history,
    }


def config_parser(description: str | None, defaults: Any) -> argparse.ArgumentParser:
    """A command line with one ``--flag`` per scalar field of the dataclass instance ``defaults`` (bools as
    --x / --no-x), so ``Config(**vars(parser.parse_args()))`` rebuilds the config."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for config_field in dataclasses.fields(defaults):
        default = getattr(defaults, config_field.name)
        flag = "--" + config_field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, int | float | str):
            parser.add_argument(flag, type=type(default), default=default)
    return parser
