"""Coarse words for the classes of a build's label set (``data.word_sets``): what a client might type instead of a
class name ("dog" for a Chihuahua). :mod:`training.pipeline.label_sets` draws word label sets from them.

The same file may also name **class groups**: label sets clients send whole, such as one dataset's own classes
("airplane, automobile, bird, ..." for a CIFAR-10 photo). Their classes are alike, so such a set is harder than the
true class beside K - 1 random others; a group's images then get rows labelled with the whole group, kept apart
("group-NAME"), so the promises hold on them too."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORD_KEY = "words-{}"  # figures key of the word label sets of size K
GROUP_KEY = "group-{}"  # figures key of a class group's label sets (every size the same: the group's)


def group_of(key: str) -> str | None:
    """The class group a figures key names ("group-NAME" gives NAME), None for any other key."""
    prefix = GROUP_KEY.format("")
    return key.removeprefix(prefix) if key.startswith(prefix) else None


def word_count_of(key: str) -> str | None:
    """The K of a word label sets' figures key ("words-K" gives "K"), None for any other key."""
    prefix = WORD_KEY.format("")
    return key.removeprefix(prefix) if key.startswith(prefix) else None


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
    groups: tuple[tuple[str, np.ndarray], ...] = ()  # (name, [G] class labels) of each class group, by name

    @classmethod
    def from_json(cls, document: Mapping[str, Any], labels: Sequence[str]) -> WordSets:
        """Check a word-sets document against the label set: every class it names must be a label, every word a
        non-empty string, and a class's own word is never among its others. Optional ``"groups"``: ``{name: [class
        names]}``, each group at least two distinct classes of the label set."""
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
        return cls(tuple(words), label_of, extra, word_of, tuple(others), _groups(document.get("groups", {}), index))

    @classmethod
    def read(cls, path: Path, labels: Sequence[str]) -> WordSets:
        """:meth:`from_json` of a file."""
        return cls.from_json(json.loads(path.read_text()), labels)

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        """The document :meth:`from_json` reads back ("groups" only when there are some, so a build without groups
        keeps the identity it had before groups existed)."""
        document: dict[str, Any] = {
            "classes": {
                labels[i]: {"word": self.words[w], "others": [self.words[o] for o in self.others[i]]}
                for i, w in enumerate(self.word_of.tolist())
                if w >= 0
            }
        }
        if self.groups:
            document["groups"] = {name: [labels[i] for i in members.tolist()] for name, members in self.groups}
        return document


def _groups(document: Any, index: Mapping[str, int]) -> tuple[tuple[str, np.ndarray], ...]:
    """``{"name": [class names]}`` -> ((name, [G] class labels), ...) by name (:meth:`WordSets.from_json`)."""
    if not isinstance(document, Mapping):
        raise WordSetsError('"groups" must be an object of group name -> class names')
    groups = []
    for name, members in sorted(document.items()):
        if not isinstance(name, str) or not name.strip() or not isinstance(members, list):
            raise WordSetsError(f"group {name!r}: a non-empty name and a list of class names expected")
        unknown = sorted(str(m) for m in members if m not in index)
        if unknown:
            raise WordSetsError(f"group {name!r} names classes outside the label set: {unknown[:5]}")
        if len(set(members)) != len(members) or len(members) < 2:
            raise WordSetsError(f"group {name!r} needs at least two distinct classes")
        groups.append((name, np.array([index[m] for m in members], dtype=np.int64)))
    return tuple(groups)
