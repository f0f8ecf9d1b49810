"""Build an open_clip CLIP whose image tower is a ViT, and run its vision tower block by block.

The staged forward (``embed`` -> ``block`` x L -> ``pool_final``) reproduces ``model.encode_image`` exactly; the
exit heads read the hidden state between blocks (``pool_ssa`` / ``pool_cls``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from .config import BackboneConfig, HeadConfig
from .errors import BackboneError
from .gate import GateAnswer, GateQuestion, answer_gate

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def sha256_of_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES) or Path(pretrained).exists()


@dataclass(frozen=True)
class VisionShape:
    """Numbers of the vision tower that FLOPs, heads and checkpoints depend on."""

    num_layers: int  # transformer blocks
    width: int  # token width D
    num_heads: int  # attention heads
    mlp_width: int  # hidden width of each block's MLP
    num_tokens: int  # tokens per image: 1 [CLS] + grid patches
    patch_size: int  # square patch side in pixels
    image_size: int  # square input side in pixels
    embed_dim: int  # joint embedding width (output of the final projection)


class SpanHead(Protocol):
    """What a span needs of an exit head (:class:`lraee_core.heads.ExitHead`)."""

    config: HeadConfig

    def pool(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [B, T, D] -> [B, D]

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor: ...  # [B, D] -> unit [B, E]


@dataclass(frozen=True)
class SpanOutput:
    """What one run of blocks gives the engine (:meth:`ClipBackbone.span`)."""

    hidden: torch.Tensor  # [B, T, D] state after the span's last block
    exit: torch.Tensor | None  # [B, E] unit embedding of the exit head at the last block (None: no head given)
    final: torch.Tensor | None  # [B, E] unit full-depth embedding (None: not asked, or the span ends before it)
    gate: GateAnswer | None = None  # the exit gate's verdict on the head's embedding (None: no gate asked)


class ClipBackbone:
    """An open_clip CLIP with a ViT image tower, evaluated block by block.

    ``visual`` may be replaced by a quantized copy (see :mod:`lraee_core.quantize`); the text tower is never touched.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[..., torch.Tensor],
        config: BackboneConfig,
        weights_sha256: str | None,
    ) -> None:
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise BackboneError(
                f"{config.model_name!r} has a {type(visual).__name__} image tower; LRA-EE needs an open_clip "
                "VisionTransformer (a ViT-* model)"
            )
        if visual.attn_pool is not None:
            raise BackboneError(
                f"{config.model_name!r} pools with an attentional pooler; LRA-EE supports [CLS] ('tok') or "
                "average pooling ViTs"
            )
        if not visual.transformer.batch_first:
            raise BackboneError(f"{config.model_name!r}: expected a batch-first transformer")
        self.model: Any = model.eval()  # open_clip.CLIP; typed Any since its attributes are dynamic
        self.visual: VisionTransformer = visual
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.config = config
        self.weights_sha256 = weights_sha256
        block0 = visual.transformer.resblocks[0]
        grid = visual.grid_size
        self.shape = VisionShape(
            num_layers=len(visual.transformer.resblocks),
            width=visual.transformer.width,
            num_heads=block0.attn.num_heads,
            mlp_width=block0.mlp.c_fc.out_features,
            num_tokens=1 + grid[0] * grid[1],
            patch_size=visual.patch_size[0],
            image_size=visual.image_size[0],
            embed_dim=visual.output_dim,
        )

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Architecture name plus weights source, e.g. ``ViT-B-32/openai``."""
        return f"{self.config.model_name}/{self.config.pretrained or 'random-init'}"

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, exp(logit_scale)."""
        return float(self.model.logit_scale.exp().item())

    # ---- staged vision forward ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + positions + ln_pre: [B, 3, H, W] -> layer 0, [B, T, D]."""
        return self.visual._embeds(images)

    def block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run block number ``layer`` (1-based) on layer ``layer - 1``'s state: [B, T, D] -> [B, T, D]."""
        return self.visual.transformer.resblocks[layer - 1](hidden)

    def blocks(self, first: int, last: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run blocks ``first``..``last`` (1-based, inclusive) on layer ``first - 1``'s state: [B, T, D] -> [B, T, D].

        The engine only reads the hidden state at candidate layers, so it may run the blocks between two of them as
        one call; a backend that compiles a run of blocks into one graph (onnxruntime) saves a call per block."""
        for layer in range(first, last + 1):
            hidden = self.block(layer, hidden)
        return hidden

    def span(
        self,
        first: int,
        last: int,
        hidden: torch.Tensor,
        head: SpanHead | None = None,
        final: bool = False,
        gate: GateQuestion | None = None,
    ) -> SpanOutput:
        """Blocks ``first``..``last`` on layer ``first - 1``'s state, then what the engine reads there: the unit
        embedding of ``head`` (an exit head at layer ``last``), the verdict of its ``gate`` on it (needs ``head``)
        and, with ``final`` and ``last`` the top block, the unit full-depth embedding. ``first = 0`` starts from the
        images: ``hidden`` is then the preprocessed batch [B, 3, H, W] and the embedding stage runs first. A backend
        that compiles spans (onnxruntime) computes all of it inside the span's graph, saving a call and the per-op
        overhead of small PyTorch ops at every candidate layer."""
        if gate is not None and head is None:
            raise ValueError("a gate reads an exit head's embedding: pass the head too")
        if first == 0:
            hidden, first = self.embed(hidden), 1
        hidden = self.blocks(first, last, hidden)
        exit_embedding = None if head is None else head(head.pool(hidden))
        top = final and last == self.shape.num_layers
        answer = None
        if gate is not None and exit_embedding is not None:
            answer = answer_gate(gate, exit_embedding, hidden)
        return SpanOutput(hidden, exit_embedding, self.final_embedding(hidden) if top else None, answer)

    def final_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """The unit full-depth image embedding from the top block's state: [B, T, D] -> [B, E] float32."""
        return torch.nn.functional.normalize(self.pool_final(hidden).float(), dim=-1)

    def pool_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-depth pooling and projection exactly as open_clip does it: [B, T, D] -> [B, E] (unnormalised)."""
        pooled, _ = self.visual._pool(hidden)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    @staticmethod
    def pool_ssa(hidden: torch.Tensor) -> torch.Tensor:
        """Spatio-semantic aggregation: mean of the patch tokens, [CLS] excluded: [B, T, D] -> [B, D]."""
        return hidden[:, 1:].mean(dim=1)

    @staticmethod
    def pool_cls(hidden: torch.Tensor) -> torch.Tensor:
        """The [CLS] token: [B, T, D] -> [B, D]."""
        return hidden[:, 0]

    @torch.inference_mode()
    def encode_image_staged(self, images: torch.Tensor) -> torch.Tensor:
        """Full-depth image features through the staged path (equals ``model.encode_image``)."""
        hidden = self.embed(images)
        for layer in range(1, self.shape.num_layers + 1):
            hidden = self.block(layer, hidden)
        return self.pool_final(hidden)

    # ---- text ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised FP32 text embeddings of ``texts``: [N, E].

        open_clip pads every prompt to the full context (77 tokens for ViT-B-32). CLIP's text tower is causal and
        pools the end-of-text token, so positions after the longest prompt's end cannot change any result: this runs
        only those first positions (typically 10-20), several times less work, with the same embeddings. Towers
        that do not fit that pattern (non-causal, other pooling, custom text models) take open_clip's own path.
        """
        tokens = self.tokenizer(texts)
        features = self._encode_trimmed(tokens) if self._trimmable_text() else self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_text_full_context(self, texts: list[str]) -> torch.Tensor:
        """open_clip's own ``encode_text`` over the padded context (the reference of :meth:`encode_text`)."""
        features = self.model.encode_text(self.tokenizer(texts))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def _trimmable_text(self) -> bool:
        model = self.model
        transformer = getattr(model, "transformer", None)
        return (
            getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None
            and getattr(transformer, "batch_first", False)
            and getattr(model, "text_projection", None) is not None
            and getattr(model, "cls_emb", None) is None
        )

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        # The end-of-text token has the highest id, so argmax finds it even when a prompt holds id 0 ("!").
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]  # [N, n]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)  # [N, n, W]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # [N, W] the end-of-text token
        projection = model.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


def _register_config(config_file: str) -> None:
    path = Path(config_file)
    if not path.is_file():
        raise BackboneError(f"model config file not found: {path} (expected an open_clip JSON architecture)")
    open_clip.add_model_config(path)


def build_backbone(config: BackboneConfig, *, cache_dir: str | None = None) -> ClipBackbone:
    """Build the FP32 backbone described by ``config``; raise :class:`BackboneError` with the reason on failure."""
    model, preprocess, tokenizer, weights_sha256 = create_model(config, cache_dir=cache_dir)
    return ClipBackbone(model, preprocess, tokenizer, config, weights_sha256)


def create_model(
    config: BackboneConfig,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    output_dict: bool = False,
) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor], str | None]:
    """The one factory of this project's CLIPs, any open_clip model and the tiny ones from their JSON config alike:
    open_clip's model for ``config``, its evaluation preprocessing, its tokenizer and the SHA-256 of its weights
    (None for a random init). :func:`build_backbone` stages it for the engine; the tiny-CLIP trainers
    (``training.embedded.trainer``) train it (``output_dict``: the model's forward returns a dict).
    A random init is drawn from ``config.random_init_seed`` (the global torch RNG is seeded with it).
    :class:`BackboneError` with the reason on failure."""
    if config.model_config_file is not None:
        _register_config(config.model_config_file)
    if config.model_name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model {config.model_name!r}; expected one of open_clip.list_models() "
            "(e.g. 'ViT-B-32') or a name registered from a JSON config"
        )
    pretrained = config.pretrained
    weights_sha256: str | None = None
    if pretrained is not None and _looks_like_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise BackboneError(f"weights file not found: {path} (expected {config.model_name} weights)")
        weights_sha256 = sha256_of_file(path)
    elif pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(config.model_name)
        if pretrained not in tags:
            raise BackboneError(
                f"unknown pretrained tag {pretrained!r} for {config.model_name}; open_clip knows {sorted(tags)}"
            )
    else:
        torch.manual_seed(config.random_init_seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.model_name, pretrained=pretrained, cache_dir=cache_dir, device=device, output_dict=output_dict
            )
    except Exception as exc:  # mismatched state dict, hub download without network, unreadable file, ...
        hint = ""
        if pretrained is not None and weights_sha256 is None:
            hint = " (pretrained tags are downloaded from the hub; offline, pass a local weights file instead)"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(f"could not load weights {pretrained!r} into {config.model_name}: {reason}{hint}") from exc
    if pretrained is not None and weights_sha256 is None:
        weights_sha256 = _hub_file_sha256(config.model_name, pretrained, cache_dir)
    return model, preprocess, open_clip.get_tokenizer(config.model_name), weights_sha256


def _hub_file_sha256(model_name: str, tag: str, cache_dir: str | None) -> str | None:
    """SHA-256 of the downloaded file of a pretrained tag, when open_clip can tell where it is."""
    try:
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception:  # the hash is informative only; a missing one must not break loading
        return None
    return sha256_of_file(path) if path and Path(path).is_file() else None
