"""Proposal, prototyped: encode label prompts with the context trimmed to the longest prompt of the chunk.

open_clip pads every prompt to the full context (77 tokens for ViT-B-32), but CLIP's text tower is causal and pools
the end-of-text token, so the padding after it cannot change the result: running only the first ``n`` positions
(``n`` = the longest prompt in the chunk, ~10-20 tokens for ImageNet prompts) gives the same embeddings for a
fraction of the work. This is a candidate body for ``ClipBackbone.encode_text``; the benchmark measures it beside
the engine's own cold encoding and reports the largest difference between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lraee_core.backbone import ClipBackbone


def trimmed_encoder(backbone: ClipBackbone) -> Callable[[list[str]], torch.Tensor] | None:
    """A drop-in for ``backbone.encode_text`` that skips the padding, or None for text towers it does not fit
    (non-causal, not pooled at the end-of-text token, or not batch-first)."""
    model = backbone.model
    mask = getattr(model, "attn_mask", None)
    if (
        getattr(model, "text_pool_type", None) != "argmax"
        or mask is None
        or not getattr(model.transformer, "batch_first", False)
        or getattr(model, "text_projection", None) is None
    ):
        return None

    @torch.inference_mode()
    def encode(texts: list[str]) -> torch.Tensor:
        tokens = backbone.tokenizer(texts)
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length]  # [N, n]
        x = model.token_embedding(tokens) + model.positional_embedding[:length]  # [N, n, W]
        x = model.ln_final(model.transformer(x, attn_mask=mask[:length, :length]))
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # the end-of-text token, [N, W]
        projection = model.text_projection
        features = projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
        return F.normalize(features.float(), dim=-1)

    return encode
