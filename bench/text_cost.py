"""What a label set costs in text encoding: cold (fresh cache, every prompt through the text tower) vs cached.

Measured through the engine's own :class:`~lraee_core.text.TextEmbeddingCache` with the engine's default templates,
and once more through open_clip's own full-context ``encode_text`` (every prompt padded to the whole context),
which is what the engine did before it trimmed the context to the longest prompt.
The last cold cache is handed back so the benchmark's engines share it instead of encoding the set again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lraee_core.engine import EarlyExitClassifier
from lraee_core.text import DEFAULT_TEMPLATES, TextEmbeddingCache

from .timing import median


@dataclass
class TextCost:
    """Seconds to get the embeddings of one label set (medians; each run's seconds kept)."""

    labels: int  # labels in the set
    templates: int  # prompts per label
    cold_s: float  # median over fresh caches
    cached_s: float  # median over a filled cache
    cold_runs_s: list[float]
    cached_runs_s: list[float]
    full_context_cold_s: float | None = None  # median cold seconds through open_clip's padded encode_text
    full_context_cold_runs_s: list[float] | None = None
    full_context_max_abs_difference: float | None = None  # largest |full context - engine| over FP16 embeddings

    @property
    def cold_over_cached(self) -> float:
        """How many times a cold label set costs a cached one."""
        return self.cold_s / self.cached_s


def measure_text_cost(
    engine: EarlyExitClassifier,
    labels: Sequence[str],
    *,
    cold_repeats: int,
    cached_repeats: int,
    full_context: bool = False,
) -> tuple[TextCost, TextEmbeddingCache]:
    """Time ``labels`` cold ``cold_repeats`` times and cached ``cached_repeats`` times; returns the filled cache.

    ``full_context`` also times open_clip's own padded ``encode_text`` (the one the engine's trimmed encoder
    replaced; minutes on ViT-B-32, so only on request)."""
    cold, cache = _cold(engine, engine.backbone.encode_text, labels, cold_repeats)
    cached = []
    embeddings = cache.get(labels, DEFAULT_TEMPLATES)
    for _ in range(cached_repeats):
        started = time.perf_counter()
        cache.get(labels, DEFAULT_TEMPLATES)
        cached.append(time.perf_counter() - started)
    cost = TextCost(len(labels), len(DEFAULT_TEMPLATES), median(cold), median(cached), cold, cached)
    if not full_context:
        return cost, cache
    full_runs, full_cache = _cold(engine, engine.backbone.encode_text_full_context, labels, cold_repeats)
    difference = (full_cache.get(labels, DEFAULT_TEMPLATES).float() - embeddings.float()).abs().max()
    cost.full_context_cold_s = median(full_runs)
    cost.full_context_cold_runs_s = full_runs
    cost.full_context_max_abs_difference = float(difference)
    return cost, cache


def _cold(
    engine: EarlyExitClassifier, encode: Callable[[list[str]], torch.Tensor], labels: Sequence[str], repeats: int
) -> tuple[list[float], TextEmbeddingCache]:
    """Seconds to fill a fresh cache with ``labels``, ``repeats`` times; returns the last cache filled."""
    encode([DEFAULT_TEMPLATES[0].format(labels[0])])  # first-call set-up, excluded
    seconds: list[float] = []
    cache = engine.text_cache
    for _ in range(max(1, repeats)):
        cache = TextEmbeddingCache(encode, engine.checkpoint_id, capacity=max(engine.text_cache.capacity, len(labels)))
        started = time.perf_counter()
        cache.get(labels, DEFAULT_TEMPLATES)
        seconds.append(time.perf_counter() - started)
    return seconds, cache
