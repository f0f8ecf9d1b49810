"""Captions that teach everyday words: WordNet 3.0 synonyms and hypernyms of every class, and the everyday concepts.

An ImageNet wnid is ``n`` + the WordNet 3.0 noun synset offset (8 digits). Debian's ``wordnet-base`` package installs
WordNet 3.0 under ``/usr/share/wordnet``; this module reads its ``data.noun`` directly (nltk's reader refuses paths
outside its own data folders and wants a ``lexnames`` file the Debian package lacks).

A *concept* is a string key that a caption means and an image may belong to: ``wn:n02084071`` (the synset "dog"),
or ``caption:<image id>`` for a human caption that describes one photo only. An image belongs to its own class's
synset and to every everyday concept above it in the hypernym graph; a caption means exactly one concept. The
contrastive loss (``training.embedded.everyday.concept_loss``) counts a pair as positive when the caption's concept is
one of the image's concepts, so "a photo of a dog" is a correct caption for a Chihuahua, a CIFAR dog and a Tiny
golden retriever alike, and is never treated as a negative for any of them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

WORDNET_DIR = Path(os.environ.get("LRAEE_WORDNET_DIR", "/usr/share/wordnet"))

# Everyday words a client types, each pinned to its WordNet 3.0 noun synset (offset) so that "mouse" means the
# animal and "bus" the vehicle. The everyday-word evaluation uses the same table (docs/measurements.md).
EVERYDAY_CONCEPTS: dict[str, str] = {
    "dog": "n02084071",
    "cat": "n02121808",
    "bird": "n01503061",
    "fish": "n02512053",
    "insect": "n02159955",
    "butterfly": "n02274259",
    "spider": "n01772222",
    "snake": "n01726692",
    "lizard": "n01674464",
    "turtle": "n01662784",
    "frog": "n01639765",
    "monkey": "n02484322",
    "bear": "n02131653",
    "horse": "n02374451",
    "deer": "n02430045",
    "cow": "n01887787",
    "pig": "n02395003",
    "sheep": "n02411705",
    "elephant": "n02503517",
    "car": "n02958343",
    "truck": "n04490091",
    "bus": "n02924116",
    "train": "n04468005",
    "bicycle": "n02834778",
    "motorcycle": "n03790512",
    "boat": "n02858304",
    "ship": "n04194289",
    "airplane": "n02691156",
    "fruit": "n13134947",
    "vegetable": "n07707451",
    "clothing": "n03051540",
    "shoe": "n04199027",
    "hat": "n03497657",
    "furniture": "n03405725",
    "chair": "n03001627",
    "table": "n04379243",
    "building": "n02913152",
    "bridge": "n02898711",
    "musical instrument": "n03800933",
    "ball": "n02778669",
    "bottle": "n02876657",
    "cup": "n03147509",
    "clock": "n03046257",
    "computer": "n03082979",
    "phone": "n04401088",
    "flower": "n11669921",
    "tree": "n13104059",
    "mountain": "n09359803",
    "sea": "n09426788",
    "forest": "n08438533",
    "glacier": "n09289331",
    "street": "n04334599",
    "person": "n00007846",
    "food": "n00021265",
    "animal": "n00015388",
    "reptile": "n01661091",
    "vehicle": "n04524313",
    "tool": "n04451818",
    "toy": "n03964744",
    "container": "n03094503",
}

# Captions naming a concept: "{}" is the name. A few are the plain ImageNet wordings, a few are everyday speech.
NAME_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
    "a photo of my {}.",
    "a low resolution photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "the {}.",
    "this is a {}.",
    "a small {}.",
    "a large {}.",
    "there is a {} in this picture.",
    "a snapshot of a {}.",
)
# Captions placing a class under an everyday word: ("Chihuahua", "dog") -> "a photo of a Chihuahua, a kind of dog."
KIND_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a kind of {}.",
    "a {}, which is a {}.",
    "a photo of a {}, a type of {}.",
)


@dataclass(frozen=True)
class Synset:
    """One WordNet noun synset."""

    wnid: str  # "n" + 8-digit offset
    words: tuple[str, ...]  # lemmas, underscores read as spaces
    hypernyms: tuple[str, ...]  # wnids of direct hypernyms (class and instance)


class WordNet:
    """The WordNet 3.0 noun graph read from ``data.noun`` (only what captions need: lemmas and hypernyms)."""

    def __init__(self, directory: str | Path = WORDNET_DIR) -> None:
        path = Path(directory) / "data.noun"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base (WordNet 3.0)")
        self.synsets: dict[str, Synset] = {}
        with path.open(encoding="latin-1") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue  # the licence header
                fields = line.split(" | ", 1)[0].split()
                count = int(fields[3], 16)
                words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
                position = 4 + 2 * count
                pointers = int(fields[position])
                hypernyms = []
                for p in range(pointers):
                    symbol, offset, pos = fields[position + 1 + 4 * p : position + 4 + 4 * p]
                    if symbol in ("@", "@i") and pos == "n":
                        hypernyms.append("n" + offset)
                wnid = "n" + fields[0]
                self.synsets[wnid] = Synset(wnid, tuple(_clean(w) for w in words), tuple(hypernyms))

    def ancestors(self, wnid: str) -> set[str]:
        """Every synset above ``wnid`` (transitively, all hypernym paths), excluding itself."""
        seen: set[str] = set()
        stack = list(self.synsets[wnid].hypernyms)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.synsets[current].hypernyms)
        return seen

    def everyday(self, wnid: str) -> list[str]:
        """Everyday words of EVERYDAY_CONCEPTS that ``wnid`` is, itself or by a hypernym, most specific first."""
        lineage = self.ancestors(wnid) | {wnid}
        found = [word for word, concept in EVERYDAY_CONCEPTS.items() if concept in lineage]
        # A word whose synset lies above another found one is less specific ("animal" above "dog"): order by depth.
        return sorted(found, key=lambda word: -len(self.ancestors(EVERYDAY_CONCEPTS[word])))


@cache
def wordnet() -> WordNet:
    """The machine's WordNet, read once per process."""
    return WordNet()


def _clean(word: str) -> str:
    # Adjective markers such as "(a)" follow some lemmas in data files.
    return word.split("(")[0].strip()


def concept_key(wnid: str) -> str:
    """The concept key of a synset."""
    return f"wn:{wnid}"


@dataclass(frozen=True)
class ClassCaptions:
    """Everything needed to caption one labelled class."""

    concept: str  # the class's own concept key
    names: tuple[str, ...]  # the class name first, then other names of the same class (WordNet synonyms)
    everyday: tuple[str, ...]  # everyday words above the class, most specific first
    image_concepts: frozenset[str]  # the class's concept and those of its everyday words


def class_captions(wnid: str, name: str, net: WordNet | None = None) -> ClassCaptions:
    """Caption material of a class named ``name`` whose WordNet synset is ``wnid``."""
    net = net or wordnet()
    synonyms = [w for w in net.synsets[wnid].words if w.lower() != name.lower()]
    everyday = [w for w in net.everyday(wnid) if w.lower() != name.lower()]
    concepts = {concept_key(wnid)} | {concept_key(EVERYDAY_CONCEPTS[w]) for w in net.everyday(wnid)}
    return ClassCaptions(concept_key(wnid), (name, *_unique(synonyms)), tuple(everyday), frozenset(concepts))


def caption_pool(captions: ClassCaptions) -> list[tuple[str, str]]:
    """All (caption, concept) pairs of a class: its names in every template, its kind-of sentences, and its
    everyday words in every template (those captions mean the everyday concept, not the class)."""
    pool: list[tuple[str, str]] = []
    for name in captions.names:
        pool += [(t.format(name), captions.concept) for t in NAME_TEMPLATES]
        pool += [(t.format(name, word), captions.concept) for word in captions.everyday for t in KIND_TEMPLATES]
    for word in captions.everyday:
        pool += [(t.format(word), concept_key(EVERYDAY_CONCEPTS[word])) for t in NAME_TEMPLATES]
    return pool


def draw_caption(captions: ClassCaptions, rng: random.Random, everyday_share: float = 0.3) -> tuple[str, str]:
    """One (caption, concept) for an image of the class: an everyday-word caption with probability
    ``everyday_share`` when the class has one, else the class's name (or a synonym, or a kind-of sentence)."""
    if captions.everyday and rng.random() < everyday_share:
        word = rng.choice(captions.everyday[:2])  # the most specific everyday words carry the most information
        return rng.choice(NAME_TEMPLATES).format(word), concept_key(EVERYDAY_CONCEPTS[word])
    name = captions.names[0] if rng.random() < 0.6 or len(captions.names) == 1 else rng.choice(captions.names[1:])
    if captions.everyday and rng.random() < 0.2:
        return rng.choice(KIND_TEMPLATES).format(name, captions.everyday[0]), captions.concept
    return rng.choice(NAME_TEMPLATES).format(name), captions.concept


def _unique(words: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for word in words:
        if word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


def everyday_word(wnid: str, net: WordNet | None = None) -> str | None:
    """The one everyday word of a class, or None when it has none or is ambiguous: the most specific word found must
    lie under (or be) every other word found (the everyday-word evaluation keeps only unambiguous right answers)."""
    net = net or wordnet()
    if wnid not in net.synsets:
        return None
    words = net.everyday(wnid)
    if not words:
        return None
    above = net.ancestors(EVERYDAY_CONCEPTS[words[0]]) | {EVERYDAY_CONCEPTS[words[0]]}
    return words[0] if all(EVERYDAY_CONCEPTS[w] in above for w in words) else None


def unrelated_words(wnid: str, word: str, net: WordNet | None = None) -> list[str]:
    """The everyday words that may stand beside ``word`` in a label set for class ``wnid``: none the class is (by a
    hypernym) and none above the word, so that ``word`` is the one right answer."""
    net = net or wordnet()
    lineage = net.ancestors(wnid) | {wnid}
    synset = EVERYDAY_CONCEPTS[word]
    return [
        w for w, concept in EVERYDAY_CONCEPTS.items() if concept not in lineage and synset not in net.ancestors(concept)
    ]


def everyday_label_sets(wnids: Sequence[str], net: WordNet | None = None) -> dict[str, str]:
    """wnid -> its one everyday word, for the classes that have one (see :func:`everyday_word`)."""
    net = net or wordnet()
    return {wnid: word for wnid in wnids if (word := everyday_word(wnid, net)) is not None}
