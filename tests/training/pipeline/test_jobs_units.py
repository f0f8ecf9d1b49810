"""The definitions behind the jobs, on hand-made inputs: NSR/INR, gate fit, threshold search, pruning, PABEE,
four quadrants, data sources and splits, config round trip."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from lraee_core.backbone import VisionShape
from lraee_core.config import BackboneConfig, OperatingPoint
from lraee_core.flops import flops_model
from lraee_core.gate import exits
from training.pipeline.config import SPLIT_NAMES, BuildConfig, CalibrateConfig, DataConfig, ExtractConfig, GateFitConfig
from training.pipeline.data import DataError, make_splits, read_classes_tsv, stratified_order
from training.pipeline.evaluate import four_quadrants, pabee
from training.pipeline.gate_fit import fit_logistic, gate_key, pairs
from training.pipeline.jobs import portable_paths
from training.pipeline.label_sets import (
    ExitView,
    auc,
    group_label_sets,
    label_sets_for,
    log_uniform_counts,
    resolve_counts,
    word_label_sets,
)
from training.pipeline.profile import ProfileAccumulator
from training.pipeline.search import (
    candidate_thresholds,
    promises,
    prune_layers,
    search_point,
    select_candidates,
)
from training.pipeline.simulate import METHODS, by_label_count, full_outcome, row_thresholds, simulate
from training.pipeline.word_sets import WordSets, WordSetsError

TINY_SHAPE = VisionShape(
    num_layers=12, width=128, num_heads=4, mlp_width=512, num_tokens=65, patch_size=8, image_size=64, embed_dim=128
)


# ---- QIRC profile ------------------------------------------------------------------------------------------------
def test_nsr_and_inr_on_a_hand_computed_example() -> None:
    # Two images, one token of width 2, two blocks. States are [B=2, T=1, D=2] per layer 0..2.
    fp32 = [
        torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]]),
        torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]]),
        torch.tensor([[[3.0, 6.0]], [[0.0, 1.0]]]),
    ]
    int8 = [
        torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]]),
        torch.tensor([[[3.0, 5.0]], [[0.0, 3.0]]]),
        torch.tensor([[[4.0, 6.0]], [[0.0, 1.0]]]),
    ]
    accumulator = ProfileAccumulator(num_layers=2)
    accumulator.update(fp32, int8)
    layer1, layer2 = accumulator.result()
    # Layer 1: noise |(0,1)|^2 = 1 and |(0,2)|^2 = 4; block change |(3,4)|^2 = 25 and |(0,1)|^2 = 1.
    # A ratio of means, not a mean of ratios (which would be (1/25 + 4/1) / 2).
    assert layer1.nsr == pytest.approx((1 + 4) / (25 + 1))
    assert layer1.inr == pytest.approx(26 / 5)
    assert layer1.mse == pytest.approx((1 + 4) / 4)  # 4 elements
    assert layer1.cosine == pytest.approx((29 / (34**0.5 * 5) + 1.0) / 2)
    assert (layer1.max_abs_fp32, layer1.max_abs_int8) == (4.0, 5.0)
    # Layer 2: noise |(1,0)|^2 = 1 and 0; change |(0,2)|^2 = 4 and 0.
    assert layer2.nsr == pytest.approx(1 / 4)
    assert layer2.inr == pytest.approx(4.0)


def test_identical_towers_have_no_noise() -> None:
    states = [torch.randn(3, 5, 4) for _ in range(4)]
    accumulator = ProfileAccumulator(num_layers=3)
    accumulator.update(states, [s.clone() for s in states])
    for layer in accumulator.result():
        assert layer.nsr == 0.0 and layer.inr == 1e12 and layer.cosine == pytest.approx(1.0)


# ---- gate --------------------------------------------------------------------------------------------------------
def test_gate_fit_recovers_a_separating_direction() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(400, 3, generator=generator) * torch.tensor([1.0, 1.0, 2.0])
    true_weight, true_bias = torch.tensor([4.0, -2.0, 3.0]), -3.0
    targets = features @ true_weight + true_bias > 0
    assert 0.2 < targets.float().mean() < 0.8
    fit = fit_logistic(features, targets, GateFitConfig())
    weight = torch.tensor(fit.params.weight)
    cosine = float(weight @ true_weight / (weight.norm() * true_weight.norm()))
    assert cosine > 0.98
    assert fit.accuracy >= 0.98
    # Weights are in raw feature space: the engine's probability reproduces the fitted decisions.
    probability = fit.params.probability(features)
    assert float(((probability >= 0.5) == targets).float().mean()) == pytest.approx(fit.accuracy)


def test_gate_fit_takes_any_named_feature_set() -> None:
    names = ("cos_top1", "cos_gap", "entropy_norm", "log_k", "agree_prev")
    features = torch.rand(300, len(names), generator=torch.Generator().manual_seed(2))
    targets = features[:, 0] - features[:, 2] > 0
    fit = fit_logistic(features, targets, GateFitConfig(), names)
    assert fit.params.features == names and len(fit.params.weight) == 5
    assert fit.params.weight[0] > 0 > fit.params.weight[2] and fit.accuracy > 0.95


def test_gate_fit_of_a_one_class_layer_is_a_constant() -> None:
    features = torch.rand(50, 3)
    fit = fit_logistic(features, torch.ones(50, dtype=torch.bool), GateFitConfig())
    assert fit.params.weight == (0.0, 0.0, 0.0)
    assert float(fit.params.probability(features)[0]) == pytest.approx(1 - 1e-4)


def test_gates_cover_every_previous_candidate_a_subset_can_need() -> None:
    assert pairs((6, 9, 11), ("cos_top1",)) == [(6, None), (9, None), (11, None)]
    with_prev = pairs((6, 9, 11), ("cos_top1", "agree_prev"))
    assert with_prev == [(6, None), (9, None), (9, 6), (11, None), (11, 6), (11, 9)]
    assert gate_key(11, 9) == "11|9" and gate_key(6, None) == "6|none"


def test_auc_counts_ties_half() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


# ---- label sets --------------------------------------------------------------------------------------------------
def test_label_sets_hold_the_true_class_and_k_distinct_labels() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 50, 200)
    sets = label_sets_for(truth, 50, [2, 10, 50], 2, rng)
    assert sets.size == 200 * 2 * 3
    for k, (rows, members) in sets.groups.items():
        assert members.shape == (len(rows), k)
        assert all(len(set(row.tolist())) == k for row in members)
        assert (members == truth[sets.images[rows]][:, None]).any(axis=1).all()
    positions = [
        int(np.flatnonzero(row == t)[0])
        for row, t in zip(sets.groups[10][1], truth[sets.images[sets.groups[10][0]]], strict=True)
    ]
    assert len(set(positions)) > 5  # the true class takes a random place, not always the first


def test_log_uniform_label_counts_cover_small_and_large_sets() -> None:
    counts = log_uniform_counts(np.random.default_rng(0), 20_000, 1000)
    assert counts.min() == 2 and counts.max() == 1000
    assert 0.25 < float((counts <= 31).mean()) < 0.55  # log-uniform: about half below sqrt(1000)
    assert resolve_counts((2, 5, 10, 50, 0), 20) == [2, 5, 10, 20]


LABELS = ("Chihuahua", "tabby", "sports car", "cat", "banana")
WORDS = {
    "classes": {
        "Chihuahua": {"word": "dog", "others": ["car", "cat", "fruit"]},
        "tabby": {"word": "cat", "others": ["car", "dog", "fruit"]},
        "cat": {"word": "cat", "others": ["car", "dog", "fruit"]},
        "sports car": {"word": "car", "others": ["dog", "fruit"]},
    }
}


def test_word_sets_give_new_words_labels_after_the_classes_and_class_named_words_theirs() -> None:
    words = WordSets.from_json(WORDS, LABELS)
    assert words.words == ("car", "cat", "dog", "fruit") and words.extra == ("car", "dog", "fruit")
    assert words.label_of.tolist() == [5, 3, 6, 7]  # "cat" is class 3; the others follow the 5 classes
    assert words.word_of.tolist() == [2, 1, 0, 1, -1]  # banana has no word
    assert words.to_json(LABELS) == WORDS  # what extract keeps in meta.json reads back the same


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"classes": {}}, "non-empty"),
        ({"classes": {"poodle": {"word": "dog", "others": []}}}, "outside the label set"),
        ({"classes": {"tabby": {"word": "cat", "others": ["cat"]}}}, "among its others"),
        ({"classes": {"tabby": {"word": "", "others": []}}}, "non-empty string"),
        ({**WORDS, "groups": {"pets": ["tabby", "poodle"]}}, "outside the label set"),
        ({**WORDS, "groups": {"pets": ["tabby"]}}, "two distinct"),
        ({**WORDS, "groups": {"pets": ["tabby", "tabby"]}}, "two distinct"),
        ({**WORDS, "groups": ["tabby", "cat"]}, "must be an object"),
    ],
)
def test_word_sets_that_do_not_fit_the_label_set_are_refused(document: dict, reason: str) -> None:
    with pytest.raises(WordSetsError, match=reason):
        WordSets.from_json(document, LABELS)


def test_word_label_sets_hold_the_word_and_k_minus_1_of_its_others() -> None:
    words = WordSets.from_json(WORDS, LABELS)
    truth = np.array([0, 1, 2, 3, 4] * 20)
    sets = word_label_sets(truth, words, [2, 4], 1, np.random.default_rng(0))
    assert sets.truth is not None
    rows2, members2 = sets.groups[2]
    assert len(rows2) == 80  # every image but the bananas
    rows4, members4 = sets.groups[4]
    assert len(rows4) == 60  # "sports car" has only two others: no set of 4
    for rows, members in ((rows2, members2), (rows4, members4)):
        for row, labels in zip(rows.tolist(), members.tolist(), strict=True):
            label = int(truth[sets.images[row]])
            assert sets.truth[row] in labels and len(set(labels)) == len(labels)
            assert sets.truth[row] == words.label_of[words.word_of[label]]
            allowed = {int(words.label_of[o]) for o in words.others[label]}
            assert set(labels) - {sets.truth[row]} <= allowed
    assert {int(sets.truth[r]) for r in rows2} == {3, 5, 6}  # cat is class 3's label; car 5, dog 6


def test_class_groups_label_each_of_their_images_with_the_whole_group() -> None:
    document = {**WORDS, "groups": {"pets": ["tabby", "Chihuahua", "cat"], "cars": ["sports car", "banana"]}}
    words = WordSets.from_json(document, LABELS)
    assert [name for name, _ in words.groups] == ["cars", "pets"]  # by name
    assert words.to_json(LABELS) == document  # read back the same
    assert "groups" not in WordSets.from_json(WORDS, LABELS).to_json(LABELS)  # no groups: the former document
    truth = np.array([0, 1, 2, 3, 4, 0])
    cars, pets = group_label_sets(truth, words, 2, np.random.default_rng(0))
    assert (cars.group, pets.group) == ("cars", "pets")
    assert sorted(cars.images.tolist()) == [2, 2, 4, 4] and sorted(pets.images.tolist()) == [0, 0, 1, 1, 3, 3, 5, 5]
    for sets, members in ((cars, {2, 4}), (pets, {0, 1, 3})):
        ((k, (rows, labels)),) = sets.groups.items()
        assert k == len(members) and (sets.counts == k).all() and len(rows) == sets.size
        assert all(set(row) == members for row in labels.tolist())  # the whole group, in some order
    no_group = WordSets.from_json({**document, "groups": {"cars": ["sports car", "banana"]}}, LABELS)
    assert [s.group for s in group_label_sets(np.array([0, 1]), no_group, 1, np.random.default_rng(0))] == []


def test_group_rows_are_reported_apart_from_class_and_word_rows() -> None:
    (view, scores), layers = _view(size=200, ks=(2, 10)), (6, 9, 11)
    words = np.zeros(view.size, dtype=bool)
    words[::4] = True
    group = np.full(view.size, "", dtype="<U4")
    group[1::4] = "pets"
    group[2::8] = "cars"
    marked = replace(view, words=words, group=group)
    outcome = simulate(marked, layers, scores, [0.6, 0.6, 0.6])
    figures = by_label_count(outcome, marked, layers)
    assert set(figures) == {"2", "10", "words-2", "words-10", "group-cars", "group-pets"}
    assert sum(f["rows"] for f in figures.values()) == view.size  # every row in exactly one key
    assert figures["group-pets"]["rows"] == 50 and figures["group-cars"]["rows"] == 25
    assert figures["group-pets"]["agreement"] == float(outcome.agrees[group == "pets"].mean())
    both = marked.subset(np.arange(10)).concat(marked.subset(np.arange(10, 20)))
    assert (both.group_rows() == group[:20]).all() and (both.word_rows() == words[:20]).all()
    assert (view.concat(marked.subset(np.arange(4))).group_rows()[-4:] == group[:4]).all()  # "" where none given


def test_word_rows_are_reported_apart_from_class_rows_of_the_same_k() -> None:
    (view, scores), layers = _view(size=200, ks=(2, 10)), (6, 9, 11)
    words = np.zeros(view.size, dtype=bool)
    words[::2] = True
    marked = replace(view, words=words)
    outcome = simulate(marked, layers, scores, [0.6, 0.6, 0.6])
    figures = by_label_count(outcome, marked, layers)
    assert set(figures) == {"2", "10", "words-2", "words-10"}
    assert sum(f["rows"] for f in figures.values()) == view.size
    assert figures["words-2"]["agreement"] == float(outcome.agrees[(view.counts == 2) & words].mean())
    both = marked.subset(np.arange(10)).concat(marked.subset(np.arange(10, 20)))
    assert (both.word_rows() == words[:20]).all()
    assert set(by_label_count(simulate(view, layers, scores, [0.6] * 3), view, layers)) == {"2", "10"}


# ---- simulation and threshold search -----------------------------------------------------------------------------
def _view(
    size: int = 300, layers: tuple[int, ...] = (6, 9, 11), seed: int = 0, ks: tuple[int, ...] = (2, 10)
) -> tuple[ExitView, dict[int, np.ndarray]]:
    """A hand-made view (rows at each K) and exit scores: deeper exits agree with full depth more often."""
    rng = np.random.default_rng(seed)
    counts = np.repeat(np.array(ks), size // len(ks))
    n = len(counts)
    truth = rng.integers(0, 4, n)
    full = np.where(rng.random(n) < 0.5, truth, rng.integers(0, 4, n))
    scores, top1 = {}, {}
    for i, layer in enumerate(layers):
        values = rng.random(n).astype(np.float32)
        values[:10] = np.float32(0.5)
        values[10:15] = np.float32(1.0)  # a saturated sigmoid: must still not pass a 1.0 threshold
        scores[layer] = values
        # a higher score and a deeper layer make agreement likelier
        top1[layer] = np.where(rng.random(n) < 0.3 + 0.5 * values + 0.05 * i, full, rng.integers(0, 4, n))
    features = {layer: {"confidence": scores[layer]} for layer in layers}
    flops = {k: flops_model(TINY_SHAPE, 128, k) for k in ks}
    return ExitView(counts, truth, full, full.copy(), top1, features, flops), scores


def test_simulation_charges_flops_like_the_flops_model_at_each_k() -> None:
    (view, scores), layers = _view(), (6, 9, 11)
    outcome = simulate(view, layers, scores, [0.7, 0.5, 1.0])
    for i in range(view.size):
        reached = sum(1 for layer in layers if layer <= outcome.exit_layer[i]) if outcome.exited[i] else len(layers)
        model = view.flops[int(view.counts[i])]
        assert outcome.flops[i] == model.spent(int(outcome.exit_layer[i]), reached, not outcome.exited[i])
        assert outcome.full_depth[i] == model.full_depth
    assert not (outcome.exit_layer == 11).any()  # threshold 1.0 never exits, even at probability 1.0
    assert ((outcome.exit_layer == 9) & outcome.exited).sum() > 0
    assert (outcome.agrees == (outcome.predictions == view.full_top1)).all()


def test_full_outcome_is_the_reference() -> None:
    view, _ = _view()
    full = full_outcome(view)
    assert full.agreement == 1.0 and full.saving == 0.0 and not full.exited.any()


def test_thresholds_compare_in_float32_like_the_engine() -> None:
    threshold = 5 / 24  # a value whose float32 rounding lies below it
    assert float(np.float32(threshold)) < threshold
    values = np.array([np.float32(threshold), np.nextafter(np.float32(threshold), np.float32(0))], dtype=np.float32)
    engine = exits(torch.from_numpy(values), threshold).tolist()
    assert engine == [True, False]
    view, _ = _view(size=2, layers=(6,), ks=(2,))
    assert simulate(view, (6,), {6: values}, [threshold]).exited.tolist() == engine


def test_operating_points_keep_their_promise_at_every_k_on_the_split_searched() -> None:
    (view, scores), layers = _view(size=4000), (6, 9, 11)
    config = CalibrateConfig(promise_margin=0.0)
    found = {name: search_point(view, layers, scores, promise, config) for name, promise in promises(config).items()}
    for name, point in found.items():
        outcome = simulate(view, layers, scores, point.operating_point(name, layers))
        for k in (2, 10):
            assert outcome.agrees[view.counts == k].mean() >= point.promise, (name, k)
        assert point.calibration["2"]["agreement"] == pytest.approx(outcome.agrees[view.counts == 2].mean())
    # looser promises let more images leave, at every calibrated K
    curves = {name: dict(point.thresholds) for name, point in found.items()}
    for k in curves["accurate"]:
        assert curves["accurate"][k] >= curves["balanced"].get(k, 1.0) >= curves["fast"].get(k, 1.0), k
    assert found["fast"].mean_saving > found["accurate"].mean_saving
    strict = search_point(view, layers, scores, 0.97, CalibrateConfig(promise_margin=3.0))
    for k, threshold in strict.thresholds:  # a margin of standard errors is more careful
        assert threshold >= curves["balanced"].get(k, 1.0)


def test_each_label_count_gets_its_own_threshold() -> None:
    """Where exits agree with full depth only when very sure at K = 10 but often at K = 2, one shared threshold
    would be the K = 10 one; per K, the K = 2 rows leave far more often, and both keep the promise."""
    (view, scores), layers = _view(size=4000), (6,)
    rng = np.random.default_rng(5)
    at_ten = view.counts == 10
    # at K = 10 an exit agrees only above a score of 0.9; at K = 2 above 0.3
    agree = np.where(at_ten, scores[6] > 0.9, scores[6] > 0.3) | (rng.random(view.size) < 0.02)
    top1 = {6: np.where(agree, view.full_top1, (view.full_top1 + 1) % 4)}
    view = dataclasses.replace(view, top1=top1)
    config = CalibrateConfig(promise_margin=0.0, label_caps=False)
    point = search_point(view, layers, scores, 0.97, config)
    thresholds = dict(point.thresholds)
    assert thresholds[2] < 0.5 < 0.85 < thresholds[10]
    outcome = simulate(view, layers, scores, point.operating_point("balanced", layers))
    for k in (2, 10):
        assert outcome.agrees[view.counts == k].mean() >= 0.97
    shared = max(thresholds.values())
    assert outcome.exited[~at_ten].mean() > simulate(view, layers, scores, [shared]).exited[~at_ten].mean() + 0.3


def test_rows_between_two_calibrated_counts_follow_the_interpolated_thresholds() -> None:
    (view, scores), layers = _view(size=600, ks=(2, 4, 8)), (6, 9)
    point = OperatingPoint("p", ((2, {6: 0.2, 9: 0.2}), (8, {6: 0.8, 9: 0.8})))
    per_row, heads_run = row_thresholds(view, layers, point)
    assert heads_run.all()
    assert set(per_row[6][view.counts == 4].tolist()) == {np.float32(0.5)}  # halfway in log K
    outcome = simulate(view, layers, scores, point)
    reference = simulate(view, layers, scores, [0.5, 0.5])
    at_four = view.counts == 4
    assert (outcome.exit_layer[at_four] == reference.exit_layer[at_four]).all()


def test_a_head_charge_keeps_only_the_exits_that_pay_for_their_time() -> None:
    """Uncharged, the search's objective is the FLOPs saving. Charged ``head_cost_blocks`` blocks per head and gate
    an image runs, the objective is the FLOPs saving less exactly that, and the search keeps fewer candidates."""
    (view, scores), pool = _view(size=2000), (6, 9, 11)
    method = METHODS["confidence"]  # scores from the view's features: no gate bank needed
    uncharged = CalibrateConfig(promise_margin=0.0, label_caps=False)  # the charge alone (caps: tests below)
    free = select_candidates(view, method, None, pool, uncharged)  # type: ignore[arg-type]
    assert free.points["balanced"].objective == pytest.approx(free.points["balanced"].mean_saving)
    config = replace(uncharged, head_cost_blocks=2.0)
    charged = select_candidates(view, method, None, pool, config)  # type: ignore[arg-type]
    assert len(charged.layers) <= len(free.layers)
    runs = [s.points["balanced"].calibration["2"]["heads_in_blocks"] for s in (free, charged)]
    assert runs[1] <= runs[0]  # charged, images run no more heads
    ruinous = select_candidates(view, method, None, pool, replace(config, head_cost_blocks=50.0, label_caps=True))  # type: ignore[arg-type]
    assert ruinous.points["balanced"].label_cap == 1  # no exit pays for heads that dear: none runs
    point = charged.points["balanced"]
    outcome = simulate(view, charged.layers, scores, point.operating_point("balanced", charged.layers))
    block = view.flops[2].block / view.flops[2].full_depth
    assert point.calibration["2"]["heads_in_blocks"] == pytest.approx(
        outcome.evaluated[view.counts == 2].mean() * block
    )
    figures = point.calibration.values()
    assert point.objective == pytest.approx(np.mean([f["flops_saved"] - 2.0 * f["heads_in_blocks"] for f in figures]))
    assert point.objective < point.mean_saving


def test_candidate_thresholds_are_quantiles_plus_never() -> None:
    thresholds = candidate_thresholds({6: np.linspace(0, 0.9, 101).astype(np.float32)}, 11)
    assert thresholds[-1] == 1.0 and len(thresholds) == 12
    assert np.all(np.diff(thresholds) > 0)


# ---- pruning -----------------------------------------------------------------------------------------------------
def test_pruning_drops_a_layer_with_an_artificially_low_inr() -> None:
    inr = {layer: 100.0 / layer for layer in range(1, 13)}  # smooth decay: nothing to prune
    assert prune_layers(inr, tuple(range(6, 13)), 0.5) == (tuple(range(6, 13)), ())
    inr[9] = 1.0  # a spike of noise at layer 9
    kept, pruned = prune_layers(inr, tuple(range(6, 13)), 0.5)
    assert kept == (6, 7, 8, 10, 11, 12)
    assert [(p.layer, p.inr) for p in pruned] == [(9, 1.0)]
    assert "layers 8 and 10" in pruned[0].reason
    assert prune_layers(inr, tuple(range(6, 13)), 0.0)[1] == ()  # fraction 0 turns pruning off
    assert prune_layers(inr, (9,), 0.5) == ((9,), ())  # never prunes every candidate


# ---- baselines and analyses --------------------------------------------------------------------------------------
def test_pabee_leaves_once_patience_heads_agree() -> None:
    top1 = {6: np.array([1, 0, 3]), 7: np.array([1, 1, 3]), 8: np.array([2, 2, 3])}
    model = flops_model(TINY_SHAPE, 128, 4)
    view = ExitView(np.full(3, 4), np.array([1, 0, 3]), np.array([0, 0, 0]), np.array([0, 0, 0]), top1, {}, {4: model})
    outcome = pabee(view, (6, 7, 8), patience=2)
    assert outcome.exit_layer.tolist() == [7, 12, 7]  # image 1's heads never agree twice in a row
    assert outcome.exited.tolist() == [True, False, True]
    assert outcome.predictions.tolist() == [1, 0, 3]  # image 1 gets the full-depth answer
    assert outcome.flops[0] == model.embed + 7 * model.block + 2 * model.head
    three = pabee(view, (6, 7, 8), patience=3)
    assert three.exited.tolist() == [False, False, True] and three.predictions.tolist() == [0, 0, 3]
    assert three.flops[0] == model.full_depth + 3 * model.head
    assert pabee(view, (6, 7, 8), patience=1).exit_layer.tolist() == [6, 6, 6]


def test_four_quadrants_add_up() -> None:
    early = np.array([1, 1, 0, 0, 1, 0, 1], dtype=bool)
    full = np.array([1, 0, 1, 0, 0, 0, 1], dtype=bool)
    result = four_quadrants(early, full)
    assert result["counts"] == {"both_correct": 2, "rescue": 2, "loss": 1, "both_wrong": 2}
    assert sum(result["counts"].values()) == result["images"] == 7
    assert result["net_gain"] == 1
    assert result["net_gain_points"] == pytest.approx(100 / 7)


# ---- data --------------------------------------------------------------------------------------------------------
def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _classes_tsv(path: Path) -> list[str]:
    """A complete 1000-row table with made-up sorted wnids: row i is ImageNet class i."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    rows = ["wnid\timagenet_index\tname\tin_tiny_subset"]
    rows += [f"{w}\t{i}\t{open_clip.IMAGENET_CLASSNAMES[i]}\t0" for i, w in enumerate(wnids)]
    path.write_text("\n".join(rows) + "\n")
    return wnids


def test_wnid_folders_take_imagenet_class_names(tmp_path: Path) -> None:
    wnids = _classes_tsv(tmp_path / "classes.tsv")
    for index in (0, 1, 5):
        for image in range(4):
            _png(tmp_path / "images" / wnids[index] / f"{image}.JPEG")
    config = DataConfig(
        source=str(tmp_path / "images"),
        classes_tsv=str(tmp_path / "classes.tsv"),
        head_split=4,
        gate_split=3,
        calib_split=3,
        eval_split=2,
    )
    splits = make_splits(config)
    names = open_clip.IMAGENET_CLASSNAMES
    assert splits.labels == (names[0], names[1], names[5])
    assert {name: len(splits.splits[name].items) for name in SPLIT_NAMES} == {
        "head": 4,
        "gate": 3,
        "calib": 3,
        "eval": 2,
    }
    everything = make_splits(DataConfig(**{**config.__dict__, "label_space": "imagenet-1k"}))
    assert len(set(everything.labels)) == 1000  # the engine refuses repeated labels; ImageNet repeats two names
    assert (everything.labels[657], everything.labels[744]) == ("missile", "missile (2)")
    assert {label for split in everything.splits.values() for label in split.labels} == {0, 1, 5}


def test_a_source_may_mix_wnids_with_named_classes(tmp_path: Path) -> None:
    """The everyday build: Tiny photos labelled by wnid beside CIFAR-10 photos labelled by name; a wnid-shaped key
    missing from the table is still refused, not turned into a class called "n99999999"."""
    wnids = _classes_tsv(tmp_path / "classes.tsv")
    rows = ["path,label"]
    for key in (wnids[0], wnids[5], "airplane", "sea_lion"):
        for image in range(5):
            _png(tmp_path / "images" / key / f"{image}.png")
            rows.append(f"images/{key}/{image}.png,{key}")
    (tmp_path / "mixed.csv").write_text("\n".join(rows) + "\n")
    config = DataConfig(
        source=str(tmp_path / "mixed.csv"),
        classes_tsv=str(tmp_path / "classes.tsv"),
        head_split=8,
        gate_split=4,
        calib_split=4,
        eval_split=4,
    )
    splits = make_splits(config)
    names = open_clip.IMAGENET_CLASSNAMES
    assert sorted(splits.labels) == sorted((names[0], names[5], "airplane", "sea lion"))
    assert {label for split in splits.splits.values() for label in split.labels} == {0, 1, 2, 3}
    (tmp_path / "typo.csv").write_text("path,label\nimages/airplane/0.png,n99999999\n")
    with pytest.raises(DataError, match="not a wnid of the classes table"):
        make_splits(replace(config, source=str(tmp_path / "typo.csv")))


def test_a_classes_table_that_contradicts_sorted_order_is_refused(tmp_path: Path) -> None:
    wnids = _classes_tsv(tmp_path / "classes.tsv")
    lines = (tmp_path / "classes.tsv").read_text().splitlines()
    lines[1], lines[2] = lines[1].replace("\t0\t", "\t1\t"), lines[2].replace("\t1\t", "\t0\t")
    (tmp_path / "classes.tsv").write_text("\n".join(lines))
    with pytest.raises(DataError, match=wnids[0]):
        read_classes_tsv(tmp_path / "classes.tsv")


def test_manifest_sources_and_a_separate_evaluation_set(tmp_path: Path) -> None:
    rows = [(f"img/{c}_{i}.png", c) for c in ("cat", "sea_lion") for i in range(6)]
    for rel, _ in rows:
        _png(tmp_path / rel)
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    evaluation = [{"path": f"img/{c}_{i}.png", "label": c} for c in ("cat", "zebra") for i in range(2)]
    for record in evaluation:
        _png(tmp_path / record["path"])
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in evaluation) + "\n")
    config = DataConfig(
        source=str(tmp_path / "train.csv"),
        eval_source=str(tmp_path / "eval.jsonl"),
        head_split=0.5,
        gate_split=0.25,
        calib_split=0.25,
    )
    splits = make_splits(config)
    assert splits.labels == ("cat", "sea lion")
    assert [len(splits.splits[name].items) for name in SPLIT_NAMES] == [6, 3, 3, 2]
    assert splits.splits["eval"].labels == [0, 0]  # the zebras are outside the label set
    assert splits.description["images_outside_label_set"] == {"source": 0, "eval_source": 2}
    train = {rel for name in ("head", "gate", "calib") for rel, _ in splits.splits[name].items}
    assert len(train) == 12


def test_split_sizes_beyond_the_data_are_refused(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "a" / f"{i}.png")
    with pytest.raises(DataError, match="need"):
        make_splits(DataConfig(source=str(tmp_path), head_split=3, gate_split=1, calib_split=1, eval_split=1))


def test_per_class_limit_keeps_every_split_stratified(tmp_path: Path) -> None:
    for count, name in ((30, "many"), (6, "few")):
        for i in range(count):
            _png(tmp_path / name / f"{i}.png")
    config = DataConfig(source=str(tmp_path), per_class_limit=6, head_split=0.5, gate_split=1 / 6, calib_split=1 / 6)
    splits = make_splits(config)
    for name in SPLIT_NAMES:
        assert sorted(splits.splits[name].labels).count(0) == sorted(splits.splits[name].labels).count(1), name


def test_stratified_order_spreads_every_class_over_every_prefix() -> None:
    labels = [0] * 30 + [1] * 10
    order = stratified_order(labels, seed=3)
    assert sorted(order) == list(range(40))
    for prefix in (4, 20):
        share = sum(labels[i] for i in order[:prefix]) / prefix
        assert abs(share - 0.25) <= 1 / prefix + 1e-9
    assert stratified_order(labels, seed=3) == order


# ---- config ------------------------------------------------------------------------------------------------------
def test_build_config_round_trips_through_json() -> None:
    config = BuildConfig(
        backbone=BackboneConfig("lraee-tiny-vit12", pretrained="/w.safetensors", model_config_file="/m.json"),
        quant_mode="full",
        data=DataConfig(source="/data", head_split=500, gate_split=0.1, templates=("a {}", "the {}")),
        extract=ExtractConfig(candidate_layers=(9, 11, 12)),
        calibrate=CalibrateConfig(balanced_promise=0.95, label_counts=(2, 0)),
        checkpoint_dir="/out",
    )
    again = BuildConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config
    assert isinstance(again.data.head_split, int) and isinstance(again.data.gate_split, float)
    with pytest.raises(ValueError, match="unknown keys"):
        BuildConfig.from_json({**config.to_json(), "surprise": 1})


def test_portable_paths_name_their_root() -> None:
    roots = {"checkpoint": "/w/main/lraee_core/assets/photos", "repo": "/w/main", "data": "/w/shared/data"}
    value = {
        "command": ["lraee-train", "--out", "/w/main/lraee_core/assets/photos", "--data", "/w/main/runs/h.csv"],
        "tsv": "/w/shared/data/imagenet-photos/classes.tsv",
        "other": "/tmp/x/images",
        "relative": "runs/x",
        "count": 3,
    }
    assert portable_paths(value, roots) == {
        "command": ["lraee-train", "--out", "${checkpoint}", "--data", "${repo}/runs/h.csv"],
        "tsv": "${data}/imagenet-photos/classes.tsv",
        "other": "${elsewhere}/images",
        "relative": "runs/x",
        "count": 3,
    }


@pytest.mark.parametrize("total", [7, 24, 25, 101])
def test_fractional_split_sizes_never_ask_for_more_images_than_there_are(total: int) -> None:
    from training.pipeline.data import _counts

    sizes = _counts([0.5, 0.2, 0.15, 0.15], total, ["head", "gate", "calib", "eval"])
    assert sum(sizes) == total  # 24 images once asked for 12 + 5 + 4 + 4 = 25
    assert _counts([10, 0.5, 0.5], 30, ["a", "b", "c"]) == [10, 15, 15]


def test_the_label_cap_is_the_largest_calibrated_k_that_pays() -> None:
    (view, scores), layers = _view(size=3000, ks=(2, 5, 10)), (6,)
    # nobody can leave at K = 5 (its best saving is minus the charge); K = 10 can: the heads keep running at 5
    scores = {6: np.where(view.counts == 5, np.float32(0.0), scores[6])}
    config = CalibrateConfig(promise_margin=0.0, head_cost_blocks=0.5)
    tried = np.array([0.05, 0.3, 0.6, 1.0])
    point = search_point(view, layers, scores, 0.5, config, thresholds=tried)
    assert point.label_cap == 10 and [k for k, _ in point.thresholds] == [2, 5, 10]
    assert dict(point.thresholds)[5] == 1.0  # nobody leaves at K = 5 whatever the threshold: the highest is kept
    # nobody can leave at K = 10 either: nothing above K = 2 pays, and the cap cuts the curve there
    neither = {6: np.where(view.counts >= 5, np.float32(0.0), scores[6])}
    capped = search_point(view, layers, neither, 0.5, config, thresholds=tried)
    assert capped.label_cap == 2 and [k for k, _ in capped.thresholds] == [2]
    every = search_point(view, layers, _view(size=3000, ks=(2, 5, 10))[1], 0.5, config, thresholds=tried)
    assert every.label_cap == 10  # every K pays: the largest calibrated K (nothing was measured above it)
    first = {6: np.zeros(view.size, dtype=np.float32)}  # not even the smallest K pays
    assert search_point(view, layers, first, 0.5, config, thresholds=tried).label_cap == 1


def test_rows_above_a_label_cap_run_no_head_and_answer_as_full_depth() -> None:
    (view, scores), layers = _view(), (6, 9, 11)
    capped = simulate(view, layers, scores, [0.5] * 3, label_cap=5)
    free = simulate(view, layers, scores, [0.5] * 3)
    full = full_outcome(view)
    above, below = view.counts == 10, view.counts == 2
    assert free.exited[above].any()  # the cap, not the scores, keeps them in
    assert not capped.exited[above].any() and (capped.evaluated[above] == 0).all()
    assert (capped.flops[above] == full.flops[above]).all() and capped.agrees[above].all()
    for name in ("exit_layer", "exited", "predictions", "flops", "evaluated"):
        assert (getattr(capped, name)[below] == getattr(free, name)[below]).all(), name


def test_a_point_caps_its_labels_where_exits_stop_paying() -> None:
    (view, scores), layers = _view(size=2000), (6,)
    scores = {6: np.where(view.counts == 10, np.float32(0.0), scores[6])}  # nobody leaves at K = 10
    config = CalibrateConfig(promise_margin=0.0, head_cost_blocks=0.5)
    tried = np.array([0.05, 0.3, 0.6, 1.0])  # every one above the K = 10 rows' scores
    point = search_point(view, layers, scores, 0.5, config, thresholds=tried)
    assert point.label_cap == 2
    assert point.calibration["10"]["heads_in_blocks"] == 0.0 and point.calibration["10"]["flops_saved"] == 0.0
    assert point.calibration["10"]["agreement"] == 1.0
    uncapped = search_point(view, layers, scores, 0.5, replace(config, label_caps=False), thresholds=tried)
    assert uncapped.label_cap is None and uncapped.calibration["10"]["flops_saved"] < 0.0
    assert point.objective > uncapped.objective


def test_the_vectorised_sweep_gives_the_simulations_figures_for_every_threshold() -> None:
    """search_point tries every candidate threshold of a K band at once (search._sweep); each must be judged on
    exactly what simulate() + by_label_count() say of it, interpolated rows included."""
    from training.pipeline.search import _band_thresholds, _sweep, curve_point, objective

    (view, scores), layers = _view(size=900, ks=(2, 4, 8)), (6, 9, 11)
    charges = {6: 0.7, 9: 0.3, 11: 1.1}
    band = view.counts > 2  # the band of K = 8 above a fixed K = 2: K = 4 rows interpolate
    part, part_scores = view.subset(band), {layer: scores[layer][band] for layer in layers}
    curve = [(2, 0.35)]
    candidates = np.array([1.0, 0.9, 0.62, 0.5, 0.2, 0.0])
    per_row = _band_thresholds(part, curve, 8, candidates)
    feasible, values = _sweep(part, layers, part_scores, per_row, 0.6, 1.0, charges)
    for index, candidate in enumerate(candidates):
        point = curve_point("p", layers, [*curve, (8, candidate)])
        figures = by_label_count(simulate(part, layers, part_scores, point), part, layers)
        assert values[index] == pytest.approx(objective(figures, charges), abs=1e-12), candidate
        expected = all(f["agreement"] - f["agreement_se"] >= 0.6 for f in figures.values())
        assert bool(feasible[index]) == expected, candidate


def test_the_cut_depth_baseline_spends_at_least_the_points_flops() -> None:
    from training.pipeline.evaluate import cut_depth_baseline

    def alone(saved: float, top1: float) -> dict[str, dict[str, float]]:
        return {"2": {"flops_saved": saved, "top1": top1, "agreement": top1}}

    heads = {"3": alone(0.7, 0.2), "6": alone(0.45, 0.4), "9": alone(0.2, 0.5)}
    points = {"balanced": {"held_out": {"2": {"flops_saved": 0.5}, "words-2": {"flops_saved": 0.1}}}}
    out = cut_depth_baseline(points, heads)
    assert out["balanced"]["2"]["layer"] == 6  # 3 saves more than the point (spends less): not a fair match
    assert "words-2" not in out["balanced"]  # the heads-alone figures have no such key
    assert cut_depth_baseline({"p": {"held_out": {"2": {"flops_saved": 0.1}}}}, heads) == {}
