"""What the two quantizers (dynamic :mod:`lraee_core.quantize`, static :mod:`lraee_core.static_quant`) share: the
report of what was converted, and open_clip's attention with its projections as separate, swappable Linears."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantMode
from .errors import BackboneError


@dataclass(frozen=True)
class QuantReport:
    """What quantization did to the vision tower."""

    mode: QuantMode  # the requested mode
    converted: tuple[str, ...]  # names (relative to the vision tower) of the modules now running INT8 weights


class ProjectedSelfAttention(nn.Module):
    """Self-attention equal to a batch-first ``nn.MultiheadAttention``, with its projections as separate modules.

    Called as open_clip's ResidualAttentionBlock calls its ``attn``: ``attn(q, k, v, need_weights=False,
    attn_mask=...)[0]`` with ``q is k is v``. The projections start as FP32 ``nn.Linear`` copies (so observers can
    see their inputs and outputs) and are swapped for quantized ones (:mod:`lraee_core.quantize`,
    :mod:`lraee_core.static_quant`).
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        if not attention.batch_first or attention.in_proj_weight is None:
            raise BackboneError("quantizing attention needs batch-first self-attention with a packed in_proj")
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.in_proj: nn.Module = nn.Linear(width, 3 * width, bias=attention.in_proj_bias is not None)
        self.out_proj: nn.Module = nn.Linear(width, width, bias=attention.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.in_proj_bias is not None:
                self.in_proj.bias.copy_(attention.in_proj_bias)
            if attention.out_proj.bias is not None:
                self.out_proj.bias.copy_(attention.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        batch, tokens, width = query.shape
        qkv = self.in_proj(query).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width)), None
