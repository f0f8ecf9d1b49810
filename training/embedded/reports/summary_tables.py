"""Markdown tables of the embedded models' committed reports, for docs/ (nothing typed by hand; ``python -m
docs.generate`` writes them into the pages). Each renderer only reads JSON, so the pages regenerate in seconds.

- :func:`table`: the K-sweep of ``lraee-train`` reports (``report.json``);
- :func:`everyday_table`: ``everyday_eval.json`` reports (:mod:`training.embedded.everyday_eval`), side by side;
- :func:`quant_modes_table`, :func:`quant_speed_table`: ``reports/quant-modes/summary.json`` and ``speed.json``;
- :func:`backends_table`: engine sweeps of one checkpoint on both backends (:mod:`training.pipeline.engine_sweep`);
- :func:`exit_probe_table`: the exit-training ablation (:mod:`training.embedded.exit_probe`);
- :func:`training_stages_table`: the CLIP training logs of a recipe's stages (``clip_training_log*.json``);
- :func:`ship_choice_table`: which exit heads each build shipped, and why (``report.json``'s ``ship_choice``);
- :func:`checkpoints_table`: what each embedded checkpoint is, from its ``manifest.json`` (formats 1-4).

``python -m training.embedded.reports.summary_tables reports/photos/tiny-val reports/photos/ilsvrc-val ...`` prints one
row per report and label count K: FP32 and INT8 full-depth top-1 (INT8 is the `full` operating point), and for each
operating point of the shipped method its held-out top-1, agreement with full depth and FLOPs saved. A build with word
sets adds rows "words, K" (label sets of everyday words: the image's word and K-1 words beside it), and one with
class groups a row "group NAME" per group (its images, labelled with the whole group; "images" is then their count).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.pipeline.word_sets import GROUP_KEY, WORD_KEY, group_of

METHOD = "lraee"
POINTS = ("accurate", "balanced", "fast")
EVERYDAY_EVAL_FILE = "everyday_eval.json"  # what training.embedded.everyday_eval writes into its --out folder
QUANT_MODES_KS = ("2", "10")  # label counts the quant-mode table shows, besides "all"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _rows(report: dict[str, Any], name: str) -> list[str]:
    points = report["methods"][report.get("shipped_method", METHOD)]["operating_points"]
    baselines = report["baselines"]
    rows = []
    words = [(WORD_KEY.format(k), f"words, {k}") for k in report.get("word_label_counts", [])]
    words += [(GROUP_KEY.format(name), f"group {name}") for name in report.get("class_groups", [])]
    names = [(str(k), f"{k} (all)" if k == report["num_labels"] else str(k)) for k in report["label_counts"]]
    for k, label in names + words:
        images = baselines["fp32_full_depth"][k]["rows"] if group_of(k) is not None else report["eval_images"]
        cells = [name, str(images), label]
        cells += [_pct(baselines["fp32_full_depth"][k]["top1"]), _pct(baselines["int8_full_depth"][k]["top1"])]
        for point in POINTS:
            held = points[point]["held_out"][k] if point in points else None
            cells.append(
                "–"
                if held is None
                else f"{_pct(held['top1'])} / {_pct(held['agreement'])} / {_pct(held['flops_saved'])}"
            )
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def table(directories: Sequence[Path]) -> str:
    """The Markdown table of the reports in ``directories`` (each holding report.json)."""
    header = (
        "| evaluation | images | K labels | FP32 full | INT8 full (`full`) "
        "| accurate (≥99%): top-1 / agreement / FLOPs saved | balanced (≥97%) | fast (≥93%) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = [row for d in directories for row in _rows(json.loads((d / "report.json").read_text()), d.name)]
    return "\n".join([header, *rows])


def everyday_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown table from ``everyday_eval.json`` reports keyed by a model name: per task and model, FP32 and INT8
    full-depth top-1, then top-1 / agreement with full depth / FLOPs saved at each operating point."""
    lines = [
        "| task | model | images | FP32 full | INT8 full (`full`) | "
        + " | ".join(f"{p}: top-1 / agreement / saved" for p in POINTS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(POINTS),
    ]
    tasks = next(iter(reports.values()))["tasks"]
    for task in tasks:
        for model, report in reports.items():
            if task not in report["tasks"]:
                continue
            rows = report["tasks"][task]["rows"]
            if "recall_at_5" in rows["int8-full"]:
                cells = [f"R@5 {rows[r]['recall_at_5']:.1%}" for r in ("fp32-full", "int8-full")] + ["–"] * len(POINTS)
            else:
                cells = [f"{rows[r]['top1']:.1%}" for r in ("fp32-full", "int8-full")]
                cells += [
                    f"{rows[p]['top1']:.1%} / {rows[p]['agreement_with_full']:.1%} / {rows[p]['flops_saved']:.1%}"
                    for p in POINTS
                ]
            lines.append(f"| {task} | {model} | {rows['int8-full']['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quant_modes_table(summary: dict[str, dict[str, dict[str, Any]]], evaluation: str = "tiny-val") -> str:
    """Per quant mode (``reports/quant-modes/summary.json``), the QIRC headline and, at a few K, full depth against
    the shipped exits at ``balanced``."""
    lines = [
        "| mode | cosine to FP32 at layer 12 | pruned | K | FP32 full top-1 | INT8 full top-1 | LRA-EE top-1 "
        "(balanced) | FLOPs saved | rescued / lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, evaluations in summary.items():
        s = evaluations.get(evaluation)
        if s is None:
            continue
        pruned = ", ".join(str(p["layer"]) for p in s["pruned_layers"]) or "none"
        everything = str(s["num_labels"])
        for k in (*QUANT_MODES_KS, everything):
            row = s["sweep"].get(k)
            if row is None:
                continue
            k_name = f"{k} (all)" if k == everything else k
            lines.append(
                f"| `{mode}` | {s['final_cosine']:.5f} | {pruned} | {k_name} | {100 * row['fp32_top1']:.2f}% | "
                f"{100 * row['int8_top1']:.2f}% | {100 * row['lraee_top1']:.2f}% | {100 * row['flops_saved']:.2f}% | "
                f"{row['rescue']} / {row['loss']} |"
            )
    return "\n".join(lines) + "\n"


def quant_speed_table(speed: dict[str, Any]) -> str:
    """Full-depth tower images/s per backbone and quant mode at batch 1 / 32 (``reports/quant-modes/speed.json``,
    written by ``python -m bench.quant_speed``)."""
    backbones = [name for name, value in speed.items() if isinstance(value, dict) and "images_per_s" in value]
    modes = list(speed[backbones[0]]["images_per_s"]) if backbones else []
    lines = ["| images/s (batch 1 / batch 32) | " + " | ".join(f"`{mode}`" for mode in modes) + " |"]
    lines.append("|---|" + "---|" * len(modes))
    for name in backbones:
        rates = speed[name]["images_per_s"]
        cells = [f"{rates[mode]['1']:.1f} / {rates[mode]['32']:.1f}" for mode in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def backends_table(sweeps: dict[str, dict[str, Any]]) -> str:
    """One checkpoint through the engine on each backend (``engine_sweep --backend`` reports keyed by backend): per
    label count K and operating point, agreement with full depth and FLOPs saved on each, and their largest gap."""
    names = list(sweeps)
    first = sweeps[names[0]]
    lines = [
        "| K | point | " + " | ".join(f"{name}: agreement / saved" for name in names) + " | largest gap (points) |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for k, by_k in first["k"].items():
        for point in by_k["points"]:
            if point == "full":
                continue
            figures = [sweeps[name]["k"][k]["points"][point] for name in names]
            gap = max(
                max(f[key] for f in figures) - min(f[key] for f in figures) for key in ("agreement", "flops_saved")
            )
            cells = [f"{_pct(f['agreement'])} / {_pct(f['flops_saved'])}" for f in figures]
            lines.append(f"| {k} | {point} | " + " | ".join(cells) + f" | {100 * gap:.2f} |")
    return "\n".join(lines)


def exit_probe_table(runs: Sequence[dict[str, Any]], task: str) -> str:
    """The exit-training ablation (``probe.json`` of :mod:`training.embedded.exit_probe`) on one task: per run, the
    full-depth top-1 and, per exit layer, how often that exit's top-1 equals the full-depth one."""
    layers = sorted({layer for run in runs for layer in run["tasks"][task] if layer.isdigit()}, key=int)
    lines = [
        "| run | steps | full-depth top-1 | " + " | ".join(f"block {layer}" for layer in layers) + " |",
        "|---|---|---|" + "---|" * len(layers),
    ]
    for run in runs:
        figures = run["tasks"][task]
        cells = [_pct(figures[layer]["agreement_with_full"]) if layer in figures else "–" for layer in layers]
        lines.append(f"| {run['run']} | {run['steps']} | {_pct(figures['full']['top1'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_stages_table(logs: dict[str, dict[str, Any]]) -> str:
    """One row per CLIP training stage (its ``training_log.json`` keyed by a stage name): steps run of the
    schedule's, batch size, peak learning rate, device, training loss at the end and wall-clock minutes."""
    lines = [
        "| stage | steps (of the schedule's) | batch | peak lr | device | final loss | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, log in logs.items():
        config = log["config"]
        stop = config.get("stop_step") or config["steps"]
        steps = f"{log['steps']}" + (f" (of {config['steps']})" if stop != config["steps"] else "")
        lines.append(
            f"| {stage} | {steps} | {config['batch_size']} | {config['lr']:g} | {config.get('device', 'cpu')} | "
            f"{log['final_loss']:.3f} | {log['wall_time_s'] / 60:.0f} |"
        )
    return "\n".join(lines)


HEAD_NAMES = {"lraee": "SSA (the paper's)", "cls-ee": "[CLS]"}  # report method keys -> the exit heads they train


def _by_heads(figures: dict[str, float]) -> str:
    return " / ".join(_pct(figures.get(method)) for method in HEAD_NAMES) if figures else "–"


def _charge_note(choice: dict[str, Any], charges: dict[str, Any] | None) -> str:
    """How the build charged each head: per layer as measured (a checkpoint's ``calibration.charges``, per pooling),
    else one constant."""
    measured = {pool: record["charges"] for pool, record in (charges or {}).items() if isinstance(record, dict)}
    measured = {pool: values for pool, values in measured.items() if values}
    if measured:
        cpu = next(iter((charges or {}).values())).get("cpu", {}).get("model", "this machine")
        spans = ", ".join(
            f"{'SSA' if pool == 'ssa' else '[CLS]'} {min(values.values()):.2f}–{max(values.values()):.2f}"
            for pool, values in sorted(measured.items(), reverse=True)
        )
        return f" (charges measured per layer on {cpu}: {spans} blocks)"
    return f" ({choice['head_cost_blocks']:g} blocks a head)" if "head_cost_blocks" in choice else ""


def ship_choice_table(reports: dict[str, dict[str, Any]], charges: dict[str, dict[str, Any]] | None = None) -> str:
    """Per build (``report.json`` keyed by a model name): the heads it shipped and the mean FLOPs saving on its
    calibration split at the default operating point of each kind of heads (and, with a head-time charge, the
    objective the choice compared), which ``--ship auto`` chose by. ``charges``: per model, its checkpoint's
    ``calibration.charges`` (the per-layer charges a build measured)."""
    lines = [
        "| model | shipped heads | calibration saving at the default point: SSA / [CLS] | objective with the head "
        "charge: SSA / [CLS] |",
        "|---|---|---|---|",
    ]
    for model, report in reports.items():
        choice = report.get("ship_choice", {})
        saving = choice.get("calib_mean_saving_at_default_point", {})
        objective = choice.get("calib_objective_at_default_point", {})
        shipped = HEAD_NAMES.get(report.get("shipped_method", METHOD), report.get("shipped_method", METHOD))
        charge = _charge_note(choice, (charges or {}).get(model))
        lines.append(f"| {model} | {shipped} | {_by_heads(saving)} | {_by_heads(objective)}{charge} |")
    return "\n".join(lines)


def _points(manifest: dict[str, Any]) -> list[tuple[str, float | None, int | None]]:
    """(name, promise, label cap) per stored operating point: format 4 records or formats 1-3's parallel maps."""
    stored = manifest["operating_points"]
    if int(manifest.get("format_version", 1)) >= 4:
        return [(name, record.get("promise"), record.get("label_cap")) for name, record in stored.items()]
    promises, caps = manifest.get("promises", {}), manifest.get("label_caps", {})
    return [(name, promises.get(name), caps.get(name)) for name in stored]


def checkpoints_table(manifests: dict[str, dict[str, Any]]) -> str:
    """What each checkpoint is (``manifest.json`` keyed by a model name): backbone, quant mode, exit heads,
    candidate layers, and per operating point its promise and label cap."""
    lines = [
        "| model | backbone | quant mode | exit heads | after blocks | operating points: promise, label cap |",
        "|---|---|---|---|---|---|",
    ]
    for model, manifest in manifests.items():
        backbone = manifest["backbone"]
        size = f"{manifest['num_layers']} blocks, width {manifest['width']}, {manifest['image_size']} px"
        heads = "[CLS]" if manifest["head"]["pooling"] == "cls" else "SSA"
        points = []
        for name, promise, cap in _points(manifest):
            default = " (default)" if name == manifest["default_operating_point"] else ""
            figures = [f"≥{_pct(promise).removesuffix('.0%')}%" if promise is not None else "no promise"]
            figures.append(f"≤{cap} labels" if cap is not None else "any label count")
            points.append(f"`{name}`{default} {', '.join(figures)}")
        layers = ", ".join(str(layer) for layer in manifest["candidate_layers"]) or "none"
        lines.append(
            f"| `{model}` | `{backbone['model_name']}` ({size}) | `{manifest['quant_mode']}` | {heads} | {layers} | "
            + "; ".join(points)
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    print(table(parser.parse_args(argv).reports))


if __name__ == "__main__":
    main()
