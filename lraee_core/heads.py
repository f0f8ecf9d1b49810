"""Spatio-Semantic Aggregation (SSA) exit heads.

At a candidate layer the head reads the mean of the patch tokens (the [CLS] token at shallow depth has not yet
gathered the image; the paper's point), normalises it, and projects it with a 2-layer GELU MLP into CLIP's joint
embedding space, where it is compared by cosine with the label prompts' text embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ClipBackbone
from .config import HeadConfig
from .gate import class_logits as class_logits  # the zero-shot logits, defined beside the gate that reads them


class ExitHead(nn.Module):
    """LayerNorm -> Linear(width, hidden) -> GELU -> Linear(hidden, embed_dim) -> L2 normalisation."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.width)
        self.fc1 = nn.Linear(config.width, config.hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_dim, config.embed_dim)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input from a layer's hidden state: [B, T, D] -> [B, D]."""
        if self.config.pooling == "ssa":
            return ClipBackbone.pool_ssa(hidden)
        return ClipBackbone.pool_cls(hidden)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled tokens [B, D] -> unit-norm joint-space embeddings [B, E]."""
        return F.normalize(self.fc2(self.act(self.fc1(self.norm(pooled)))), dim=-1)
