"""The definitions behind the jobs, on hand-made inputs: NSR/INR, gate fit, threshold search, pruning, PABEE,
four quadrants, data sources and splits, config round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from lraee_core.backbone import VisionShape
from lraee_core.config import BackboneConfig
from lraee_core.flops import flops_model
from lraee_core.gate import exits, gate_features, gate_features_from_sav
from training.pipeline.calibrate import (
    ExitTable,
    best_setting,
    pareto_front,
    prune_layers,
    reached,
    search,
    simulate,
    sweep,
    threshold_grid,
)
from training.pipeline.config import SPLIT_NAMES, BuildConfig, CalibrateConfig, DataConfig, ExtractConfig, GateFitConfig
from training.pipeline.data import DataError, make_splits, read_classes_tsv, stratified_order
from training.pipeline.evaluate import four_quadrants, gate_selectivity, pabee
from training.pipeline.gate_fit import fit_logistic
from training.pipeline.profile import ProfileAccumulator

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
def test_cached_sav_features_equal_the_engine_gate_features() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator) * 10
    hidden = torch.randn(6, 17, 8, generator=generator)
    from lraee_core.gate import spatial_activation_variance

    assert torch.equal(
        gate_features_from_sav(logits, spatial_activation_variance(hidden)), gate_features(logits, hidden)
    )


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


def test_gate_fit_of_a_one_class_layer_is_a_constant() -> None:
    features = torch.rand(50, 3)
    fit = fit_logistic(features, torch.ones(50, dtype=torch.bool), GateFitConfig())
    assert fit.params.weight == (0.0, 0.0, 0.0)
    assert float(fit.params.probability(features)[0]) == pytest.approx(1 - 1e-4)


# ---- simulation and threshold search -----------------------------------------------------------------------------
def _table(size: int = 300, layers: tuple[int, ...] = (6, 9, 11), seed: int = 0) -> ExitTable:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size)
    scores = {}
    for layer in layers:
        values = rng.random(size).astype(np.float32)
        values[:10] = np.float32(0.5)  # exactly on a grid value
        values[10:15] = np.float32(1.0)  # a saturated sigmoid: must still not pass a 1.0 threshold
        scores[layer] = values
    # Deeper heads are right more often, so the search has a real trade-off.
    predictions = {
        layer: np.where(rng.random(size) < 0.4 + 0.04 * i, labels, rng.integers(0, 4, size))
        for i, layer in enumerate(layers)
    }
    full = np.where(rng.random(size) < 0.5, labels, rng.integers(0, 4, size))
    return ExitTable(scores, predictions, full, labels, flops_model(TINY_SHAPE, 128, 4))


def test_simulation_charges_flops_like_the_flops_model() -> None:
    table, layers = _table(), (6, 9, 11)
    outcome = simulate(table, layers, [0.7, 0.5, 1.0])
    for i in range(table.size):
        reached = sum(1 for layer in layers if layer <= outcome.exit_layer[i]) if outcome.exited[i] else len(layers)
        expected = table.flops.spent(int(outcome.exit_layer[i]), reached, not outcome.exited[i])
        assert outcome.flops[i] == expected
    assert not (outcome.exit_layer == 11).any()  # threshold 1.0 never exits, even at probability 1.0
    assert ((outcome.exit_layer == 9) & outcome.exited).sum() > 0


def test_thresholds_compare_in_float32_like_the_engine() -> None:
    threshold = 5 / 24  # a grid value whose float32 rounding lies below it
    assert float(np.float32(threshold)) < threshold
    values = np.array([np.float32(threshold), np.nextafter(np.float32(threshold), np.float32(0))], dtype=np.float32)
    engine = exits(torch.from_numpy(values), threshold).tolist()
    assert engine == [True, False]
    table = ExitTable({6: values}, {6: np.zeros(2, int)}, np.zeros(2, int), np.zeros(2, int), _table().flops)
    assert simulate(table, (6,), [threshold]).exited.tolist() == engine
    assert (reached(values, threshold_grid(25)) > 5).tolist() == engine  # grid index 5 is 5/24


def test_joint_sweep_equals_direct_simulation() -> None:
    table, layers = _table(), (6, 9, 11)
    grid = threshold_grid(25)
    result = sweep(table, layers, grid)
    assert result.accuracy.shape == (25, 25, 25)
    rng = np.random.default_rng(2)
    combos = [tuple(rng.integers(0, 25, 3)) for _ in range(40)] + [(0, 0, 0), (24, 24, 24), (12, 24, 0)]
    for combo in combos:
        outcome = simulate(table, layers, [float(grid[i]) for i in combo])
        assert result.accuracy[combo] == pytest.approx(outcome.accuracy, abs=1e-12)
        assert result.saving[combo] == pytest.approx(outcome.saving, abs=1e-12)


@pytest.mark.parametrize("joint_limit", [4, 1])  # 1: three layers go through coordinate descent
def test_threshold_search_respects_the_flops_budget(joint_limit: int) -> None:
    table, layers = _table(), (6, 9, 11)
    config = CalibrateConfig(balanced_budget=0.2, fast_budget=0.35, joint_search_max_layers=joint_limit)
    points = search(table, layers, config, threshold_grid(config.grid_points))
    brute = sweep(table, layers, threshold_grid(config.grid_points))
    for name, budget in (("accurate", 0.0), ("balanced", 0.2), ("fast", 0.35)):
        point = points[name]
        outcome = simulate(table, layers, point.thresholds)
        assert point.budget_met and outcome.saving >= budget
        assert point.accuracy == pytest.approx(outcome.accuracy)
        best_feasible = brute.accuracy[brute.saving >= budget].max()
        if joint_limit >= len(layers):
            assert point.accuracy == pytest.approx(best_feasible)  # the joint grid is exhaustive
        else:
            assert point.accuracy <= best_feasible + 1e-12


def test_unreachable_budget_falls_back_to_the_most_saving() -> None:
    accuracy = np.array([0.9, 0.8, 0.7])
    saving = np.array([0.0, 0.1, 0.2])
    assert best_setting(accuracy, saving, 0.05) == (1, True)
    assert best_setting(accuracy, saving, 0.5) == (2, False)


def test_pareto_front_keeps_only_undominated_settings() -> None:
    accuracy = np.array([0.5, 0.6, 0.55, 0.4, 0.6])
    saving = np.array([0.3, 0.1, 0.2, 0.35, 0.05])
    assert pareto_front(accuracy, saving) == [(0.1, 0.6), (0.2, 0.55), (0.3, 0.5), (0.35, 0.4)]


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
    labels = np.array([1, 0, 3])
    predictions = {6: np.array([1, 0, 3]), 7: np.array([1, 1, 3]), 8: np.array([2, 2, 3])}
    table = ExitTable(
        {layer: np.zeros(3, np.float32) for layer in predictions},
        predictions,
        np.array([0, 0, 0]),
        labels,
        flops_model(TINY_SHAPE, 128, 4),
    )
    outcome = pabee(table, (6, 7, 8), patience=2)
    assert outcome.exit_layer.tolist() == [7, 12, 7]  # image 1's heads never agree twice in a row
    assert outcome.exited.tolist() == [True, False, True]
    assert outcome.predictions.tolist() == [1, 0, 3]  # image 1 gets the full-depth answer
    flops = table.flops
    assert outcome.flops[0] == flops.embed + 7 * flops.block + 2 * flops.head
    three = pabee(table, (6, 7, 8), patience=3)
    assert three.exited.tolist() == [False, False, True] and three.predictions.tolist() == [0, 0, 3]
    assert three.flops[0] == flops.full_depth + 3 * flops.head
    assert pabee(table, (6, 7, 8), patience=1).exit_layer.tolist() == [6, 6, 6]


def test_four_quadrants_add_up() -> None:
    early = np.array([1, 1, 0, 0, 1, 0, 1], dtype=bool)
    full = np.array([1, 0, 1, 0, 0, 0, 1], dtype=bool)
    result = four_quadrants(early, full)
    assert result["counts"] == {"both_correct": 2, "rescue": 2, "loss": 1, "both_wrong": 2}
    assert sum(result["counts"].values()) == result["images"] == 7
    assert result["net_gain"] == 1
    assert result["net_gain_points"] == pytest.approx(100 / 7)


def test_gate_selectivity_splits_exited_and_continued() -> None:
    table = _table(size=100)
    outcome = simulate(table, (6, 9, 11), [0.8, 0.9, 1.0])
    full_correct = table.full_predictions == table.labels
    result = gate_selectivity(outcome, full_correct)
    assert result["exited"]["images"] + result["continued"]["images"] == 100
    assert result["exited"]["accuracy"] == pytest.approx(outcome.correct[outcome.exited].mean())
    # Images that continue take the full-depth path, so their accuracy is the full path's on them.
    assert result["continued"]["accuracy"] == result["continued"]["int8_full_depth_accuracy"]


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
    splits = make_splits(config, tmp_path)
    names = open_clip.IMAGENET_CLASSNAMES
    assert splits.labels == (names[0], names[1], names[5])
    assert {name: len(splits.splits[name].items) for name in SPLIT_NAMES} == {
        "head": 4,
        "gate": 3,
        "calib": 3,
        "eval": 2,
    }
    everything = make_splits(DataConfig(**{**config.__dict__, "label_space": "imagenet-1k"}), tmp_path)
    assert len(set(everything.labels)) == 1000  # the engine refuses repeated labels; ImageNet repeats two names
    assert (everything.labels[657], everything.labels[744]) == ("missile", "missile (2)")
    assert {label for split in everything.splits.values() for label in split.labels} == {0, 1, 5}


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
    splits = make_splits(config, tmp_path)
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
        make_splits(DataConfig(source=str(tmp_path), head_split=3, gate_split=1, calib_split=1, eval_split=1), tmp_path)


def test_per_class_limit_keeps_every_split_stratified(tmp_path: Path) -> None:
    for count, name in ((30, "many"), (6, "few")):
        for i in range(count):
            _png(tmp_path / name / f"{i}.png")
    config = DataConfig(source=str(tmp_path), per_class_limit=6, head_split=0.5, gate_split=1 / 6, calib_split=1 / 6)
    splits = make_splits(config, tmp_path)
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


def test_generated_world_source(tmp_path: Path) -> None:
    world = pytest.importorskip("training.clip.world")
    if not hasattr(world, "export_imagefolder"):
        pytest.skip("training.clip.world has no export_imagefolder yet")
    splits = make_splits(
        DataConfig(source="world:test:shapes:40", head_split=0.5, gate_split=0.2, calib_split=0.15), tmp_path
    )
    assert splits.labels == tuple(world.label_names("shapes"))  # classes.txt, present or not
    assert sum(len(s.items) for s in splits.splits.values()) == 40


# ---- config ------------------------------------------------------------------------------------------------------
def test_build_config_round_trips_through_json() -> None:
    config = BuildConfig(
        backbone=BackboneConfig("lraee-tiny-vit12", pretrained="/w.safetensors", model_config_file="/m.json"),
        quant_mode="full",
        data=DataConfig(source="/data", head_split=500, gate_split=0.1, templates=("a {}", "the {}")),
        extract=ExtractConfig(candidate_layers=(9, 11, 12)),
        calibrate=CalibrateConfig(balanced_budget=0.13),
        checkpoint_dir="/out",
    )
    again = BuildConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config
    assert isinstance(again.data.head_split, int) and isinstance(again.data.gate_split, float)
    with pytest.raises(ValueError, match="unknown keys"):
        BuildConfig.from_json({**config.to_json(), "surprise": 1})


def test_threshold_grid_is_25_points_in_the_unit_interval() -> None:
    grid = threshold_grid(25)
    assert len(grid) == 25 and grid[0] == 0.0 and grid[-1] == 1.0
    assert np.allclose(np.diff(grid), 1 / 24)


@pytest.mark.parametrize("total", [7, 24, 25, 101])
def test_fractional_split_sizes_never_ask_for_more_images_than_there_are(total: int) -> None:
    from training.pipeline.data import _counts

    sizes = _counts([0.5, 0.2, 0.15, 0.15], total, ["head", "gate", "calib", "eval"])
    assert sum(sizes) == total  # 24 images once asked for 12 + 5 + 4 + 4 = 25
    assert _counts([10, 0.5, 0.5], 30, ["a", "b", "c"]) == [10, 15, 15]
