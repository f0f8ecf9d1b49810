from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from lraee_core.errors import InputError
from lraee_core.text import DEFAULT_TEMPLATES, TextEmbeddingCache, validate_labels, validate_templates


class CountingEncoder:
    """Deterministic fake text tower: counts every prompt it is asked to encode."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.prompts.extend(prompts)
        rows = [torch.randn(8, generator=torch.Generator().manual_seed(hash(p) % 2**31)) for p in prompts]
        return F.normalize(torch.stack(rows), dim=-1)


def test_default_templates_are_open_clips_simple_ones() -> None:
    assert len(DEFAULT_TEMPLATES) == len(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    assert DEFAULT_TEMPLATES[0] == open_clip.SIMPLE_IMAGENET_TEMPLATES[0]("{}")
    assert all("{}" in t for t in DEFAULT_TEMPLATES)


def test_only_missing_labels_are_encoded_and_repeats_cost_nothing() -> None:
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder, model_id="m")
    templates = ("a photo of a {}.", "a {}")
    first = cache.get(["cat", "dog"], templates)
    assert first.dtype == torch.float16 and first.shape == (2, 8)
    assert len(encoder.prompts) == 4
    again = cache.get(["dog", "cat", "bird"], templates)
    assert len(encoder.prompts) == 6  # only "bird" x 2 templates
    torch.testing.assert_close(again[0], first[1])
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)
    cache.get(["cat", "dog", "bird"], templates)
    assert len(encoder.prompts) == 6


def test_prompt_ensemble_is_the_renormalised_mean() -> None:
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder, model_id="m")
    templates = ("a {}", "the {}")
    got = cache.get(["cat"], templates)[0].float()
    expected = F.normalize(encoder(["a cat", "the cat"]).mean(0), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_lru_is_bounded_and_keyed_by_templates_and_model() -> None:
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder, model_id="m", capacity=3)
    cache.get(["a", "b", "c"], ("{}",))
    cache.get(["a"], ("{}",))  # refresh "a"
    cache.get(["d"], ("{}",))  # evicts "b", the least recently used
    assert len(cache) == 3
    before = len(encoder.prompts)
    cache.get(["a", "c", "d"], ("{}",))
    assert len(encoder.prompts) == before
    cache.get(["b"], ("{}",))
    assert len(encoder.prompts) == before + 1
    cache.get(["b"], ("photo of {}",))  # other templates: another key
    assert len(encoder.prompts) == before + 2


def test_label_and_template_validation() -> None:
    assert validate_labels([" cat ", "dog"], 5) == ("cat", "dog")
    for bad, message in [
        ([], "at least one label"),
        (["a", "b", "c"], "too many labels"),
        (["cat", "cat"], "duplicate label"),
        (["  "], "non-empty"),
        (["x" * 300], "longer than 200"),
    ]:
        with pytest.raises(InputError, match=message):
            validate_labels(bad, 2)
    with pytest.raises(InputError, match="must contain"):
        validate_templates(["a photo of a cat"])
    with pytest.raises(InputError, match="must not be empty"):
        validate_templates([])


def test_lookup_never_encodes_and_answers_only_fully_cached_label_sets() -> None:
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(encoder, model_id="m")
    templates = ("a {}",)
    assert cache.lookup(["cat"], templates) is None
    encoded = cache.get(["cat", "dog"], templates)
    assert cache.lookup(["dog", "bird"], templates) is None  # one label missing: no partial answer
    assert len(encoder.prompts) == 2
    found = cache.lookup(["dog", "cat"], templates)
    assert found is not None and torch.equal(found, encoded.flip(0))
    assert cache.lookup(["cat"], ("another {}",)) is None  # keyed by templates too
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    rows = cache.lookup_rows(["cat", "dog"], templates)
    assert rows is not None and torch.equal(torch.stack(rows), encoded)  # the rows the stacked look-up is made of
    assert cache.lookup_rows(["cat", "emu"], templates) is None
