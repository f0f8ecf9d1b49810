"""Analytic FLOPs against torch's FlopCounterMode.

FlopCounterMode does not count the fused attention kernels (MHA fast path, CPU SDPA), so the reference run disables
the fast path and routes attention through an explicit-matmul SDPA that it does count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lraee_core.backbone import ClipBackbone, build_backbone
from lraee_core.config import BackboneConfig, HeadConfig
from lraee_core.flops import flops_model
from lraee_core.heads import ExitHead, class_logits


def _math_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention as explicit matmuls (inference: no dropout, no causal mask, no GQA)."""
    scores = (query @ key.transpose(-2, -1)) * (scale or query.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1) @ value


@contextmanager
def counted_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    F.scaled_dot_product_attention = _math_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counted_attention(), counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", ["tiny", "ViT-B-32"])
def test_full_depth_blocks_and_heads_match_flop_counter(model: str, tiny_config: BackboneConfig) -> None:
    backbone: ClipBackbone = build_backbone(tiny_config if model == "tiny" else BackboneConfig("ViT-B-32"))
    shape = backbone.shape
    labels = 10
    cost = flops_model(shape, shape.width, labels)
    size = shape.image_size
    image = torch.randn(1, 3, size, size)
    text = F.normalize(torch.randn(labels, shape.embed_dim), dim=-1)

    def full_path() -> None:
        embedding = F.normalize(backbone.encode_image_staged(image), dim=-1)
        class_logits(embedding, text, 100.0)

    measured_full = _count(full_path)
    assert abs(measured_full - cost.full_depth) / cost.full_depth < 0.02

    hidden = backbone.embed(image)
    measured_block = _count(lambda: backbone.block(1, hidden))
    assert abs(measured_block - cost.block) / cost.block < 0.02

    head = ExitHead(HeadConfig(width=shape.width, hidden_dim=shape.width, embed_dim=shape.embed_dim)).eval()
    measured_head = _count(lambda: class_logits(head(head.pool(hidden)), text, 100.0))
    assert abs(measured_head - cost.head) / cost.head < 0.02


def test_vit_b32_per_stage_figures() -> None:
    """The numbers quoted in the docs: ViT-B-32 at 224 px, 50 tokens, 1000 labels, head hidden width 768."""
    from lraee_core.backbone import VisionShape

    shape = VisionShape(12, 768, 12, 3072, 50, 32, 224, 512)
    cost = flops_model(shape, 768, 1000)
    assert cost.block == 2 * 50 * 768 * (3 * 768 + 768 + 2 * 3072) + 4 * 50 * 50 * 768
    assert cost.head == 2 * 768 * 768 + 2 * 768 * 512 + 2 * 512 * 1000
    # leaving after block 9 of 12 with one head evaluated saves about a quarter
    saving = cost.saved(cost.spent(9, 1, False))
    assert 0.24 < saving < 0.25


def test_spent_and_expected_saving_of_the_paper_mix() -> None:
    from lraee_core.backbone import VisionShape

    shape = VisionShape(12, 768, 12, 3072, 50, 32, 224, 512)
    cost = flops_model(shape, 768, 1000)
    mix: dict[int | str, float] = {9: 0.45, 11: 0.25, 12: 0.15, "full": 0.15}
    saving = cost.expected_saving((9, 11, 12), mix)
    # 0.45 x 3/12 + 0.25 x 1/12 of the blocks, less the heads: just under the paper's 13.4 %
    assert 0.125 < saving < 0.134
    assert cost.spent(12, 3, True) > cost.full_depth  # a full-depth image pays for every head it passed
