"""The README's measurement tables are the committed reports rendered by the project's table scripts, never typed in.

Each table below is rendered from its reports and must stand in README.md verbatim; and every README table with one
of these headers must be one of the renderings, so a number typed into the README (or a table left behind when its
reports changed) fails here. A new table of these kinds is added to ``RENDERED`` with the reports it comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.embedded.everyday_eval import REPORT_FILE
from training.embedded.everyday_eval import table as everyday_eval_table
from training.embedded.reports.summary_tables import table as summary_table

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"

# README section -> the report folders its K-sweep table is rendered from
# (python -m training.embedded.reports.summary_tables)
SUMMARY_TABLES = {
    "everyday": ("everyday/tiny-val", "everyday/ilsvrc-val"),
    "photos": ("photos/tiny-val", "photos/ilsvrc-val"),
    "world": ("world/colour_shape-test", "world/colour_shape-heldout", "world/shapes-test", "world/colours-test"),
}
# The everyday evaluation table: model name -> its report folder (python -m training.embedded.everyday_eval --table)
EVERYDAY_EVAL = {
    "everyday": "everyday/everyday-eval",
    "photos": "everyday/photos-eval",
}


def rendered() -> dict[str, str]:
    """Name -> the Markdown table the scripts render from the committed reports."""
    tables = {name: summary_table([REPORTS / folder for folder in folders]) for name, folders in SUMMARY_TABLES.items()}
    reports = {name: json.loads((REPORTS / folder / REPORT_FILE).read_text()) for name, folder in EVERYDAY_EVAL.items()}
    tables["everyday evaluation"] = everyday_eval_table(reports)
    return tables


def readme_tables(text: str) -> list[str]:
    """Every Markdown table of ``text``: runs of consecutive lines that start with ``|``."""
    tables: list[list[str]] = []
    previous_was_row = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and previous_was_row:
            tables[-1].append(line)
        elif is_row:
            tables.append([line])
        previous_was_row = is_row
    return ["\n".join(rows) for rows in tables]


@pytest.mark.parametrize("name", [*SUMMARY_TABLES, "everyday evaluation"])
def test_each_rendered_table_stands_in_the_readme(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert rendered()[name] in readme_tables(readme), f"the README's {name} table is not its reports rendered"


def test_every_readme_table_of_these_kinds_is_a_rendering() -> None:
    renderings = rendered().values()
    headers = {table.splitlines()[0] for table in renderings}
    found = [table for table in readme_tables((ROOT / "README.md").read_text()) if table.splitlines()[0] in headers]
    assert len(found) == len(renderings)
    for table in found:
        assert table in renderings, table.splitlines()[:3]
