"""Training the tiny CLIP to exit: the staged forward equals open_clip's, the losses mean what they say, and a run
with exit heads resumes bit for bit and saves its heads beside a plain CLIP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from training.embedded.everyday import concept_loss
from training.embedded.exit_training import (
    ExitTraining,
    distillation,
    encode_image_with_exits,
    exit_heads,
    exit_loss,
    probe,
)
from training.embedded.trainer import AUXILIARY_FILE, WEIGHTS_FILE, TrainingRun, build_model

from .test_trainer import CAPTIONS, TinyConfig


def test_the_pass_with_exits_gives_open_clips_own_image_embedding() -> None:
    model, _, _ = build_model(seed=3)
    heads = exit_heads(model, ExitTraining((2, 5)))
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final, exits = encode_image_with_exits(model, heads, images)
        reference = F.normalize(model.encode_image(images), dim=-1)
    # The same ops in the same order on the same inputs: within rounding of one another on any CPU.
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-6)
    assert sorted(exits) == [2, 5]
    assert all(e.shape == (4, model.visual.output_dim) for e in exits.values())
    assert all(torch.allclose(e.norm(dim=-1), torch.ones(4)) for e in exits.values())


def test_distillation_is_zero_only_when_the_exit_answers_as_full_depth() -> None:
    generator = torch.Generator().manual_seed(1)
    final = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    text = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    other = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    scale = torch.tensor(50.0)
    assert float(distillation(final, final, text, scale)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation(other, final, text, scale)) > 0.1


def test_exit_losses_reach_the_blocks_below_the_head_and_not_the_teacher() -> None:
    model, _, tokenizer = build_model(seed=0)
    plan = ExitTraining((3,), distill_weight=1.0, contrastive_weight=1.0)
    heads = exit_heads(model, plan)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    final, exits = encode_image_with_exits(model, heads, images)
    text = model.encode_text(tokenizer(CAPTIONS), normalize=True)
    positives = torch.eye(4, dtype=torch.bool)
    loss, parts = exit_loss(plan, exits, final, text, model.logit_scale.exp(), positives, concept_loss)
    assert set(parts) == {"distill_3", "contrastive_3"}
    loss.backward()
    blocks = model.visual.transformer.resblocks
    assert blocks[0].mlp.c_fc.weight.grad is not None and blocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    # Nothing above the head and nothing of the text tower learns from the exit's losses.
    assert blocks[5].mlp.c_fc.weight.grad is None
    assert model.token_embedding.weight.grad is None
    assert model.visual.proj.grad is None


def _train(cfg: TinyConfig, plan: ExitTraining, end: int | None = None) -> TrainingRun:
    model_for_shapes, _, _ = build_model()
    run = TrainingRun(cfg, must_match=("seed",), auxiliary=exit_heads(model_for_shapes, plan))
    tokens = run.tokenizer(CAPTIONS)
    loss_fn = open_clip.ClipLoss()

    def draw(step: int) -> torch.Tensor:
        return torch.randn((len(CAPTIONS), 3, 64, 64), generator=torch.Generator().manual_seed(step))

    def batch_loss(images: torch.Tensor) -> torch.Tensor:
        assert run.auxiliary is not None
        final, exits = encode_image_with_exits(run.model, run.auxiliary, images)  # type: ignore[arg-type]
        text = run.model.encode_text(tokens, normalize=True)
        scale = run.model.logit_scale.exp()
        clip_loss: torch.Tensor = loss_fn(final, text, scale)
        extra, _ = exit_loss(plan, exits, final, text, scale, torch.eye(len(CAPTIONS), dtype=torch.bool), concept_loss)
        return clip_loss + extra

    stop = cfg.steps if end is None else end
    run.train(map(draw, range(run.step, stop)), batch_loss, stop)
    run.finish()
    return run


def test_a_run_with_exit_heads_resumes_bit_for_bit_and_saves_them_apart(tmp_path: Path) -> None:
    plan = ExitTraining((2, 4), distill_weight=1.0, contrastive_weight=0.5)
    straight = _train(TinyConfig(output_dir=str(tmp_path / "straight")), plan)
    interrupted = TinyConfig(output_dir=str(tmp_path / "resumed"))
    _train(interrupted, plan, end=2)
    resumed = _train(interrupted, plan)
    for name in (WEIGHTS_FILE, AUXILIARY_FILE):
        a, b = (load_file(Path(run.output_dir) / name) for run in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The weights file stays a plain open_clip CLIP: it loads as `pretrained` with no exit-head keys in it.
    weights = Path(straight.output_dir) / WEIGHTS_FILE
    assert not any(key.startswith(("2.", "4.")) for key in load_file(weights))
    build_model(weights)
    # A state without heads cannot be continued by a config that trains some.
    plain = TrainingRun(replace(TinyConfig(output_dir=str(tmp_path / "plain")), steps=1), must_match=("seed",))
    plain._save_state(0.0)
    with pytest.raises(ValueError, match="no auxiliary modules"):
        _train(TinyConfig(output_dir=str(tmp_path / "plain")), plan)


def test_probe_counts_agreement_of_each_exit_with_full_depth() -> None:
    model, _, _ = build_model(seed=0)
    heads = exit_heads(model, ExitTraining((2,)))
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        final, exits = encode_image_with_exits(model, heads, images)
    # Text rows equal to the images' own full-depth embeddings: full depth answers each image with its own row.
    text = final.clone()
    sets = [list(range(5))] * 5
    report = probe(model, heads, images, text, sets, truth=list(range(5)))
    assert report["full"]["top1"] == 1.0
    chosen = (exits[2] @ text.T).argmax(dim=1).tolist()
    assert report["2"]["agreement_with_full"] == sum(c == i for i, c in enumerate(chosen)) / 5


def test_exit_training_parses_from_config_fields() -> None:
    assert ExitTraining.parse("", "cls", 1.0, 0.0) is None
    assert ExitTraining.parse("3, 6", "ssa", 1.0, 0.5) == ExitTraining((3, 6), "ssa", 1.0, 0.5)
    with pytest.raises(ValueError):
        ExitTraining.parse("6,3", "cls", 1.0, 0.0)
    with pytest.raises(ValueError):
        ExitTraining.parse("3", "mean", 1.0, 0.0)


def test_probe_table_renders_each_run_and_task() -> None:
    from training.embedded.exit_probe import table

    figures = {"images": 4, "full": {"top1": 0.5}} | {
        str(layer): {"top1": 0.25, "agreement_with_full": layer / 20} for layer in range(3, 12)
    }
    rendered = table([{"run": "both", "steps": 300, "tasks": {"cifar10-10way": figures}}], layers=(3, 11))
    assert rendered.splitlines() == [
        "| run | steps | task | images | full top-1 | agree @3 | agree @11 |",
        "|---|---|---|---|---|---|---|",
        "| both | 300 | cifar10-10way | 4 | 50.0% | 15.0% | 55.0% |",
    ]
