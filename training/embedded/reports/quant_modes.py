"""The everyday default rebuilt under each quant mode, and one summary across them (``reports/quant-modes``).

``python -m training.embedded.reports.quant_modes build MODE [--eval tiny-val|ilsvrc-val]`` reruns the shipped
everyday checkpoint's own build command (read from its manifest: the same CLIP weights, holdout photos, splits,
seeds, head and gate settings, templates) with ``--quant MODE``, into ``runs/quant_builds/MODE/EVAL`` and its report
into ``reports/quant-modes/MODE/EVAL``. ``tiny-val`` evaluates on 3,030 Tiny-ImageNet val photos as the shipped build
does; ``ilsvrc-val`` on the 259 ILSVRC2012 val photos, copying the head/gate/calib features from the mode's tiny-val
work dir (the same photos). ``paper`` copies its features from the shipped build's work dir when it is there.

``python -m training.embedded.reports.quant_modes summary`` reads every report there and writes ``summary.json``
(which docs/quant-modes.md's table is rendered from: ``summary_tables.quant_modes_table``), ``summary.md`` and
``qirc.png`` (NSR, cosine and outlier share per layer and mode). The tower timings beside them (``speed.json``)
are a benchmark: ``python -m bench.quant_speed``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lraee_core.assets import EMBEDDED_CHECKPOINTS
from lraee_core.checkpoint import read_manifest
from lraee_core.paths import REPO_ROOT, data_root
from training.pipeline.cli import main as cli
from training.pipeline.config import CalibrateConfig
from training.pipeline.search import prune_layers

RUNS = REPO_ROOT / "runs" / "quant_builds"
REPORTS = REPO_ROOT / "reports" / "quant-modes"
SHIPPED_WORK = REPO_ROOT / "runs" / "everyday_builds" / "tiny-val" / "work"  # the shipped build's work dir
MODES = ("paper", "static", "static-a6", "static-a4")
EVALS = ("tiny-val", "ilsvrc-val")
ILSVRC_VAL = "${repo}/data/imagenet-photos/acuity"
_OWN_FLAGS = ("--work-dir", "--out", "--report-dir", "--checkpoint-id", "--quant", "--eval-data", "--eval-limit")


def shipped_command() -> list[str]:
    """The shipped everyday checkpoint's build options, roots resolved, without the ones each mode sets itself."""
    checkpoint = EMBEDDED_CHECKPOINTS["everyday"]
    command = list(read_manifest(checkpoint).calibration["command"])[2:]  # after "lraee-train build"
    roots = {"${checkpoint}": str(checkpoint), "${repo}": str(REPO_ROOT), "${data}": str(data_root())}
    options: list[str] = []
    index = 0
    while index < len(command):
        flag = command[index]
        if flag in _OWN_FLAGS:
            index += 2
            continue
        options.append(flag)
        index += 1
    for position, value in enumerate(options):
        for root, path in roots.items():
            value = value.replace(root, path)
        options[position] = value
    return options


def eval_options(name: str) -> list[str]:
    """The evaluation photos of ``name``, as the everyday recipe evaluates them."""
    checkpoint_command = read_manifest(EMBEDDED_CHECKPOINTS["everyday"]).calibration["command"]
    if name == "tiny-val":
        at = checkpoint_command.index("--eval-data")
        limit = checkpoint_command.index("--eval-limit")
        tiny = checkpoint_command[at + 1].replace("${repo}", str(REPO_ROOT))
        return ["--eval-data", tiny, "--eval-limit", checkpoint_command[limit + 1]]
    return ["--eval-data", ILSVRC_VAL.replace("${repo}", str(REPO_ROOT))]


def build(mode: str, evaluation: str) -> int:
    """Build the everyday checkpoint under ``mode`` evaluated on ``evaluation``; returns the CLI's status."""
    work = RUNS / mode / evaluation / "work"
    reuse: list[str] = []
    if evaluation != "tiny-val":
        reuse = ["--reuse-features", str(RUNS / mode / "tiny-val" / "work" / "extract")]
    elif mode == "paper" and (SHIPPED_WORK / "extract").is_dir():
        reuse = ["--reuse-features", str(SHIPPED_WORK / "extract")]
    return cli(
        [
            "build",
            "--work-dir", str(work),
            "--out", str(RUNS / mode / evaluation / "checkpoint"),
            "--report-dir", str(REPORTS / mode / evaluation),
            "--checkpoint-id", f"everyday-tiny-{mode}",
            "--quant", mode,
            *shipped_command(),
            *eval_options(evaluation),
            *reuse,
            # One thread (the last --threads wins): two OpenMP threads on two cores shared with other work stall at
            # every barrier (extraction ran at 2-3 images/s here); the figures do not depend on it.
            "--threads", "1",
        ]
    )  # fmt: skip


# ---- summary -----------------------------------------------------------------------------------------------------
def _reports() -> dict[str, dict[str, dict[str, Any]]]:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in MODES:
        for evaluation in EVALS:
            path = REPORTS / mode / evaluation / "report.json"
            if path.is_file():
                found.setdefault(mode, {})[evaluation] = json.loads(path.read_text())
    return found


def _k_name(report: dict[str, Any], k: int) -> str:
    return f"{k} (all)" if k == report["num_labels"] else str(k)


def mode_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one report the summary compares across modes."""
    counts = [int(k) for k in report["four_quadrants"]]
    point = report["default_operating_point"]
    shipped = report["shipped_method"]
    sweep = {}
    for k in counts:
        key = str(k)
        quadrant = report["four_quadrants"][key]
        curve = report["methods"][shipped]["operating_points"][point]["held_out"][key]
        sweep[key] = {
            "fp32_top1": report["baselines"]["fp32_full_depth"][key]["top1"],
            "int8_top1": report["baselines"]["int8_full_depth"][key]["top1"],
            "lraee_top1": curve["top1"],
            "agreement": curve["agreement"],
            "flops_saved": curve["flops_saved"],
            "rescue": quadrant["counts"]["rescue"],
            "loss": quadrant["counts"]["loss"],
            "net_gain_points": quadrant["net_gain_points"],
        }
    profile = report["profile"]
    inr = {p["layer"]: p["inr"] for p in profile}
    # The build prunes among its cached candidate layers only; the rule run over every layer shows where else it fires.
    _, every_layer = prune_layers(inr, sorted(inr), CalibrateConfig().prune_fraction)
    return {
        "images": report["eval_images"],
        "num_labels": report["num_labels"],
        "shipped_method": shipped,
        "operating_point": point,
        "candidate_layers": report["methods"][shipped]["layers"],
        "pruned_layers": [{"layer": p["layer"], "inr": p["inr"]} for p in report["pruned_layers"]],
        "rule_on_every_layer": [{"layer": p.layer, "inr": p.inr} for p in every_layer],
        "final_cosine": profile[-1]["cosine"],
        "max_nsr": max(p["nsr"] for p in profile),
        "max_nsr_layer": max(profile, key=lambda p: p["nsr"])["layer"],
        "profile": [
            {key: p.get(key) for key in ("layer", "nsr", "inr", "cosine", "mse", "outlier_share")} for p in profile
        ],
        "sweep": sweep,
    }


def sign_test(rescued: int, lost: int) -> float:
    """Exact two-sided sign-test p-value of ``rescued`` against ``lost`` (McNemar's test on the discordant pairs)."""
    total = rescued + lost
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, i) for i in range(min(rescued, lost) + 1)) / 2**total
    return min(1.0, 2 * tail)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def render(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown tables of the summary: QIRC per mode, and per evaluation the K-sweep with the four quadrants."""
    lines = [
        "# LRA-EE per quant mode (everyday CLIP, the shipped build's data and settings)",
        "",
        "Generated by `python -m training.embedded.reports.quant_modes summary` from the reports in this folder.",
        "`static` runs torch's INT8 kernels (W8A8, fixed calibrated scales); `static-a6` / `static-a4` are",
        "*simulated* (fake-quant) with 6 / 4 activation bits on the same ranges.",
        "Rescue: the exit answers right where INT8 full depth is wrong;",
        "loss: the reverse (the shipped method at its default operating point, per label count K). Pruning: the",
        "build's INR rule (INR below half its neighbours' mean) over its candidate layers, and over every layer.",
        "",
        "## QIRC profile per mode",
        "",
        "![qirc](qirc.png)",
        "",
        "| Mode | Eval | Final-layer cosine | Max NSR (layer) | Pruned candidates (INR) | Rule over all layers "
        "| Exit layers shipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, evaluations in summary.items():
        for evaluation, s in evaluations.items():
            pruned = ", ".join(f"{p['layer']} ({p['inr']:.3g})" for p in s["pruned_layers"]) or "none"
            anywhere = ", ".join(f"{p['layer']} ({p['inr']:.3g})" for p in s["rule_on_every_layer"]) or "none"
            lines.append(
                f"| {mode} | {evaluation} | {s['final_cosine']:.5f} | {s['max_nsr']:.4g} ({s['max_nsr_layer']}) | "
                f"{pruned} | {anywhere} | {s['candidate_layers']} |"
            )
    for evaluation in EVALS:
        rows = [(mode, e[evaluation]) for mode, e in summary.items() if evaluation in e]
        if not rows:
            continue
        first = rows[0][1]
        lines += [
            "",
            f"## {evaluation}: {first['images']} photos, {first['num_labels']} labels",
            "",
            "| Mode | Method @ point | K | FP32 top-1 | INT8 full top-1 | LRA-EE top-1 | Agreement | FLOPs saved "
            "| Rescued | Lost | Net (points) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, s in rows:
            for k, row in s["sweep"].items():
                k_name = f"{k} (all)" if int(k) == s["num_labels"] else k
                lines.append(
                    f"| {mode} | {s['shipped_method']} @ {s['operating_point']} | {k_name} | "
                    f"{_pct(row['fp32_top1'])} | {_pct(row['int8_top1'])} | {_pct(row['lraee_top1'])} | "
                    f"{_pct(row['agreement'])} | {_pct(row['flops_saved'])} | {row['rescue']} | {row['loss']} | "
                    f"{row['net_gain_points']:+.2f} |"
                )
    lines += [
        "",
        "## Does LRA-EE beat its own full depth (rescued > lost)?",
        "",
        "p: exact two-sided sign test (McNemar) of rescued against lost, the only images where the two disagree.",
        "",
    ]
    for mode, evaluations in summary.items():
        for evaluation, s in evaluations.items():
            wins = [
                f"{k} ({row['rescue']} vs {row['loss']}, p = {sign_test(row['rescue'], row['loss']):.2g})"
                for k, row in s["sweep"].items()
                if row["rescue"] > row["loss"]
            ]
            verdict = f"yes at K = {'; '.join(wins)}" if wins else "no, at no K"
            lines.append(f"- {mode}, {evaluation}: {verdict}.")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """NSR (log), token cosine to FP32 and outlier share per layer, one line per mode (tiny-val profiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, evaluations in summary.items():
        s = evaluations.get("tiny-val") or next(iter(evaluations.values()))
        layers = [p["layer"] for p in s["profile"]]
        axes[0].semilogy(layers, [p["nsr"] for p in s["profile"]], marker="o", label=mode)
        axes[1].plot(layers, [1 - p["cosine"] for p in s["profile"]], marker="o", label=mode)
        axes[2].plot(layers, [100 * (p["outlier_share"] or 0) for p in s["profile"]], marker="o", label=mode)
    axes[1].set_yscale("log")
    titles = ("NSR per layer", "1 - token cosine to FP32", "FP32 outliers (% beyond 6 RMS)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("layer")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_summary() -> dict[str, Any]:
    """Write summary.json, summary.md and qirc.png from the reports found; returns the summary."""
    summary = {
        mode: {evaluation: mode_summary(report) for evaluation, report in evaluations.items()}
        for mode, evaluations in _reports().items()
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (REPORTS / "summary.md").write_text(render(summary))
    if summary:
        plot(summary, REPORTS / "qirc.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``build MODE [--eval NAME]`` or ``summary``."""
    parser = argparse.ArgumentParser(prog="python -m training.embedded.reports.quant_modes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("build", help="build the everyday checkpoint under one quant mode")
    one.add_argument("mode", choices=MODES)
    one.add_argument("--eval", default="tiny-val", choices=EVALS)
    sub.add_parser("summary", help="summarise every report in reports/quant-modes")
    sub.add_parser("speed", help="moved to the benchmark: python -m bench.quant_speed")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["speed"]:
        print("quant_modes speed moved to the benchmark: run python -m bench.quant_speed", file=sys.stderr)
        return 2
    args = parser.parse_args(arguments)
    if args.command == "build":
        return build(args.mode, args.eval)
    write_summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
