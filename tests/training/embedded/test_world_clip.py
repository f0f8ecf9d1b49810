"""Contrastive training of the tiny CLIP: resumable runs, open_clip-loadable weights, zero-shot plumbing."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.embedded.trainer import (
    LOG_FILE,
    MODEL_NAME,
    STATE_FILE,
    build_model,
    learning_rate,
    register_model_config,
    save_weights,
)
from training.embedded.world import COLOUR_NAMES, COLOURS, LABEL_SETS, generate
from training.embedded.world_clip import WorldClipConfig, batch_indices, train_world_clip, zero_shot_accuracy

# Warmup covers the first run's two steps, so its learning rates do not depend on `steps`, and a 2-step run
# resumed to 3 steps must reproduce a straight 3-step run bit for bit.
TINY = WorldClipConfig(batch_size=8, warmup_steps=2, checkpoint_every=2, log_every=1, progress=False, threads=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world_clip")
    straight, resumed = root / "straight", root / "resumed"
    train_world_clip(replace(TINY, output_dir=str(straight), steps=3, eval_images=4))
    train_world_clip(replace(TINY, output_dir=str(resumed), steps=2, eval_images=0))
    train_world_clip(replace(TINY, output_dir=str(resumed), steps=3, eval_images=0))
    return {"straight": straight, "resumed": resumed}


def _probe_batch() -> tuple[list[Image.Image], list[str]]:
    samples = [generate(i, "test") for i in range(4)]
    return [s.image for s in samples], [s.caption for s in samples]


def test_resumed_run_matches_uninterrupted_run(runs: dict[str, Path]) -> None:
    for run in runs.values():
        assert torch.load(run / STATE_FILE, weights_only=True)["step"] == 3
    straight = load_file(runs["straight"] / "weights.safetensors")
    resumed = load_file(runs["resumed"] / "weights.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    initial, _, _ = build_model(seed=0)
    assert not torch.equal(initial.state_dict()["visual.conv1.weight"], straight["visual.conv1.weight"])


def test_weights_load_through_open_clip_with_identical_outputs(runs: dict[str, Path]) -> None:
    trained, preprocess, tokenizer = build_model()
    trained.load_state_dict(torch.load(runs["straight"] / STATE_FILE, weights_only=True)["model"])
    loaded, _, _ = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(runs["straight"] / "weights.safetensors")
    )
    images, captions = _probe_batch()
    pixels, tokens = torch.stack([preprocess(image) for image in images]), tokenizer(captions)
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(trained.encode_image(pixels), loaded.encode_image(pixels))
        assert torch.equal(trained.encode_text(tokens), loaded.encode_text(tokens))
        assert torch.equal(trained.logit_scale, loaded.logit_scale)


def test_training_log_reports_loss_time_and_zero_shot(runs: dict[str, Path]) -> None:
    log = json.loads((runs["straight"] / LOG_FILE).read_text())
    assert log["steps"] == 3
    assert [entry["step"] for entry in log["history"]] == [1, 2, 3]
    assert math.isfinite(log["final_loss"]) and log["final_loss"] > 0
    assert log["wall_time_s"] > 0
    assert log["config"]["batch_size"] == 8
    assert set(log["zero_shot"]) == {"heldout", "test"}
    for accuracies in log["zero_shot"].values():
        assert set(accuracies) == set(LABEL_SETS)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in accuracies.values())
    resumed_log = json.loads((runs["resumed"] / LOG_FILE).read_text())
    assert [entry["step"] for entry in resumed_log["history"]] == [1, 2, 3]
    assert resumed_log["history"][-1]["loss"] == log["history"][-1]["loss"]


def test_resuming_with_different_data_is_refused(runs: dict[str, Path]) -> None:
    changed = replace(TINY, output_dir=str(runs["resumed"]), steps=3, eval_images=0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        train_world_clip(changed)


def test_half_weights_load_as_fp16_rounded_model(tmp_path: Path) -> None:
    model, preprocess, tokenizer = build_model(seed=3)
    path = save_weights(model, tmp_path / "half.safetensors", half=True)
    assert all(tensor.dtype == torch.float16 for tensor in load_file(path).values())
    loaded, _, _ = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(path))
    rounded, _, _ = build_model(seed=3)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
    images, captions = _probe_batch()
    pixels, tokens = torch.stack([preprocess(image) for image in images]), tokenizer(captions)
    loaded.eval()
    rounded.eval()
    with torch.no_grad():
        assert next(loaded.parameters()).dtype == torch.float32
        assert torch.equal(loaded.encode_image(pixels), rounded.encode_image(pixels))
        assert torch.equal(loaded.encode_text(tokens), rounded.encode_text(tokens))


def test_learning_rate_warms_up_then_decays_to_min() -> None:
    cfg = WorldClipConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    rates = [learning_rate(step, cfg) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3) == rates[10]
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(1e-5)


@pytest.mark.parametrize("bad", [{"precision": "fp16"}, {"batch_size": 1}, {"steps": 0}])
def test_config_refuses_invalid_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        WorldClipConfig(**bad)


def test_bf16_step_trains(tmp_path: Path) -> None:
    cfg = replace(TINY, output_dir=str(tmp_path), steps=1, eval_images=0, precision="bf16")
    weights = load_file(train_world_clip(cfg))
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in weights.values())


def test_batches_are_a_pure_function_of_step() -> None:
    cfg = WorldClipConfig(batch_size=16, train_size=1000)
    assert batch_indices(5, cfg) == batch_indices(5, cfg)
    assert batch_indices(5, cfg) != batch_indices(6, cfg)
    assert all(0 <= index < 1000 for index in batch_indices(5, cfg))


class _ColourOracle(torch.nn.Module):
    """Embeds an image as the one-hot of its most frequent named colour and a prompt as the colour it names.

    With it, zero-shot accuracy on the colour label set is right only if prompts, class order and labels agree.
    """

    def __init__(self, tokenizer: open_clip.SimpleTokenizer) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # zero_shot_accuracy takes the device from parameters
        colour_tokens = [tokenizer.encode(name) for name in COLOUR_NAMES]
        assert all(len(tokens) == 1 for tokens in colour_tokens)
        self.colour_tokens = torch.tensor([tokens[0] for tokens in colour_tokens])  # [C]
        self.colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [C, 3]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return (tokens[:, :, None] == self.colour_tokens).any(dim=1).float()  # [N, C]

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        pixels = images.reshape(images.shape[0], -1, 3)  # [B, H*W, 3]
        near = (torch.cdist(pixels, self.colours) < 45).sum(dim=1)  # [B, C]
        return torch.nn.functional.one_hot(near.argmax(dim=1), len(COLOUR_NAMES)).float()


def test_zero_shot_accuracy_is_perfect_for_an_oracle_and_keeps_mode() -> None:
    tokenizer = open_clip.get_tokenizer(register_model_config())
    oracle = _ColourOracle(tokenizer)
    oracle.train()

    def raw_pixels(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32))

    for split in ("heldout", "test"):
        accuracy = zero_shot_accuracy(oracle, tokenizer, raw_pixels, "colours", split, 64)
        assert accuracy == 1.0
    assert oracle.training
