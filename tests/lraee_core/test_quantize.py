from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lraee_core.backbone import ClipBackbone, build_backbone
from lraee_core.config import BackboneConfig
from lraee_core.errors import BackboneError
from lraee_core.quantize import PerImageDynamicLinear, quantize_vision


@pytest.fixture(scope="module")
def vit_b32() -> ClipBackbone:
    return build_backbone(BackboneConfig("ViT-B-32"))


def test_paper_mode_converts_exactly_the_24_mlp_linears_of_vit_b32(vit_b32: ClipBackbone) -> None:
    visual = copy.deepcopy(vit_b32.visual)
    report = quantize_vision(visual, "paper")
    expected = tuple(f"transformer.resblocks.{i}.mlp.{name}" for i in range(12) for name in ("c_fc", "c_proj"))
    assert report.converted == expected
    assert len(report.converted) == 24
    # attention in_proj is a bare parameter and out_proj a NonDynamicallyQuantizableLinear: both stay FP32
    attention = visual.transformer.resblocks[0].attn
    assert attention.in_proj_weight.dtype == torch.float32
    assert isinstance(attention.out_proj.weight, torch.Tensor)


def test_full_mode_also_converts_attention_projections(vit_b32: ClipBackbone) -> None:
    report = quantize_vision(copy.deepcopy(vit_b32.visual), "full")
    assert len(report.converted) == 48
    assert "transformer.resblocks.11.attn.in_proj" in report.converted
    assert "transformer.resblocks.11.attn.out_proj" in report.converted


def test_none_mode_and_unknown_mode(vit_b32: ClipBackbone) -> None:
    assert quantize_vision(copy.deepcopy(vit_b32.visual), "none").converted == ()
    with pytest.raises(BackboneError, match="unknown quant mode"):
        quantize_vision(copy.deepcopy(vit_b32.visual), "int4")  # type: ignore[arg-type]


def test_text_tower_is_never_quantized(tiny_config: BackboneConfig) -> None:
    backbone = build_backbone(tiny_config)
    quantize_vision(backbone.visual, "full")
    text_modules = [m for name, m in backbone.model.named_modules() if not name.startswith("visual")]
    assert not any(isinstance(m, PerImageDynamicLinear) for m in text_modules)


@pytest.mark.parametrize("mode", ["paper", "full"])
def test_int8_stays_close_to_fp32_and_is_batch_independent(tiny_config: BackboneConfig, mode: str) -> None:
    fp32 = build_backbone(tiny_config)
    int8 = build_backbone(tiny_config)
    quantize_vision(int8.visual, mode)  # type: ignore[arg-type]
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = fp32.encode_image_staged(images)
    batched = int8.encode_image_staged(images)
    assert F.cosine_similarity(reference, batched).min() > 0.98
    assert not torch.equal(reference, batched)  # something was really quantized
    alone = torch.cat([int8.encode_image_staged(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
