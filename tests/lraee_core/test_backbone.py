from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from lraee_core.backbone import ClipBackbone, build_backbone, sha256_of_file
from lraee_core.config import BackboneConfig
from lraee_core.errors import BackboneError


def _images(backbone: ClipBackbone, n: int = 3) -> torch.Tensor:
    size = backbone.shape.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vit_b32() -> ClipBackbone:
    return build_backbone(BackboneConfig("ViT-B-32"))


@pytest.fixture(scope="module")
def vit_b32_weights(tmp_path_factory: pytest.TempPathFactory, vit_b32: ClipBackbone) -> Path:
    """Random ViT-B-32 weights of the real shape written to a local file, as a user's weights would be."""
    path = tmp_path_factory.mktemp("weights") / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in vit_b32.model.state_dict().items()}, str(path))
    return path


def test_tiny_staged_forward_equals_encode_image(tiny_config: BackboneConfig) -> None:
    backbone = build_backbone(tiny_config)
    images = _images(backbone)
    with torch.inference_mode():
        expected = backbone.model.encode_image(images)
    torch.testing.assert_close(backbone.encode_image_staged(images), expected, rtol=1e-5, atol=1e-6)
    assert backbone.shape.num_layers == 12
    assert backbone.shape.num_tokens == 1 + (64 // 8) ** 2


def test_vit_b32_staged_forward_equals_encode_image(vit_b32: ClipBackbone) -> None:
    images = _images(vit_b32, 2)
    with torch.inference_mode():
        expected = vit_b32.model.encode_image(images)
    torch.testing.assert_close(vit_b32.encode_image_staged(images), expected, rtol=1e-5, atol=1e-5)
    shape = vit_b32.shape
    assert (shape.num_layers, shape.width, shape.num_tokens, shape.embed_dim) == (12, 768, 50, 512)


def test_vit_b32_local_weights_file_is_the_real_path(vit_b32: ClipBackbone, vit_b32_weights: Path) -> None:
    loaded = build_backbone(BackboneConfig("ViT-B-32", pretrained=str(vit_b32_weights)))
    assert loaded.weights_sha256 == sha256_of_file(vit_b32_weights)
    images = _images(vit_b32, 1)
    torch.testing.assert_close(loaded.encode_image_staged(images), vit_b32.encode_image_staged(images))


def test_resnet_tower_is_refused() -> None:
    with pytest.raises(BackboneError, match="VisionTransformer"):
        build_backbone(BackboneConfig("RN50"))


def test_missing_weights_file_is_named() -> None:
    with pytest.raises(BackboneError, match="weights file not found: .*nope.safetensors"):
        build_backbone(BackboneConfig("ViT-B-32", pretrained="/nonexistent/nope.safetensors"))


def test_weights_of_the_wrong_shape_name_the_expected_model(tmp_path: Path, tiny_config: BackboneConfig) -> None:
    tiny = build_backbone(tiny_config)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="could not load weights .* into ViT-B-32"):
        build_backbone(BackboneConfig("ViT-B-32", pretrained=str(path)))


def test_unknown_tag_and_unknown_model_are_explained() -> None:
    with pytest.raises(BackboneError, match="unknown pretrained tag 'no-such-tag' for ViT-B-32; open_clip knows"):
        build_backbone(BackboneConfig("ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(BackboneError, match="unknown open_clip model 'ViT-Q-99'"):
        build_backbone(BackboneConfig("ViT-Q-99"))
    with pytest.raises(BackboneError, match="model config file not found"):
        build_backbone(BackboneConfig("x", model_config_file="/nonexistent/x.json"))


def test_known_tag_needs_the_hub_and_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(
        BackboneError, match="could not load weights 'openai' into ViT-B-32: .*no network.*pass a local weights file"
    ):
        build_backbone(BackboneConfig("ViT-B-32", pretrained="openai"))


def test_text_embeddings_are_unit_fp32(tiny_config: BackboneConfig) -> None:
    backbone = build_backbone(tiny_config)
    text = backbone.encode_text(["a red circle", "a blue square"])
    assert text.dtype == torch.float32 and text.shape == (2, backbone.shape.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


PROMPTS = [
    "a photo of a cat.",
    "a bad photo of the Yahoo! (logo)",  # "!" is token id 0, the padding id
    "itap of a very long and winding description of a grey tabby cat sitting on a red carpet in the sun.",
    "x",
]


def test_trimmed_text_context_equals_open_clips_full_context(
    tiny_config: BackboneConfig, vit_b32: ClipBackbone
) -> None:
    for backbone in (build_backbone(tiny_config), vit_b32):
        assert backbone._trimmable_text()
        trimmed = backbone.encode_text(PROMPTS)
        full = backbone.encode_text_full_context(PROMPTS)
        assert trimmed.shape == full.shape == (len(PROMPTS), backbone.shape.embed_dim)
        torch.testing.assert_close(trimmed, full, atol=2e-5, rtol=0)
        # One prompt alone is trimmed to its own length and still agrees with the batch.
        torch.testing.assert_close(backbone.encode_text(PROMPTS[:1])[0], full[0], atol=2e-5, rtol=0)


def test_prompt_longer_than_the_context_is_truncated_like_open_clip(tiny_config: BackboneConfig) -> None:
    backbone = build_backbone(tiny_config)
    long_prompt = ["word " * 200]
    torch.testing.assert_close(
        backbone.encode_text(long_prompt), backbone.encode_text_full_context(long_prompt), atol=2e-5, rtol=0
    )
