"""Markdown summary tables for the README, read from committed ``report.json`` files (nothing typed by hand).

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


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    print(table(parser.parse_args(argv).reports))


if __name__ == "__main__":
    main()
