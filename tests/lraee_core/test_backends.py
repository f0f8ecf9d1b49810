"""One loader, every backend and quant mode: overrides, converted modules, and batch == single per image."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lraee_core import BackendOptions, CheckpointError, EarlyExitClassifier, load_classifier, read_manifest

from ..decisions import near, top2_gap

# Imported under another name so that pytest does not collect it here a second time.
from .test_engine import test_batch_gives_each_image_its_own_result as engine_batch_equals_single

# onnxruntime is a core dependency (pyproject.toml): these tests run everywhere, and an install without it fails them
# rather than skipping them.


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ort_full(tiny_checkpoint: Path) -> EarlyExitClassifier:
    return load_classifier(
        tiny_checkpoint, quant_mode="full", backend="onnxruntime", backend_options=BackendOptions(threads=1)
    )


def test_quant_mode_override_without_rewriting_the_manifest(tiny_checkpoint: Path) -> None:
    own = read_manifest(tiny_checkpoint)
    converted: dict[str, int] = {}
    for mode in ("none", "paper", "full"):
        classifier = load_classifier(tiny_checkpoint, quant_mode=mode)
        assert classifier.quant_report.mode == mode
        assert classifier.manifest == own  # the checkpoint still describes itself; the engine reports its mode
        converted[mode] = len(classifier.quant_report.converted)
    assert converted["none"] == 0 < converted["paper"] < converted["full"]
    assert converted[own.quant_mode] == own.quantized_modules


def test_unknown_backend_or_mode_is_a_checkpoint_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown backend"):
        load_classifier(tiny_checkpoint, backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="unknown quant mode"):
        load_classifier(tiny_checkpoint, quant_mode="int4")  # type: ignore[arg-type]


def test_a_broken_onnxruntime_install_is_named(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lraee_core.backends.onnxruntime", None)  # what a broken install sees
    with pytest.raises(CheckpointError, match="onnx and onnxruntime, dependencies of this package"):
        load_classifier(tiny_checkpoint, backend="onnxruntime")


@pytest.mark.slow
def test_onnxruntime_converts_the_modules_torch_converts(tiny_checkpoint: Path, ort_full: EarlyExitClassifier) -> None:
    torch_full = load_classifier(tiny_checkpoint, quant_mode="full")
    assert ort_full.quant_report.mode == "full"
    assert len(ort_full.quant_report.converted) == len(torch_full.quant_report.converted)
    ort_paper = load_classifier(
        tiny_checkpoint, quant_mode="paper", backend="onnxruntime", backend_options=BackendOptions(threads=1)
    )
    assert len(ort_paper.quant_report.converted) == read_manifest(tiny_checkpoint).quantized_modules


@pytest.mark.slow
def test_onnxruntime_gives_each_image_its_own_result(ort_full: EarlyExitClassifier, images: torch.Tensor) -> None:
    """Per-image activation scales: an image's hidden states are bit-identical alone and in a batch, so its
    answer does not depend on its batch neighbours (per-batch scales, the bare ORT way, would differ)."""
    backbone = ort_full.backbone

    def last_hidden(batch: torch.Tensor) -> torch.Tensor:
        hidden = backbone.embed(batch)
        for layer in range(1, ort_full.num_layers + 1):
            hidden = backbone.block(layer, hidden)
        return hidden

    with torch.inference_mode():
        together = last_hidden(images)
        one_by_one = torch.cat([last_hidden(images[i : i + 1]) for i in range(images.shape[0])])
    assert torch.equal(together, one_by_one)

    # The engine-level check the torch backend passes, on this backend: exits and answers per image, batch or not.
    engine_batch_equals_single(ort_full, images)


@pytest.mark.slow
def test_per_batch_scales_would_mix_images(ort_full: EarlyExitClassifier, images: torch.Tensor) -> None:
    """The check above has teeth: with one activation scale per batch, an image's hidden state changes."""
    from lraee_core.backends.onnxruntime import OrtClipBackbone

    assert isinstance(ort_full.backbone, OrtClipBackbone)
    per_batch = ort_full.backbone.with_scales(False)
    with torch.inference_mode():
        together = per_batch.block(1, per_batch.embed(images))
        alone = torch.cat([per_batch.block(1, per_batch.embed(images[i : i + 1])) for i in range(images.shape[0])])
    assert not torch.equal(together, alone)


def test_auto_backend_picks_onnxruntime_for_the_modes_it_runs() -> None:
    from lraee_core.backends import ONNXRUNTIME_MODES, auto_backend
    from lraee_core.config import QUANT_MODES

    for mode in QUANT_MODES:
        assert auto_backend(mode) == ("onnxruntime" if mode in ONNXRUNTIME_MODES else "torch")
    assert {"none", "paper", "full"} == set(ONNXRUNTIME_MODES) < set(QUANT_MODES)  # static modes stay torch


def test_auto_backend_without_onnxruntime_is_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from lraee_core.backends import auto_backend

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without it sees
    assert auto_backend("paper") == "torch"


def test_the_loader_resolves_auto_for_the_mode_it_loads(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lraee_core import backends

    asked: list[str] = []

    def auto_backend(mode: str) -> str:
        asked.append(mode)
        return "torch"

    monkeypatch.setattr(backends, "auto_backend", auto_backend)
    assert load_classifier(tiny_checkpoint, backend="auto", quant_mode="full").backend == "torch"
    assert load_classifier(tiny_checkpoint, backend="auto").backend == "torch"
    assert asked == ["full", read_manifest(tiny_checkpoint).quant_mode]  # the override, else the manifest's mode
    assert load_classifier(tiny_checkpoint).backend == "torch"  # none named: the library's default


def test_no_module_outside_lraee_core_resolves_auto() -> None:
    """Whoever needs a backend asks the loader (``load_classifier(..., backend="auto")``) and reads
    ``classifier.backend``; ``auto_backend`` is called inside lraee_core only."""
    import ast

    from lraee_core.paths import REPO_ROOT

    callers = []
    for package in ("app", "bench", "training", "deploy", "docs"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                named = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
                if named == "auto_backend" or (isinstance(node, ast.alias) and node.name == "auto_backend"):
                    callers.append(f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}")
    assert callers == []


@pytest.mark.slow
def test_onnxruntime_spans_compute_the_exit_head_and_final_pooling(
    ort_full: EarlyExitClassifier, images: torch.Tensor
) -> None:
    """The exit head and the full-depth pooling run inside the span graphs: they equal PyTorch's head and
    ``pool_final`` on the same hidden state within float rounding, and an image's embeddings alone and in a batch
    differ by no more than that (the blocks' hidden states stay bit-identical; the FP32 head's reductions, like
    PyTorch's, may round differently by batch size)."""
    from lraee_core.backbone import ClipBackbone

    backbone, top = ort_full.backbone, ort_full.num_layers
    layer = min(ort_full.heads)
    head = ort_full.heads[layer]

    def run(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        early = backbone.span(1, layer, backbone.embed(batch), head)
        late = backbone.span(layer + 1, top, early.hidden, final=True)
        assert early.exit is not None and late.final is not None and early.final is None and late.exit is None
        return early.hidden, early.exit, late.hidden, late.final

    with torch.inference_mode():
        hidden, exit_embedding, last, final = run(images)
        alone = [run(images[i : i + 1]) for i in range(images.shape[0])]
        reference = ClipBackbone.span(backbone, layer + 1, top, hidden, final=True)  # PyTorch head and pooling
        torch.testing.assert_close(exit_embedding, head(head.pool(hidden)), rtol=0, atol=1e-6)
        assert reference.final is not None
        torch.testing.assert_close(final, reference.final, rtol=0, atol=1e-6)
    torch.testing.assert_close(exit_embedding, torch.cat([a[1] for a in alone]), rtol=0, atol=1e-6)
    torch.testing.assert_close(final, torch.cat([a[3] for a in alone]), rtol=0, atol=1e-6)
    assert torch.equal(hidden, torch.cat([a[0] for a in alone]))
    assert torch.equal(last, torch.cat([a[2] for a in alone]))
    assert exit_embedding.norm(dim=-1).sub(1).abs().max() < 1e-5


@pytest.mark.slow
def test_a_span_from_the_images_embeds_them_in_its_graph(ort_full: EarlyExitClassifier, images: torch.Tensor) -> None:
    """``span(0, ...)`` takes the images and runs the embedding stage in the span's own graph (one call less per
    batch): the same hidden state, bit for bit, and the same exit embedding as the embedding stage's own graph
    followed by ``span(1, ...)``."""
    backbone, layer = ort_full.backbone, min(ort_full.heads)
    head = ort_full.heads[layer]
    with torch.inference_mode():
        merged = backbone.span(0, layer, images, head)
        staged = backbone.span(1, layer, backbone.embed(images), head)
    assert torch.equal(merged.hidden, staged.hidden)
    assert merged.exit is not None and staged.exit is not None
    torch.testing.assert_close(merged.exit, staged.exit, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        backbone.span(0, 0, images)


@pytest.mark.slow
@pytest.mark.parametrize("label_sets", ["one", "several"])
def test_onnxruntime_spans_answer_the_gate_as_pytorch_does(
    ort_full: EarlyExitClassifier, images: torch.Tensor, label_sets: str
) -> None:
    """The gate written into the span graph (every feature the gate knows, with random weights) gives PyTorch's
    logits, probability and top-1 on the same exit embedding and hidden state, with one label set for the batch and
    with a label set per row (padded, including one-label rows); an image's verdict alone equals its verdict in the
    batch within float rounding."""
    from lraee_core.gate import FEATURES, GateParams, GateQuestion, answer_gate

    backbone, layer = ort_full.backbone, min(ort_full.heads)
    head = ort_full.heads[layer]
    generator = torch.Generator().manual_seed(3)
    params = GateParams(tuple(torch.randn(len(FEATURES), generator=generator).tolist()), 0.2, FEATURES)
    text = torch.nn.functional.normalize(torch.randn(9, backbone.shape.embed_dim, generator=generator), dim=-1)
    rows = images.shape[0]
    previous = torch.tensor([-1, 0, 2, 1, 0, 3])[:rows]
    columns = counts = None
    if label_sets == "several":  # label sets [0:3], [3:4] (one label) and [4:9], two rows each
        counts = torch.tensor([3, 1, 5, 3, 1, 5])[:rows]
        starts = torch.tensor([0, 3, 4, 0, 3, 4])[:rows]
        columns = starts.unsqueeze(1) + torch.arange(5).clamp_max(counts.unsqueeze(1) - 1)

    def question(which: slice) -> GateQuestion:
        own_columns = None if columns is None else columns[which]
        own_counts = None if counts is None else counts[which]
        return GateQuestion(params, ort_full._logit_scale, text, own_columns, own_counts, previous[which])

    with torch.inference_mode():
        hidden = backbone.embed(images)
        span = backbone.span(1, layer, hidden, head, gate=question(slice(None)))
        alone = [backbone.span(1, layer, hidden[i : i + 1], head, gate=question(slice(i, i + 1))) for i in range(rows)]
    assert span.gate is not None and span.exit is not None
    reference = answer_gate(question(slice(None)), span.exit, span.hidden)
    assert torch.equal(span.gate.logits.isinf(), reference.logits.isinf())  # the same padding
    finite = reference.logits.isfinite()
    torch.testing.assert_close(span.gate.logits[finite], reference.logits[finite], rtol=0, atol=1e-5)
    torch.testing.assert_close(span.gate.probability, reference.probability, rtol=0, atol=1e-6)
    # Top-1 labels are compared where the runner-up's cosine is further than the tie band (tests/decisions.py):
    # other kernels may rank a near tie either way. At most one of the six rows may be that close.
    decided = ~near(top2_gap(reference.logits / ort_full._logit_scale), 0.0)
    assert decided.sum() >= rows - 1
    mask = torch.from_numpy(decided)
    assert span.gate.top1[mask].tolist() == reference.top1[mask].tolist()
    for i, single in enumerate(alone):
        assert single.gate is not None
        torch.testing.assert_close(single.gate.probability[0], span.gate.probability[i], rtol=0, atol=1e-6)
        assert int(single.gate.top1[0]) == int(span.gate.top1[i]) or not decided[i]
    with pytest.raises(ValueError, match="pass the head"):
        backbone.span(1, layer, hidden, gate=question(slice(None)))


@pytest.mark.slow
def test_small_calls_run_on_one_thread_with_the_same_results(tiny_checkpoint: Path, images: torch.Tensor) -> None:
    """A batch of one runs its spans on a one-thread session (below SMALL_CALL activations), the batch of six on the
    two-thread one; each image's hidden states and exit embeddings are the same either way."""
    from lraee_core.backends.onnxruntime import SMALL_CALL, OrtClipBackbone

    classifier = load_classifier(
        tiny_checkpoint, quant_mode="full", backend="onnxruntime", backend_options=BackendOptions(threads=2)
    )
    backbone = classifier.backbone
    assert isinstance(backbone, OrtClipBackbone)
    layer = min(classifier.heads)
    head = classifier.heads[layer]
    with torch.inference_mode():
        embedded = backbone.embed(images)
        assert embedded[:1].numel() < SMALL_CALL <= embedded.numel()
        together = backbone.span(1, layer, embedded, head)
        alone = [backbone.span(1, layer, embedded[i : i + 1], head) for i in range(images.shape[0])]
    assert {key[-1] for key in backbone._sessions} == {True, False}  # both session kinds ran
    assert torch.equal(together.hidden, torch.cat([a.hidden for a in alone]))
    assert together.exit is not None
    torch.testing.assert_close(
        together.exit, torch.cat([a.exit for a in alone if a.exit is not None]), rtol=0, atol=1e-6
    )
    engine_batch_equals_single(classifier, images)
