"""The evaluation report as Markdown plus PNG plots (matplotlib's Agg canvas: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .profile import PROFILE_PLOT, LayerProfile, plot_profile
from .word_sets import GROUP_KEY, WORD_KEY, group_of, word_count_of

CURVE_PLOT = "agreement_vs_flops.png"
EXITS_PLOT = "exits.png"
REPORT_MARKDOWN = "report.md"


def _k_name(k: str, num_labels: int) -> str:
    if (count := word_count_of(k)) is not None:
        return f"words, K={count}"
    if (group := group_of(k)) is not None:
        return f"group {group}"
    return f"K={k} (all)" if int(k) == num_labels else f"K={k}"


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Agreement with full depth vs FLOPs saved, one panel per K: the shipped method's and confidence-only's
    threshold sweeps on the evaluation split, and the shipped operating points."""
    ks = [str(k) for k in report["label_counts"]]
    figure = Figure(figsize=(4 * len(ks), 4))
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.86, wspace=0.3)
    axes = figure.subplots(1, len(ks), squeeze=False)[0]
    points = report["methods"][report["shipped_method"]]["operating_points"]
    styles = ["-", "-.", "--"]
    for axis, k in zip(axes, ks, strict=True):
        for name, style in zip(report["curves"], styles, strict=False):
            curve = sorted(report["curves"][name].get(k, []), key=lambda entry: entry[1])
            axis.plot(
                [100 * saved for _, saved, _ in curve],
                [100 * agreement for _, _, agreement in curve],
                style,
                label=report["methods"][name]["title"],
            )
        for point, values in points.items():
            figures = values["held_out"][k]
            axis.scatter(100 * figures["flops_saved"], 100 * figures["agreement"], zorder=3)
            axis.annotate(point, (100 * figures["flops_saved"], 100 * figures["agreement"]), fontsize=8)
            axis.axhline(100 * values["promise"], color="grey", linewidth=0.5, linestyle=":")
        axis.set_title(_k_name(k, report["num_labels"]))
        axis.set_xlabel("FLOPs saved (%)")
        axis.set_ylim(max(0.0, axis.get_ylim()[0]), 100.5)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("agreement with full depth (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    figure.suptitle("evaluation split: agreement with the full-depth answer vs FLOPs saved, per label count")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def plot_exits(report: dict[str, Any], path: Path) -> None:
    """Where images leave under each operating point of the shipped method, per K (stacked shares)."""
    points = report["methods"][report["shipped_method"]]["operating_points"]
    ks = [str(k) for k in report["label_counts"]]
    figure = Figure(figsize=(4 * len(points), 3.8))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.86, wspace=0.25)
    axes = figure.subplots(1, len(points), squeeze=False)[0]
    for axis, (point, values) in zip(axes, points.items(), strict=True):
        keys = list(values["held_out"][ks[0]]["exit_shares"])
        bottom = [0.0] * len(ks)
        for key in keys:
            heights = [100 * values["held_out"][k]["exit_shares"][key] for k in ks]
            axis.bar(range(len(ks)), heights, bottom=bottom, label="full depth" if key == "full" else f"layer {key}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.set_xticks(range(len(ks)))
        axis.set_xticklabels([f"K={k}" for k in ks])
        axis.set_title(f"{point} (promise {100 * values['promise']:.0f}%)")
    axes[0].set_ylabel("images (%)")
    axes[-1].legend(fontsize=7)
    figure.suptitle(f"{report['methods'][report['shipped_method']]['title']}: exits on the evaluation split")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{key}: {100 * value:.0f}%" for key, value in shares.items() if value > 0)


BASELINE_TITLES = {
    "int8_full_depth": "INT8 full depth (`full`)",
    "fp32_full_depth": "FP32 full depth",
}


def _baseline_title(name: str) -> str:
    if name in BASELINE_TITLES:
        return BASELINE_TITLES[name]
    if name.startswith("pabee"):
        return f"PABEE (patience {name.rsplit('_', 1)[-1]})"
    return f"SSA-Last ({name.removeprefix('ssa_last_')} heads)"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (numbers from ``report``; plots referenced by file name)."""
    data = report["data"]
    default = report["default_operating_point"]
    num_labels = report["num_labels"]
    ks = [str(k) for k in report["label_counts"]]
    lines = [
        "# LRA-EE evaluation report",
        "",
        f"Checkpoint `{report['checkpoint']}`; evaluation split: {report['eval_images']} images of "
        f"`{data['eval_source'] or data['source']}`, {num_labels} labels. Every image is asked once per label count "
        "K with its true class and K-1 other classes. Agreement = the answer equals the INT8 full-depth answer (the "
        "`full` operating point); FLOPs saved are against that path, exit heads and gates included. Operating "
        "points promise an agreement; held-out figures are on this split, calibration figures on the calib split "
        "that chose the threshold. The evaluation split is held out of the build but it is a validation split, not a "
        "sealed test: whoever tunes a recipe reads these figures. "
        f"Default operating point `{default}`.",
        "",
        f"![agreement vs FLOPs saved]({CURVE_PLOT})",
        "",
    ]
    main = report["methods"][report["shipped_method"]]
    choice = report["ship_choice"]
    savings = ", ".join(
        f"{report['methods'][name]['title']}: {100 * value:.2f}%"
        for name, value in choice["calib_mean_saving_at_default_point"].items()
    )
    reason = f"mean FLOPs saved at `{default}` over K: {savings}"
    charge = choice.get("head_cost_blocks") or 0.0
    if charge:  # the search maximised FLOPs saved less a time charge per head and gate (training.pipeline.search)
        objectives = ", ".join(
            f"{report['methods'][name]['title']}: {100 * value:.2f}%"
            for name, value in choice["calib_objective_at_default_point"].items()
        )
        reason = f"its objective, FLOPs saved less {charge:g} blocks per head and gate run, at `{default}`: " + (
            f"{objectives}; {reason}"
        )
    lines += [
        f"## The shipped method: {main['title']}, layers {main['layers']}",
        "",
        f"Chosen by `{choice['rule']}` on the calib split ({reason}).",
        "",
    ]
    caps = {point: values.get("label_cap") for point, values in main["operating_points"].items()}
    if any(cap is not None for cap in caps.values()):
        listed = ", ".join(f"`{point}` {cap if cap is not None else 'none'}" for point, cap in caps.items())
        lines += [
            f"Label caps (the most labels for which a point runs its exits; a request with more gets the full-depth "
            f"answer at no head cost; chosen on the calib split): {listed}. The figures below include them.",
            "",
        ]
    rows: list[tuple[Any, ...]] = []
    word_keys = [WORD_KEY.format(k) for k in report.get("word_label_counts", [])]  # label sets of everyday words
    word_keys += [GROUP_KEY.format(name) for name in report.get("class_groups", [])]  # whole class groups
    for point, values in main["operating_points"].items():
        for k in ks + word_keys:
            held, calib = values["held_out"][k], values["calibration"].get(k)
            rows.append(
                (
                    point,
                    f"{100 * values['promise']:.0f}",
                    _k_name(k, num_labels),
                    _pct(held["agreement"]),
                    _pct(calib["agreement"]) if calib else "–",
                    _pct(held["top1"]),
                    _pct(report["baselines"]["int8_full_depth"][k]["top1"]),
                    _pct(held["flops_saved"]),
                    _pct(calib["flops_saved"]) if calib else "–",
                    _shares(held["exit_shares"]),
                )
            )
    lines += _table(
        [
            "Point",
            "Promise",
            "K",
            "Agreement held-out",
            "Agreement calib",
            "Top-1",
            "Top-1 full",
            "Saved held-out",
            "Saved calib",
            "Exits (held-out)",
        ],
        rows,
    )
    lines += [f"## Every method by label count (operating point `{default}`; baselines have none)", ""]
    for k in ks:
        rows = []
        for name, values in report["baselines"].items():
            rows.append(
                (
                    _baseline_title(name),
                    _pct(values[k]["top1"]),
                    _pct(values[k]["agreement"]),
                    _pct(values[k]["flops_saved"]),
                    "–",
                )
            )
        for method in report["methods"].values():
            held = method["operating_points"][default]["held_out"][k]
            rows.append(
                (
                    method["title"],
                    _pct(held["top1"]),
                    _pct(held["agreement"]),
                    _pct(held["flops_saved"]),
                    _shares(held["exit_shares"]),
                )
            )
        lines += [f"### {_k_name(k, num_labels)}", ""]
        lines += _table(["Method", "Top-1 (%)", "Agreement (%)", "FLOPs saved (%)", "Exits"], rows)
    lines += ["## Every operating point of every method (held-out agreement / FLOPs saved, %)", ""]
    rows = []
    for method in report["methods"].values():
        for point, values in method["operating_points"].items():
            cells = [
                f"{_pct(values['held_out'][k]['agreement'])} / {_pct(values['held_out'][k]['flops_saved'])}" for k in ks
            ]
            cap = values.get("label_cap")
            curve = ", ".join(f"{int(count)}: {threshold:.4f}" for count, threshold in values["thresholds"])
            rows.append((method["title"], point, curve, cap if cap is not None else "–", *cells))
    lines += _table(["Method", "Point", "Thresholds (K: t)", "Label cap", *[_k_name(k, num_labels) for k in ks]], rows)
    lines += [f"## Four-quadrant decomposition: {main['title']} ({default}) vs INT8 full depth, per K", ""]
    titles = {
        "both_correct": "Both correct",
        "rescue": "Rescue (EE right, full wrong)",
        "loss": "Loss (EE wrong, full right)",
        "both_wrong": "Both wrong",
    }
    quadrants = report["four_quadrants"]
    lines += _table(
        ["Outcome", *[_k_name(k, num_labels) for k in ks]],
        [
            (titles[key], *[f"{quadrants[k]['counts'][key]} ({quadrants[k]['percent'][key]:.1f}%)" for k in ks])
            for key in titles
        ]
        + [("Net gain (points)", *[f"{quadrants[k]['net_gain_points']:+.2f}" for k in ks])],
    )
    gates = report["gate_features"]
    lines += [
        "## Gate features",
        "",
        f"Chosen: `{', '.join(gates['chosen'])}`. Each candidate set was fitted on the gate split (agreement target, "
        "label sets with K log-uniform over 2..N) and scored on the calib split (its own label sets):",
        "",
    ]
    lines += _table(
        ["Feature set", "Features", "Mean calib AUC"],
        [
            (
                name,
                ", ".join(entry["features"]),
                "–" if entry["calib_auc_mean"] is None else f"{entry['calib_auc_mean']:.4f}",
            )
            for name, entry in gates["selection_calib_auc"].items()
        ],
    )
    lines += [
        "Held-out AUC (agreement with full depth) of the agreement gates vs the paper's gate, per K and layer:",
        "",
    ]
    rows = []
    for name, per_k in gates["eval_auc"].items():
        for k in ks:
            per_layer = ", ".join(f"{layer}: {'–' if v is None else f'{v:.3f}'}" for layer, v in per_k[k].items())
            rows.append((report["methods"][name]["title"], _k_name(k, num_labels), per_layer))
    lines += _table(["Gate", "K", "AUC per layer"], rows)
    baseline = report.get("cut_depth_baseline", {})
    if baseline:
        lines += [
            "## What the exits buy over cutting depth",
            "",
            "Beside each operating point, a plain shallower model that spends at least as many FLOPs: the first N "
            "blocks and the shipped head at N answering every image, no gate (held-out, %).",
            "",
        ]
        rows = []
        for point, values in main["operating_points"].items():
            for k in ks:
                cut = baseline.get(point, {}).get(k)
                held = values["held_out"][k]
                if cut is None:
                    continue
                rows.append(
                    (
                        point,
                        _k_name(k, num_labels),
                        f"{_pct(held['top1'])} / {_pct(held['agreement'])} / {_pct(held['flops_saved'])}",
                        f"{cut['layer']}",
                        f"{_pct(cut['top1'])} / {_pct(cut['agreement'])} / {_pct(cut['flops_saved'])}",
                    )
                )
        lines += _table(
            ["Point", "K", "LRA-EE top-1 / agreement / saved", "Cut at N", "Cut: top-1 / agreement / saved"], rows
        )
    lines += ["## Each head set's exits alone (agreement with full depth / top-1, %)", ""]
    rows = []
    for variant, layers in report["heads_alone"].items():
        for layer, per_k in layers.items():
            rows.append((variant, layer, *[f"{_pct(per_k[k]['agreement'])} / {_pct(per_k[k]['top1'])}" for k in ks]))
    lines += _table(["Heads", "Layer", *[_k_name(k, num_labels) for k in ks]], rows)
    lines += ["## Exit distribution", "", f"![exits]({EXITS_PLOT})", ""]
    lines += ["## QIRC profile", "", f"![profile]({PROFILE_PLOT})", ""]
    lines += _table(
        ["Layer", "NSR", "INR", "cosine", "MSE", "max abs FP32", "max abs INT8"],
        [
            (
                p["layer"],
                f"{p['nsr']:.4g}",
                f"{p['inr']:.4g}",
                f"{p['cosine']:.5f}",
                f"{p['mse']:.4g}",
                f"{p['max_abs_fp32']:.4g}",
                f"{p['max_abs_int8']:.4g}",
            )
            for p in report["profile"]
        ],
    )
    pruned = report["pruned_layers"]
    lines.append(
        "Pruned layers: " + ("; ".join(f"{p['layer']} ({p['reason']})" for p in pruned) if pruned else "none") + "."
    )
    lines += [f"Candidate pool after pruning: {report['candidate_pool']}.", "", "## Engine check", ""]
    engine = report["engine_check"]
    lines.append(
        f"The checkpoint loaded through `lraee_core.checkpoint.load_classifier` on {engine['images']} evaluation "
        f"images, each with its own label set: {'agrees with' if engine['ok'] else 'DISAGREES with'} the simulation."
    )
    lines.append("")
    lines += _table(
        ["Setting", "Agree", "Near threshold", "Unexplained", "FLOPs equal", "Engine agreement", "Exits (eng/sim)"],
        [
            (
                name,
                f"{c['agree']}/{c['images']}",
                c["near_threshold"],
                c["unexplained_disagreements"],
                c["flops_agree"],
                _pct(c["engine_agreement_with_full"]),
                f"{c['engine_exits']}/{c['simulated_exits']}",
            )
            for name, c in engine["settings"].items()
        ],
    )
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: Path) -> None:
    """report.md + agreement_vs_flops.png + exits.png + profile.png into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("pareto.png",):  # plots of the earlier report layout
        (directory / stale).unlink(missing_ok=True)
    plot_curves(report, directory / CURVE_PLOT)
    plot_exits(report, directory / EXITS_PLOT)
    plot_profile([LayerProfile(**p) for p in report["profile"]], directory / PROFILE_PLOT)
    (directory / REPORT_MARKDOWN).write_text(markdown(report) + "\n")
