"""WordNet captions: synsets from Debian's WordNet 3.0, everyday words above a class, caption concepts."""

from __future__ import annotations

import random

import pytest

from training.embedded.captions import (
    EVERYDAY_CONCEPTS,
    WORDNET_DIR,
    WordNet,
    caption_pool,
    class_captions,
    concept_key,
    draw_caption,
    everyday_label_sets,
    unrelated_words,
)

pytestmark = pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").exists(), reason=f"WordNet 3.0 not installed at {WORDNET_DIR} (wordnet-base)"
)


@pytest.fixture(scope="module")
def net() -> WordNet:
    return WordNet()


def test_every_everyday_word_names_its_synset(net: WordNet) -> None:
    # The pinned offsets must be the senses a client means: the word (or its plural-free lemma) is a lemma there.
    lemma_aliases = {"pig": "swine", "cat": "house cat", "phone": "phone"}
    for word, wnid in EVERYDAY_CONCEPTS.items():
        lemmas = {w.lower() for w in net.synsets[wnid].words}
        assert lemma_aliases.get(word, word) in lemmas, (word, lemmas)


def test_chihuahua_is_a_dog_and_an_animal_but_not_a_cat(net: WordNet) -> None:
    found = net.everyday("n02085620")  # Chihuahua
    assert found[0] == "dog"
    assert "animal" in found and "cat" not in found
    assert found.index("dog") < found.index("animal")  # most specific first


def test_class_captions_concepts_cover_the_everyday_words(net: WordNet) -> None:
    captions = class_captions("n02085620", "Chihuahua", net)
    assert captions.names[0] == "Chihuahua"
    assert captions.concept == concept_key("n02085620")
    assert concept_key(EVERYDAY_CONCEPTS["dog"]) in captions.image_concepts
    pool = caption_pool(captions)
    assert ("a photo of a dog.", concept_key(EVERYDAY_CONCEPTS["dog"])) in pool
    assert ("a photo of a Chihuahua, a kind of dog.", captions.concept) in pool
    # Every caption of the pool means a concept the class's images belong to.
    assert {concept for _, concept in pool} <= captions.image_concepts


def test_draw_caption_is_seeded_and_mixes_everyday_words(net: WordNet) -> None:
    captions = class_captions("n02085620", "Chihuahua", net)
    first = [draw_caption(captions, random.Random(i)) for i in range(200)]
    assert first == [draw_caption(captions, random.Random(i)) for i in range(200)]
    everyday = [c for c, concept in first if concept != captions.concept]
    assert 0.15 < len(everyday) / len(first) < 0.45  # everyday_share 0.3
    assert all(concept in captions.image_concepts for _, concept in first)


def test_everyday_label_sets_keep_only_unambiguous_classes(net: WordNet) -> None:
    sets = everyday_label_sets(["n02085620", "n02123045", "n01443537", "n01629819"], net)
    assert sets["n02085620"] == "dog"
    assert sets["n02123045"] == "cat"  # tabby
    assert sets["n01443537"] == "fish"  # goldfish
    assert "n01629819" not in sets or sets["n01629819"] in ("animal",)  # fire salamander: only the generic word


def test_unrelated_words_leave_one_right_answer(net: WordNet) -> None:
    others = unrelated_words("n02085620", "dog", net)  # Chihuahua
    assert "dog" not in others and "animal" not in others  # the class is both: neither may stand beside "dog"
    assert "car" in others and "cat" in others
    assert "Chihuahua" not in others and len(others) == len(set(others))
