"""The shared tiny-CLIP training loop: bit-exact resume, refused data changes, time limits, the log, the command line,
and its helpers (cached tokens, prefetched batches)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from training.embedded.trainer import (
    LOG_FILE,
    STATE_FILE,
    CachedTokenizer,
    TrainingRun,
    config_parser,
    prefetched,
)

Batch = tuple[torch.Tensor, torch.Tensor]  # images [B, 3, 64, 64], tokens [B, context]
CAPTIONS = ["a red square", "a blue circle", "a green star", "a grey blob"]


@dataclass(frozen=True)
class TinyConfig:
    """The fields a trainer's config must carry, plus one data field of its own."""

    output_dir: str  # the run's directory
    data_dir: str = "."  # stands in for a trainer's data folder (compared as a resolved path on resume)
    steps: int = 3  # schedule length
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # final learning rate
    warmup_steps: int = 1  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay of matrices
    beta2: float = 0.98  # AdamW second moment
    grad_clip_norm: float | None = 1.0  # global clip
    seed: int = 0  # init and draws
    threads: int = 1  # torch threads
    device: str = "cpu"  # torch device
    log_every: int = 1  # steps between log entries
    checkpoint_every: int = 2  # steps between state.pt writes
    half: bool = False  # FP16 weights file
    progress: bool = False  # no progress bar in tests


def _train(cfg: TinyConfig, end: int | None = None, time_limit_s: float = 0.0) -> TrainingRun:
    run = TrainingRun(cfg, must_match=("seed", "data_dir"), path_fields=("data_dir",))
    tokens = run.tokenizer(CAPTIONS)
    loss_fn = open_clip.ClipLoss()

    def draw(step: int) -> Batch:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return torch.randn((len(CAPTIONS), 3, 64, 64), generator=generator), tokens

    def batch_loss(batch: Batch) -> torch.Tensor:
        output = run.model(*batch)
        loss: torch.Tensor = loss_fn(output["image_features"], output["text_features"], output["logit_scale"])
        return loss

    stop = cfg.steps if end is None else end
    run.train(map(draw, range(run.step, stop)), batch_loss, stop, time_limit_s=time_limit_s)
    run.finish(lambda: {"extra": "mine"})
    return run


def test_interrupted_and_resumed_run_equals_a_straight_one(tmp_path: Path) -> None:
    straight = _train(TinyConfig(output_dir=str(tmp_path / "straight")))
    interrupted = TinyConfig(output_dir=str(tmp_path / "resumed"))
    _train(interrupted, end=2)
    resumed = _train(interrupted)
    assert straight.step == resumed.step == 3
    weights = [load_file(Path(run.output_dir) / "weights.safetensors") for run in (straight, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert [e["loss"] for e in straight.history] == [e["loss"] for e in resumed.history]
    assert [e["step"] for e in resumed.history] == [1, 2, 3]


def test_log_holds_config_history_and_the_trainers_extras(tmp_path: Path) -> None:
    cfg = TinyConfig(output_dir=str(tmp_path), steps=2, half=True)
    _train(cfg)
    log = json.loads((tmp_path / LOG_FILE).read_text())
    assert log["config"]["output_dir"] == str(tmp_path) and log["steps"] == 2
    assert log["extra"] == "mine" and log["weights_dtype"] == "float16"
    assert log["final_loss"] == log["history"][-1]["loss"]
    assert 0.0 <= log["history"][-1]["data_fraction"] <= 1.0
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 2


def test_rerunning_a_finished_run_rewrites_nothing_but_a_longer_run_does(tmp_path: Path) -> None:
    cfg = TinyConfig(output_dir=str(tmp_path), steps=2)
    _train(cfg)
    files = {name: (tmp_path / name).read_bytes() for name in ("weights.safetensors", LOG_FILE)}
    again = _train(replace(cfg, log_every=5))  # finished: its weights and its own session's log stand as written
    assert again.step == 2
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    longer = _train(replace(cfg, steps=3))
    log = json.loads((tmp_path / LOG_FILE).read_text())
    assert longer.step == 3 and log["steps"] == 3 and log["config"]["steps"] == 3
    assert (tmp_path / "weights.safetensors").read_bytes() != files["weights.safetensors"]


def test_resume_refuses_other_data_but_accepts_another_spelling_of_its_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg = TinyConfig(output_dir=str(tmp_path / "run"), data_dir=str(data), steps=1)
    _train(cfg)
    with pytest.raises(ValueError, match="seed"):
        _train(replace(cfg, seed=1, steps=2))
    relative = os.path.relpath(data)
    assert _train(replace(cfg, data_dir=relative, steps=2)).step == 2


def test_command_line_has_a_flag_per_scalar_field() -> None:
    parser = config_parser("tiny", TinyConfig(output_dir="x"))
    args = vars(parser.parse_args(["--output-dir", "runs/y", "--steps", "7", "--half", "--lr", "0.5"]))
    cfg = TinyConfig(**args)
    assert (cfg.output_dir, cfg.steps, cfg.half, cfg.lr, cfg.progress) == ("runs/y", 7, True, 0.5, False)


def test_a_time_limit_ends_the_session_saved_and_the_next_one_continues(tmp_path: Path) -> None:
    cfg = TinyConfig(output_dir=str(tmp_path / "run"), steps=4, checkpoint_every=10)
    run = _train(cfg, time_limit_s=1e-9)  # out of time after the first step
    assert run.step == 1 and torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["step"] == 1
    assert [entry["step"] for entry in run.history] == [1]
    assert _train(cfg).step == 4


def test_cached_tokens_are_the_tokenizers_and_the_cache_is_bounded() -> None:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    cached = CachedTokenizer(tokenizer, capacity=2)
    texts = ["a dog", "a cat", "a dog", "a photo of a bus", "a cat"]
    assert torch.equal(cached(texts), tokenizer(texts))
    assert torch.equal(cached(texts[::-1]), tokenizer(texts[::-1]))
    assert len(cached.rows) == 2


def test_prefetched_keeps_order_raises_the_producers_error_and_stops_when_closed() -> None:
    assert list(prefetched(iter(range(50)), 3)) == list(range(50))
    assert list(prefetched(iter(range(5)), 0)) == list(range(5))

    def failing() -> Iterator[int]:
        yield 1
        raise KeyError("broken batch")

    with pytest.raises(KeyError, match="broken batch"):
        list(prefetched(failing(), 2))
    drawn: list[int] = []

    def endless() -> Iterator[int]:
        step = 0
        while True:
            drawn.append(step)
            yield step
            step += 1

    batches = prefetched(endless(), 2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()
    count = len(drawn)
    assert count <= 3 + 2 + 1  # taken, queued, and the one in hand when the stop came
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
