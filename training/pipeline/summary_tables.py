"""Markdown summary tables for the README, read from committed ``report.json`` files (nothing typed by hand).

``python -m training.pipeline.summary_tables reports/world/colour_shape-test reports/world/shapes-test ...`` prints one
row per report: FP32 and INT8 full-depth accuracy, and LRA-EE (distilled, the shipped method) accuracy and FLOPs
saved at every operating point, plus the four-quadrant rescue/loss counts at the default point.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METHOD = "lraee-distilled"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _row(report: dict[str, Any], name: str) -> str:
    by_method = {row["method"]: row for row in report["comparison"]}
    points = report["methods"][METHOD]["operating_points"]
    cells = [name, str(report["eval_images"]), str(report["data"]["num_labels"])]
    cells += [_pct(by_method["FP32 full depth"]["accuracy"]), _pct(by_method["INT8 full depth"]["accuracy"])]
    for point in ("accurate", "balanced", "fast"):
        if point in points:
            cells.append(f"{_pct(points[point]['accuracy'])} / {_pct(points[point]['flops_saved'])}")
        else:
            cells.append("–")
    quadrants = report["four_quadrants"]
    cells.append(f"{quadrants['counts']['rescue']} / {quadrants['counts']['loss']}")
    return "| " + " | ".join(cells) + " |"


def table(directories: Sequence[Path]) -> str:
    """The Markdown table of the reports in ``directories`` (each holding report.json)."""
    header = (
        "| evaluation | images | labels | FP32 full | INT8 full | LRA-EE accurate (acc / FLOPs saved) "
        "| balanced | fast | rescued / lost vs INT8 |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [_row(json.loads((d / "report.json").read_text()), d.name) for d in directories]
    return "\n".join([header, *rows])


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    print(table(parser.parse_args(argv).reports))


if __name__ == "__main__":
    main()
