"""Static INT8 and the simulated stress modes: calibration, conversion, kernels, batch invariance, checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lraee_core import load_classifier
from lraee_core.backbone import ClipBackbone, build_backbone
from lraee_core.checkpoint import MANIFEST, read_manifest
from lraee_core.config import BackboneConfig
from lraee_core.errors import BackboneError, CheckpointError
from lraee_core.quantize import quantize_vision
from lraee_core.random_init import untrained_checkpoint
from lraee_core.static_quant import (
    RANGES_FILE,
    ActivationRanges,
    FakeQuantLinear,
    StaticInt8Linear,
    affine_qparams,
    observe_ranges,
)

MODULES_PER_BLOCK = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def _images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp32(tiny_config: BackboneConfig) -> ClipBackbone:
    return build_backbone(tiny_config)


@pytest.fixture(scope="module")
def ranges(fp32: ClipBackbone) -> ActivationRanges:
    images = _images(16, fp32.shape.image_size, seed=1)  # calibration images, never the ones tests compare on
    return observe_ranges(fp32.visual, [images[:8], images[8:]])


def test_observer_covers_every_projection_and_leaves_the_tower_alone(fp32: ClipBackbone) -> None:
    before = {name: value.clone() for name, value in fp32.visual.state_dict().items()}
    observed = observe_ranges(fp32.visual, [_images(4, fp32.shape.image_size)])
    expected = {f"transformer.resblocks.{i}.{m}" for i in range(fp32.shape.num_layers) for m in MODULES_PER_BLOCK}
    assert set(observed.inputs) == set(observed.outputs) == expected
    assert observed.images == 4 and observed.method == "minmax"
    assert all(low < high for low, high in observed.inputs.values())
    assert isinstance(fp32.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)
    after = fp32.visual.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_static_converts_all_48_linears_to_real_int8_kernels(fp32: ClipBackbone, ranges: ActivationRanges) -> None:
    static = copy.deepcopy(fp32)
    report = quantize_vision(static.visual, "static", ranges)
    assert len(report.converted) == 48 and report.mode == "static"
    assert "transformer.resblocks.11.attn.in_proj" in report.converted
    block = static.visual.transformer.resblocks[11]
    assert isinstance(block.attn.in_proj, StaticInt8Linear) and isinstance(block.mlp.c_fc, StaticInt8Linear)
    assert block.mlp.c_fc.quantized.weight().dtype == torch.qint8
    images = _images(4, fp32.shape.image_size)
    reference = fp32.encode_image_staged(images)
    batched = static.encode_image_staged(images)
    assert not torch.equal(reference, batched)  # something was really quantized
    assert F.cosine_similarity(reference, batched).min() > 0.99
    # fixed scales: an image's answer does not depend on its batch mates
    alone = torch.cat([static.encode_image_staged(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_int8_kernel_matches_quantize_dequantize_arithmetic() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    input_range, output_range = (-3.0, 3.5), (-2.5, 2.0)
    kernel = StaticInt8Linear(linear, input_range, output_range)(x)
    # the same arithmetic in FP32: 7-bit input, per-channel symmetric INT8 weights, 8-bit output
    in_scale, in_zero = affine_qparams(*input_range, 127)
    xq = torch.fake_quantize_per_tensor_affine(x, in_scale, in_zero, 0, 127)
    w_scale = linear.weight.detach().abs().amax(dim=1) / 127
    wq = torch.round(linear.weight.detach() / w_scale[:, None]) * w_scale[:, None]
    out_scale, out_zero = affine_qparams(*output_range, 255)
    expected = torch.fake_quantize_per_tensor_affine(F.linear(xq, wq, linear.bias), out_scale, out_zero, 0, 255)
    assert (kernel - expected).abs().max() <= out_scale * 1.01  # at most one output step (rounding ties)
    assert (kernel == expected).float().mean() > 0.95


def test_fewer_activation_bits_add_noise(fp32: ClipBackbone, ranges: ActivationRanges) -> None:
    images = _images(4, fp32.shape.image_size)
    with torch.inference_mode():
        reference = fp32.visual(images)
        cosine = {}
        for mode in ("static", "static-a6", "static-a4"):
            visual = copy.deepcopy(fp32.visual)
            report = quantize_vision(visual, mode, ranges)
            assert len(report.converted) == 48
            cosine[mode] = float(F.cosine_similarity(reference, visual(images)).mean())
    assert cosine["static"] > cosine["static-a6"] > cosine["static-a4"]
    assert isinstance(visual.transformer.resblocks[0].mlp.c_fc, FakeQuantLinear)  # a4 is simulated


def test_static_needs_ranges_for_every_module(fp32: ClipBackbone, ranges: ActivationRanges) -> None:
    with pytest.raises(BackboneError, match="needs activation ranges calibrated offline"):
        quantize_vision(copy.deepcopy(fp32.visual), "static")
    partial = ActivationRanges(
        {k: v for k, v in ranges.inputs.items() if "resblocks.3." not in k}, ranges.outputs, ranges.images
    )
    with pytest.raises(BackboneError, match=r"name no 'transformer\.resblocks\.3\."):
        quantize_vision(copy.deepcopy(fp32.visual), "static", partial)


def test_ranges_file_round_trip_and_rejects_nonsense(tmp_path: Path, ranges: ActivationRanges) -> None:
    path = tmp_path / RANGES_FILE
    ranges.save(path)
    assert ActivationRanges.load(path) == ranges
    from safetensors.torch import save_file

    save_file({"transformer.resblocks.0.mlp.c_fc.input": torch.tensor([2.0, 1.0])}, str(path))
    with pytest.raises(ValueError, match="min 2.0 > max 1.0"):
        ActivationRanges.load(path)


@pytest.fixture(scope="module")
def static_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: BackboneConfig, fp32: ClipBackbone, ranges: ActivationRanges
) -> Path:
    directory = tmp_path_factory.mktemp("static-ckpt")
    untrained_checkpoint(directory, tiny_config, quant_mode="static", activation_ranges=ranges, backbone=fp32)
    return directory


def test_static_checkpoint_carries_its_ranges_and_loads_without_data(
    static_checkpoint: Path, ranges: ActivationRanges, fp32: ClipBackbone
) -> None:
    manifest = read_manifest(static_checkpoint)
    assert manifest.quant_mode == "static" and manifest.quantized_modules == 48
    assert manifest.activation_ranges == RANGES_FILE  # relative: the checkpoint moves as a folder
    assert ActivationRanges.load(static_checkpoint / RANGES_FILE) == ranges
    classifier = load_classifier(static_checkpoint)
    assert classifier.quant_report.mode == "static" and len(classifier.quant_report.converted) == 48
    images = _images(2, fp32.shape.image_size)
    reference = fp32.encode_image_staged(images)
    assert F.cosine_similarity(reference, classifier.backbone.encode_image_staged(images)).min() > 0.99
    stressed = load_classifier(static_checkpoint, quant_mode="static-a4")  # same ranges, fewer bits
    assert stressed.quant_report.mode == "static-a4"


def test_static_checkpoint_refusals(
    tmp_path: Path, static_checkpoint: Path, tiny_checkpoint: Path, ranges: ActivationRanges
) -> None:
    with pytest.raises(CheckpointError, match="torch backend only"):
        load_classifier(static_checkpoint, backend="onnxruntime")
    assert load_classifier(static_checkpoint, backend="auto").backend == "torch"  # auto: the static modes' backend
    with pytest.raises(CheckpointError, match="carries no calibrated activation ranges"):
        load_classifier(tiny_checkpoint, quant_mode="static")  # a paper checkpoint has none
    assert len(load_classifier(tiny_checkpoint, quant_mode="static", activation_ranges=ranges).quant_report.converted)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for item in static_checkpoint.iterdir():
        (tampered / item.name).write_bytes(item.read_bytes())
    copy_ranges = ActivationRanges({**ranges.inputs}, {**ranges.outputs}, ranges.images + 1)
    copy_ranges.save(tampered / RANGES_FILE)
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_classifier(tampered)
    data = json.loads((tampered / MANIFEST).read_text())
    data["activation_ranges"] = None
    (tampered / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="needs its calibrated activation ranges file"):
        read_manifest(tampered)
    data["activation_ranges"] = "../elsewhere.safetensors"
    (tampered / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="must lie inside the checkpoint"):
        read_manifest(tampered)
