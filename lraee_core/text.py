"""Label prompts -> prompt-ensembled, normalised FP16 text embeddings, with a bounded LRU cache.

The text tower runs in FP32 (it is never quantized) and only its output is stored in FP16, halving cache memory;
the logits upcast it back to FP32 for the matmul. A label set costs text encoding only for its labels that are not
in the cache, so a repeated label set costs none.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F

from .errors import InputError

MAX_LABEL_CHARS = 200


def _template_text(template: Callable[[str], str]) -> str:
    return template("{}")


# open_clip's 7 "simple" ImageNet templates, as "{}" format strings (they ship as lambdas).
DEFAULT_TEMPLATES: tuple[str, ...] = tuple(_template_text(t) for t in open_clip.SIMPLE_IMAGENET_TEMPLATES)


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Check custom templates: at least one, each a non-empty string containing ``{}``."""
    if not templates:
        raise InputError("templates must not be empty")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise InputError(f"template {template!r} must contain '{{}}' where the label goes")
    return tuple(templates)


def validate_labels(labels: Sequence[str], max_labels: int, max_chars: int = MAX_LABEL_CHARS) -> tuple[str, ...]:
    """Check a label set: 1..max_labels labels, each non-blank, at most ``max_chars`` long, no duplicates."""
    if not labels:
        raise InputError("at least one label is required")
    if len(labels) > max_labels:
        raise InputError(f"too many labels: {len(labels)} > {max_labels}")
    cleaned = []
    seen: set[str] = set()
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise InputError("labels must be non-empty strings")
        text = label.strip()
        if len(text) > max_chars:
            raise InputError(f"label longer than {max_chars} characters: {text[:40]!r}...")
        if text in seen:
            raise InputError(f"duplicate label: {text!r}")
        seen.add(text)
        cleaned.append(text)
    return tuple(cleaned)


@dataclass
class CacheStats:
    """Counters of the text cache (per label, not per request)."""

    hits: int = 0  # labels served from the cache
    misses: int = 0  # labels that had to be encoded


class TextEmbeddingCache:
    """Bounded LRU of prompt-ensembled label embeddings keyed by (model id, templates, label); thread-safe."""

    def __init__(
        self,
        encode: Callable[[list[str]], torch.Tensor],
        model_id: str,
        capacity: int = 4096,
        batch_size: int = 256,
    ) -> None:
        self._encode = encode  # prompts -> unit FP32 embeddings [N, E]
        self.model_id = model_id
        self.capacity = capacity
        self.batch_size = batch_size
        self._entries: OrderedDict[tuple[str, tuple[str, ...], str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def _embed_labels(self, labels: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """Prompt ensemble: mean over templates of unit prompt embeddings, renormalised -> FP16 [N, E]."""
        prompts = [template.replace("{}", label) for label in labels for template in templates]
        chunks = [self._encode(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]
        per_prompt = torch.cat(chunks).reshape(len(labels), len(templates), -1)  # [N, T, E]
        return F.normalize(per_prompt.mean(dim=1), dim=-1).half()

    def lookup_rows(
        self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> tuple[torch.Tensor, ...] | None:
        """Each label's FP16 unit embedding [E], in order, when every one is cached (counted as hits), else None.

        Pure dictionary work, no torch op: cheap on an event loop, where a torch call would release the GIL and
        then wait to get it back from a busy inference thread."""
        templates = tuple(templates)
        keys = [(self.model_id, templates, label) for label in labels]
        with self._lock:
            if any(key not in self._entries for key in keys):
                return None
            rows = tuple(self._entries[key] for key in keys)
            for key in keys:
                self._entries.move_to_end(key)
            self.stats.hits += len(keys)
        return rows

    def lookup(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor | None:
        """FP16 unit embeddings [K, E] of ``labels`` when every one is cached (counted as hits), else None; never
        encodes."""
        rows = self.lookup_rows(labels, templates)
        return None if rows is None else torch.stack(rows)

    def get(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """FP16 unit embeddings [K, E] of ``labels`` in order, encoding only the labels not cached yet."""
        templates = tuple(templates)
        keys = [(self.model_id, templates, label) for label in labels]
        with self._lock:
            found = {key: self._entries[key] for key in keys if key in self._entries}
            for key in found:
                self._entries.move_to_end(key)
        missing = list(dict.fromkeys(key[2] for key in keys if key not in found))
        if missing:
            # Encoding happens outside the lock so concurrent requests for other label sets are not serialised.
            fresh = self._embed_labels(missing, templates)
            with self._lock:
                for label, row in zip(missing, fresh, strict=True):
                    key = (self.model_id, templates, label)
                    found[key] = row
                    self._entries[key] = row
                    self._entries.move_to_end(key)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        with self._lock:
            self.stats.hits += len(keys) - len(missing)
            self.stats.misses += len(missing)
        return torch.stack([found[key] for key in keys])
