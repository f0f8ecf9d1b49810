"""Label sets drawn per image, and what every exit would answer for them, computed from the feature cache.

A client sends its own labels, usually 2 to 20 of them. Gates, thresholds and the report are therefore measured on
label sets drawn per image: the image's true class plus K - 1 other classes of the data's label set, K either fixed
(the K-sweep) or log-uniform over 2..N (gate fitting). The rows of a :class:`LabelSets` are (image, label set)
pairs, grouped by K.

:func:`exit_view` answers, for one head set and every row: each cached layer's exit top-1 and gate features (by
:func:`lraee_core.gate.gate_features`, the engine's own function, on the logits restricted to the row's label
set), the INT8 and FP32 full-depth top-1, and the true label. Logits over a subset are the full logits gathered at
the subset's columns: the same cosines the engine computes for that label set.

**Word label sets.** Clients also type coarse words ("dog", "car") rather than class names. A build may give
:class:`WordSets`: per class, the one word it falls under and the words that may stand beside it (neither above nor
below it). A word label set is then that word plus K - 1 of those others. A word that is a class name has that
class's label; the other words get labels N, N+1, ... and their text follows the class prompts' in the view's text
matrix. :func:`by_label_count <training.pipeline.simulate.by_label_count>` keeps such rows apart ("words-K"), so a
promise must hold on them as on class names.

**Group label sets.** The word-sets file may also name class groups that clients send whole (one dataset's own
classes: CIFAR-10's ten, Intel's six scenes). Each image whose class is in a group gets a row labelled with the whole
group, kept apart as "group-NAME": alike classes side by side are harder than random others, and the held-out
promises had fallen short exactly there. Word and group rows are drawn together ("client rows"), after the
class-name sets, so adding groups changes no earlier draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lraee_core.flops import FlopsModel, flops_model
from lraee_core.gate import FEATURES, gate_features
from lraee_core.heads import ExitHead, class_logits

from .features import FeatureStore
from .word_sets import GROUP_KEY, WORD_KEY, WordSets

BASE_FEATURES = tuple(name for name in FEATURES if name != "agree_prev")  # computed per layer, alone


def log_uniform_counts(rng: np.random.Generator, count: int, num_labels: int, smallest: int = 2) -> np.ndarray:
    """``count`` label-set sizes, log-uniform over ``smallest..num_labels`` (every size when N is small)."""
    low = min(smallest, num_labels)
    draws = np.exp(rng.uniform(math.log(low), math.log(num_labels + 1), size=count))
    return np.clip(np.floor(draws).astype(np.int64), low, num_labels)


def resolve_counts(counts: Sequence[int], num_labels: int) -> list[int]:
    """Configured K values -> distinct K within 1..N, ascending; 0 means every label."""
    resolved = {num_labels if k <= 0 else k for k in counts}
    return sorted(k for k in resolved if 1 <= k <= num_labels)


@dataclass(frozen=True)
class LabelSets:
    """(image, label set) rows grouped by label count K."""

    images: np.ndarray  # [M] image index within the split
    counts: np.ndarray  # [M] K of each row
    groups: dict[int, tuple[np.ndarray, np.ndarray]]  # K -> (row positions [n], label indices [n, K])
    truth: np.ndarray | None = None  # [M] each row's right label when it is not the image's class (word sets)
    group: str = ""  # the class group whose whole label set every row holds (group label sets), else ""

    @property
    def size(self) -> int:
        """Rows."""
        return len(self.images)

    @classmethod
    def none(cls) -> LabelSets:
        """No rows."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(images=empty, counts=empty, groups={}, truth=empty)


def draw_label_sets(truth: np.ndarray, num_labels: int, counts: np.ndarray, rng: np.random.Generator) -> LabelSets:
    """One label set per row: the row's true class ``truth[row]`` plus ``counts[row] - 1`` random other classes,
    in random order (every class when K >= N). Rows are numbered 0..M-1; :func:`label_sets_for` maps them to images.
    """
    groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in np.unique(counts).tolist():
        rows = np.flatnonzero(counts == k)
        if k >= num_labels:
            sets = np.tile(np.arange(num_labels), (len(rows), 1))
        else:
            keys = rng.random((len(rows), num_labels))
            keys[np.arange(len(rows)), truth[rows]] = -1.0  # the true class always comes first ...
            sets = np.argsort(keys, axis=1)[:, :k]
            sets = rng.permuted(sets, axis=1)  # ... then takes a random place among the others
        groups[int(k)] = (rows, sets)
    return LabelSets(images=np.arange(len(truth)), counts=counts.astype(np.int64), groups=groups)


def label_sets_for(
    truth: np.ndarray, num_labels: int, counts: np.ndarray | Sequence[int], repeats: int, rng: np.random.Generator
) -> LabelSets:
    """Label sets for every image of a split: ``repeats`` rows per image and per K in ``counts`` (a sequence of
    fixed K), or one row per entry of ``counts`` when it is an array with one K per (image x repeat)."""
    images = np.tile(np.arange(len(truth)), repeats)
    if isinstance(counts, np.ndarray):
        per_row = counts
    else:
        per_row = np.concatenate([np.full(len(images), k) for k in counts])
        images = np.tile(images, len(counts))
    if len(per_row) != len(images):
        raise ValueError("one K per row expected")
    sets = draw_label_sets(truth[images], num_labels, per_row, rng)
    return LabelSets(images=images, counts=sets.counts, groups=sets.groups)


def word_label_sets(
    truth: np.ndarray, words: WordSets, counts: Sequence[int], repeats: int, rng: np.random.Generator
) -> LabelSets:
    """Word label sets for the images of a split whose class has a word: ``repeats`` rows per image and per K of
    ``counts``, each the image's word plus K - 1 of its class's others in random order (labels: ``label_of``; an
    image whose class has fewer than K - 1 others gets no row at that K)."""
    images_of: list[np.ndarray] = []
    counts_of: list[np.ndarray] = []
    truth_of: list[np.ndarray] = []
    groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for k in counts:
        rows: list[np.ndarray] = []
        for image in np.tile(np.arange(len(truth)), repeats).tolist():
            label = int(truth[image])
            word, others = int(words.word_of[label]), words.others[label]
            if word < 0 or len(others) < k - 1:
                continue
            chosen = np.concatenate([[word], rng.choice(others, size=k - 1, replace=False)])
            rows.append(np.concatenate([[image], words.label_of[rng.permutation(chosen)]]))
        if not rows:
            continue
        table = np.stack(rows)
        images_of.append(table[:, 0])
        counts_of.append(np.full(len(table), k))
        truth_of.append(words.label_of[words.word_of[truth[table[:, 0]]]])
        groups[int(k)] = (np.arange(start, start + len(table)), table[:, 1:])
        start += len(table)
    empty = np.zeros(0, dtype=np.int64)
    return LabelSets(
        images=np.concatenate(images_of) if images_of else empty,
        counts=np.concatenate(counts_of) if counts_of else empty,
        groups=groups,
        truth=np.concatenate(truth_of) if truth_of else empty,
    )


def group_label_sets(truth: np.ndarray, words: WordSets, repeats: int, rng: np.random.Generator) -> list[LabelSets]:
    """One :class:`LabelSets` per class group of ``words``: ``repeats`` rows per image of a split whose class is in
    the group, each the group's classes in random order (groups with no such image are left out)."""
    result = []
    for name, members in words.groups:
        images = np.tile(np.flatnonzero(np.isin(truth, members)), repeats)
        if len(images) == 0:
            continue
        sets = rng.permuted(np.tile(members, (len(images), 1)), axis=1)
        counts = np.full(len(images), len(members), dtype=np.int64)
        groups = {len(members): (np.arange(len(images)), sets)}
        result.append(LabelSets(images=images, counts=counts, groups=groups, group=name))
    return result


@dataclass(frozen=True)
class ExitView:
    """What every exit of one head set would answer for every (image, label set) row of a split."""

    counts: np.ndarray  # [M] K of each row
    truth: np.ndarray  # [M] true label
    full_top1: np.ndarray  # [M] INT8 full-depth top-1 (label index): the served model's reference answer
    fp32_top1: np.ndarray  # [M] FP32 full-depth top-1
    top1: dict[int, np.ndarray]  # layer -> [M] the exit's top-1
    features: dict[int, dict[str, np.ndarray]]  # layer -> feature name -> [M] float32 (agree_prev excluded)
    flops: dict[int, FlopsModel]  # K -> FLOPs model
    words: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [M] True on word label sets
    # (an empty array: none of the rows)
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))  # [M] each row's class group, "" on
    # rows of no group (an empty array: none of the rows)

    @property
    def size(self) -> int:
        """Rows."""
        return len(self.truth)

    def word_rows(self) -> np.ndarray:
        """[M] True on the rows whose label set is made of words."""
        return self.words if len(self.words) == self.size else np.zeros(self.size, dtype=bool)

    def group_rows(self) -> np.ndarray:
        """[M] each row's class group name, "" on rows of none."""
        return self.group if len(self.group) == self.size else np.full(self.size, "")

    def groups(self) -> dict[str, np.ndarray]:
        """Figures key -> [M] row mask: "K" for class-name label sets of size K, "words-K" for word ones,
        "group-NAME" for a class group's."""
        words, group = self.word_rows(), self.group_rows()
        plain = group == ""
        result: dict[str, np.ndarray] = {}
        for k in sorted(self.flops):
            sized = (self.counts == k) & plain
            if (sized & ~words).any():
                result[str(k)] = sized & ~words
            if (sized & words).any():
                result[WORD_KEY.format(k)] = sized & words
        for name in sorted(set(group[~plain].tolist())):
            result[GROUP_KEY.format(name)] = group == name
        return result

    def concat(self, other: ExitView) -> ExitView:
        """This view's rows followed by ``other``'s (same layers and features)."""
        return ExitView(
            counts=np.concatenate([self.counts, other.counts]),
            truth=np.concatenate([self.truth, other.truth]),
            full_top1=np.concatenate([self.full_top1, other.full_top1]),
            fp32_top1=np.concatenate([self.fp32_top1, other.fp32_top1]),
            top1={layer: np.concatenate([top, other.top1[layer]]) for layer, top in self.top1.items()},
            features={
                layer: {n: np.concatenate([f, other.features[layer][n]]) for n, f in named.items()}
                for layer, named in self.features.items()
            },
            flops={**self.flops, **other.flops},
            words=np.concatenate([self.word_rows(), other.word_rows()]),
            group=np.concatenate([self.group_rows(), other.group_rows()]),
        )

    def agrees(self, layer: int) -> np.ndarray:
        """[M] True where the layer's exit answers what full depth answers."""
        return self.top1[layer] == self.full_top1

    def feature_matrix(self, names: Sequence[str], layer: int, previous: int | None) -> np.ndarray:
        """[M, F] gate features in ``names`` order; ``agree_prev`` compares with the ``previous`` candidate layer."""
        columns = []
        for name in names:
            if name == "agree_prev":
                if previous is None:
                    columns.append(np.zeros(self.size, dtype=np.float32))
                else:
                    columns.append((self.top1[layer] == self.top1[previous]).astype(np.float32))
            else:
                columns.append(self.features[layer][name])
        return np.stack(columns, axis=1)

    def subset(self, rows: np.ndarray) -> ExitView:
        """The same view restricted to some rows."""
        return ExitView(
            counts=self.counts[rows],
            truth=self.truth[rows],
            full_top1=self.full_top1[rows],
            fp32_top1=self.fp32_top1[rows],
            top1={layer: top[rows] for layer, top in self.top1.items()},
            features={layer: {n: f[rows] for n, f in named.items()} for layer, named in self.features.items()},
            flops=self.flops,
            words=self.word_rows()[rows],
            group=self.group_rows()[rows],
        )


def _gathered(logits: torch.Tensor, rows: np.ndarray, sets: np.ndarray) -> torch.Tensor:
    return torch.gather(logits[torch.from_numpy(rows)], 1, torch.from_numpy(sets))


def _top1(logits: torch.Tensor, rows: np.ndarray, sets: np.ndarray) -> np.ndarray:
    return sets[np.arange(len(rows)), _gathered(logits, rows, sets).argmax(-1).numpy()]


@torch.inference_mode()
def exit_view(
    store: FeatureStore,
    split: str,
    heads: Mapping[int, ExitHead],
    pooling: str,
    label_sets: LabelSets,
    head_hidden_dim: int,
    cached: dict[str, torch.Tensor] | None = None,
) -> ExitView:
    """Every exit's answer and gate features for every row of ``label_sets`` on ``split`` (module docstring)."""
    layers = sorted(heads)
    names = [f"{pooling}.{layer}" for layer in layers] + [f"sav.{layer}" for layer in layers]
    names += ["labels", "int8_final", "fp32_final"]
    if cached is None or any(name not in cached for name in names):
        cached = store.load(split, names)
    text = store.view_text()  # class prompts, then the words' when the build has word sets
    scale = store.logit_scale
    images = label_sets.images
    size = label_sets.size
    truth = cached["labels"].numpy()[images] if label_sets.truth is None else label_sets.truth
    full_top1 = np.zeros(size, dtype=np.int64)
    fp32_top1 = np.zeros(size, dtype=np.int64)
    int8_logits = class_logits(cached["int8_final"], text, scale)
    fp32_logits = class_logits(cached["fp32_final"], text, scale)
    for rows, sets in label_sets.groups.values():
        full_top1[rows] = _top1(int8_logits, images[rows], sets)
        fp32_top1[rows] = _top1(fp32_logits, images[rows], sets)
    top1: dict[int, np.ndarray] = {}
    features: dict[int, dict[str, np.ndarray]] = {}
    for layer in layers:
        head = heads[layer]
        embeddings = torch.cat(
            [head(chunk) for chunk in cached[f"{pooling}.{layer}"].split(4096)]
        )  # [N, E], batched like the engine's head call
        logits = class_logits(embeddings, text, scale)  # [N, L]
        sav = cached[f"sav.{layer}"]
        layer_top1 = np.zeros(size, dtype=np.int64)
        columns = {name: np.zeros(size, dtype=np.float32) for name in BASE_FEATURES}
        for rows, sets in label_sets.groups.values():
            subset = _gathered(logits, images[rows], sets)
            layer_top1[rows] = sets[np.arange(len(rows)), subset.argmax(-1).numpy()]
            values = gate_features(BASE_FEATURES, subset, scale, sav[torch.from_numpy(images[rows])]).numpy()
            for index, name in enumerate(BASE_FEATURES):
                columns[name][rows] = values[:, index]
        top1[layer] = layer_top1
        features[layer] = columns
    hidden = head_hidden_dim
    flops = {int(k): flops_model(store.shape, hidden, int(k)) for k in np.unique(label_sets.counts).tolist()}
    words = np.full(size, label_sets.truth is not None)
    group = np.full(size, label_sets.group)
    return ExitView(label_sets.counts, truth, full_top1, fp32_top1, top1, features, flops, words, group)


def exit_view_with_client_rows(
    store: FeatureStore,
    split: str,
    heads: Mapping[int, ExitHead],
    pooling: str,
    label_sets: LabelSets | None,
    head_hidden_dim: int,
    word_counts: Sequence[int],
    repeats: int,
    rng: np.random.Generator,
) -> ExitView:
    """:func:`exit_view` of ``label_sets``, followed, when the build has word sets, by the client rows drawn by
    ``rng`` after ``label_sets``: ``repeats`` word label sets per image at each K of ``word_counts``
    (:func:`word_label_sets`), then ``repeats`` rows per image of each class group (:func:`group_label_sets`). With
    ``label_sets`` None (``rng`` having drawn them all the same) the view holds the client rows alone, none when the
    build has no word sets or ``word_counts`` is empty."""
    words = store.word_sets()
    client: list[LabelSets] = []
    if words is not None and word_counts:  # the labels are read only when word sets are drawn from them
        truth = store.load(split, ["labels"])["labels"].numpy()
        client = [word_label_sets(truth, words, word_counts, repeats, rng)]
        client += group_label_sets(truth, words, repeats, rng)
    client = [sets for sets in client if sets.size]
    views = [] if label_sets is None else [exit_view(store, split, heads, pooling, label_sets, head_hidden_dim)]
    views += [exit_view(store, split, heads, pooling, sets, head_hidden_dim) for sets in client]
    if not views:
        return exit_view(store, split, heads, pooling, LabelSets.none(), head_hidden_dim)
    view = views[0]
    for other in views[1:]:
        view = view.concat(other)
    return view


def auc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve (ties counted half); None when only one class is present."""
    positives = int(targets.sum())
    negatives = len(targets) - positives
    if positives == 0 or negatives == 0:
        return None
    _, inverse, ties = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(ties)
    ranks = ((ends - ties + 1 + ends) / 2.0)[inverse]  # 1-based ranks, ties sharing their mean rank
    return float((ranks[targets.astype(bool)].sum() - positives * (positives + 1) / 2) / (positives * negatives))
