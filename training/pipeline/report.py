"""The evaluation report as Markdown plus PNG plots (matplotlib's Agg canvas: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .profile import PROFILE_PLOT, LayerProfile

PARETO_PLOT = "pareto.png"
EXITS_PLOT = "exits.png"
REPORT_MARKDOWN = "report.md"


def plot_profile(layers: Sequence[LayerProfile], path: Path, title: str = "") -> None:
    """NSR/INR, INT8-vs-FP32 cosine and largest activations per layer."""
    x = [p.layer for p in layers]
    figure = Figure(figsize=(12, 3.8))
    figure.subplots_adjust(left=0.07, right=0.97, bottom=0.14, top=0.84, wspace=0.55)
    nsr_axis, cosine_axis, max_axis = figure.subplots(1, 3)
    (nsr_line,) = nsr_axis.plot(x, [p.nsr for p in layers], "o-", label="NSR")
    nsr_axis.set_yscale("log")
    nsr_axis.set_ylabel("NSR: noise / block change")
    inr_axis = nsr_axis.twinx()
    (inr_line,) = inr_axis.plot(x, [p.inr for p in layers], "s--", color="tab:orange", label="INR = 1 / NSR")
    inr_axis.set_yscale("log")
    nsr_axis.legend(handles=[nsr_line, inr_line], fontsize=8)
    nsr_axis.set_title("noise-to-signal ratio")
    cosine_axis.plot(x, [p.cosine for p in layers], "o-")
    cosine_axis.ticklabel_format(axis="y", useOffset=False)
    cosine_axis.set_title("cosine(INT8, FP32) per token")
    max_axis.plot(x, [p.max_abs_fp32 for p in layers], "o-", label="FP32")
    max_axis.plot(x, [p.max_abs_int8 for p in layers], "s--", label="INT8")
    max_axis.set_title("max |activation|")
    max_axis.legend()
    for axis in (nsr_axis, cosine_axis, max_axis):
        axis.set_xticks(x)
        axis.set_xlabel("layer (blocks run)")
    if title:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs FLOPs saving: the Pareto fronts of LRA-EE and confidence-only, plus every reported method."""
    figure = Figure(figsize=(7, 5))
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    axis = figure.subplots()
    for name, curve in report["pareto"].items():
        front = curve["front"]
        title = report["methods"][name]["title"]
        axis.step(
            [100 * s for s, _ in front], [100 * a for _, a in front], "o-", where="post", markersize=3, label=title
        )
    for row in report["comparison"]:
        axis.scatter(100 * row["flops_saved"], 100 * row["accuracy"], marker="x", zorder=3)
        axis.annotate(row["method"], (100 * row["flops_saved"], 100 * row["accuracy"]), fontsize=7)
    axis.set_xlabel("FLOPs saved (%)")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("evaluation split: accuracy vs FLOPs saved")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def plot_exits(report: dict[str, Any], path: Path) -> None:
    """Where images leave, per operating point of LRA-EE (distilled)."""
    points = report["methods"]["lraee-distilled"]["operating_points"]
    figure = Figure(figsize=(7, 4))
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.91)
    axis = figure.subplots()
    keys = list(next(iter(points.values()))["exit_shares"])
    width = 0.8 / max(1, len(points))
    for i, (name, point) in enumerate(points.items()):
        axis.bar(
            [k + i * width for k in range(len(keys))],
            [100 * point["exit_shares"][key] for key in keys],
            width=width,
            label=name,
        )
    axis.set_xticks([k + width * (len(points) - 1) / 2 for k in range(len(keys))])
    axis.set_xticklabels([f"layer {key}" if key != "full" else "full depth" for key in keys])
    axis.set_ylabel("images (%)")
    axis.set_title("LRA-EE (distilled): exit distribution on the evaluation split")
    axis.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (numbers from ``report``; plots referenced by file name)."""
    data = report["data"]
    default = report["default_operating_point"]
    lines = [
        "# LRA-EE evaluation report",
        "",
        f"Checkpoint `{report['checkpoint']}`; evaluation split: {report['eval_images']} images of "
        f"`{data['eval_source'] or data['source']}`, {data['num_labels']} labels; default operating point "
        f"`{default}`. FLOPs saved are against the INT8 full-depth path, exit heads and gates included.",
        "",
        "## Comparison",
        "",
    ]
    lines += _table(
        ["Method", "Top-1 (%)", "FLOPs saved (%)"],
        [(row["method"], _pct(row["accuracy"]), _pct(row["flops_saved"])) for row in report["comparison"]],
    )
    lines += ["## Operating points (calibrated on the calib split, measured on the eval split)", ""]
    rows = []
    for method in report["methods"].values():
        for point, values in method["operating_points"].items():
            shares = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in values["exit_shares"].items())
            thresholds = ", ".join(
                f"{layer}: {t:.3f}" for layer, t in zip(method["layers"], values["thresholds"], strict=True)
            )
            rows.append(
                (
                    method["title"],
                    point,
                    thresholds,
                    _pct(values["accuracy"]),
                    _pct(values["flops_saved"]),
                    _pct(values["calib_accuracy"]),
                    _pct(values["calib_flops_saved"]),
                    shares,
                )
            )
    lines += _table(
        ["Method", "Point", "Thresholds (layer: t)", "Top-1", "Saved", "Calib top-1", "Calib saved", "Exits"], rows
    )
    quadrants = report["four_quadrants"]
    lines += [f"## Four-quadrant decomposition: LRA-EE (distilled, {default}) vs INT8 full depth", ""]
    titles = {
        "both_correct": "Both correct",
        "rescue": "Rescue (EE right, full wrong)",
        "loss": "Loss (EE wrong, full right)",
        "both_wrong": "Both wrong",
    }
    lines += _table(
        ["Outcome", "Images", "%"],
        [(titles[k], quadrants["counts"][k], f"{quadrants['percent'][k]:.2f}") for k in titles]
        + [("Net gain (rescue - loss)", quadrants["net_gain"], f"{quadrants['net_gain_points']:+.2f}")],
    )
    selectivity = report["gate_selectivity"]
    lines += ["## Gate selectivity", ""]
    lines += _table(
        ["Group", "Images", "LRA-EE top-1 (%)", "INT8 full-depth top-1 (%)"],
        [
            (group, values["images"], _pct(values["accuracy"]), _pct(values["int8_full_depth_accuracy"]))
            for group, values in selectivity.items()
        ],
    )
    lines += ["## Exit distribution", "", f"![exits]({EXITS_PLOT})", ""]
    lines += _table(
        ["Exit", "Images (%)"],
        [
            (f"layer {k}" if k != "full" else "full depth", f"{100 * v:.2f}")
            for k, v in report["exit_distribution"].items()
        ],
    )
    lines += ["## Pareto sweep", "", f"![pareto]({PARETO_PLOT})", ""]
    for name, curve in report["pareto"].items():
        lines.append(
            f"- {report['methods'][name]['title']}: layers {curve['layers']}, {curve['settings']} settings "
            f"({curve['kind']}), {len(curve['front'])} on the front."
        )
    lines += ["", "## QIRC profile", "", f"![profile]({PROFILE_PLOT})", ""]
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
        f"The checkpoint loaded through `lraee_core.load_classifier` on {engine['images']} evaluation "
        f"images: {'agrees with' if engine['ok'] else 'DISAGREES with'} the simulation."
    )
    lines.append("")
    lines += _table(
        ["Setting", "Agree", "Near threshold", "Unexplained", "Engine top-1", "Simulated top-1", "Exits (eng/sim)"],
        [
            (
                name,
                f"{c['agree']}/{c['images']}",
                c["near_threshold"],
                c["unexplained_disagreements"],
                _pct(c["engine_accuracy"]),
                _pct(c["simulated_accuracy"]),
                f"{c['engine_exits']}/{c['simulated_exits']}",
            )
            for name, c in engine["settings"].items()
        ],
    )
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: Path) -> None:
    """report.md + pareto.png + exits.png + profile.png into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    plot_pareto(report, directory / PARETO_PLOT)
    plot_exits(report, directory / EXITS_PLOT)
    plot_profile([LayerProfile(**p) for p in report["profile"]], directory / PROFILE_PLOT)
    (directory / REPORT_MARKDOWN).write_text(markdown(report) + "\n")
