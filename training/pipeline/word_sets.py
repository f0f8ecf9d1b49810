"""Coarse words for the classes of a build's label set (``data.word_sets``): what a client might type instead of a
class name ("dog" for a Chihuahua). :mod:`training.pipeline.label_sets` draws word label sets from them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class WordSetsError(ValueError):
    """A word-sets file that does not fit the build's label set."""


@dataclass(frozen=True)
class WordSets:
    """Coarse words for the classes of a label set (module docstring), as a build's ``data.word_sets`` file gives
    them: ``{"classes": {class name: {"word": w, "others": [words allowed beside w]}}}``. A word that is also a
    class name ("cat" in a label set holding CIFAR-10's classes) is that class's label: same prompts, same text."""

    words: tuple[str, ...]  # every word named by the file, sorted
    label_of: np.ndarray  # [W] each word's label in a view: its class label, or N + its index in ``extra``
    extra: tuple[str, ...]  # the words that are no class name, in label order: their text follows the classes'
    word_of: np.ndarray  # [N] word index of each class label, -1 where the class has none
    others: tuple[np.ndarray, ...]  # per class label: word indices allowed beside its word (empty when none)

    @classmethod
    def from_json(cls, document: Mapping[str, Any], labels: Sequence[str]) -> WordSets:
        """Check a word-sets document against the label set: every class it names must be a label, every word a
        non-empty string, and a class's own word is never among its others."""
        classes = document.get("classes")
        if not isinstance(classes, Mapping) or not classes:
            raise WordSetsError('word sets need a non-empty "classes" object')
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise WordSetsError(f"word sets name classes outside the label set: {unknown[:5]}")
        named = [entry["word"] for entry in classes.values()] + [w for e in classes.values() for w in e["others"]]
        if not all(isinstance(w, str) and w.strip() for w in named):
            raise WordSetsError("every word must be a non-empty string")
        words = sorted(set(named))
        extra = tuple(w for w in words if w not in index)
        label_of = np.array([index[w] if w in index else len(labels) + extra.index(w) for w in words], dtype=np.int64)
        position = {w: i for i, w in enumerate(words)}
        word_of = np.full(len(labels), -1, dtype=np.int64)
        others: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in labels]
        for name, entry in classes.items():
            if entry["word"] in entry["others"]:
                raise WordSetsError(f"{name!r}: its word {entry['word']!r} is among its others")
            word_of[index[name]] = position[entry["word"]]
            others[index[name]] = np.array(sorted(position[w] for w in set(entry["others"])), dtype=np.int64)
        return cls(tuple(words), label_of, extra, word_of, tuple(others))

    @classmethod
    def read(cls, path: Path, labels: Sequence[str]) -> WordSets:
        """:meth:`from_json` of a file."""
        return cls.from_json(json.loads(path.read_text()), labels)

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        """The document :meth:`from_json` reads back."""
        return {
            "classes": {
                labels[i]: {"word": self.words[w], "others": [self.words[o] for o in self.others[i]]}
                for i, w in enumerate(self.word_of.tolist())
                if w >= 0
            }
        }
