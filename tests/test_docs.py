"""README.md and docs/ stay true: their tables of figures are the committed reports rendered now, the README stays
short enough to read, its settings table is app/settings.py's, its API table names every route, and no relative link
is broken.

A table of figures in a page stands between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` and is
rewritten by ``python -m docs.generate`` (``make docs``); a figure typed into such a block, or a block left behind
when its reports changed, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from docs.generate import BLOCKS, block_names, pages, regenerate

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 25_000  # characters: a README for people, not lab notes (issue 40)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
MIB = 1024 * 1024


def test_there_are_pages_with_generated_blocks() -> None:
    names = [name for page in pages() for name in block_names(page.read_text())]
    assert "checkpoints" in block_names(README.read_text())
    assert set(names) == set(BLOCKS), "every renderer stands in a page, and every block has a renderer"


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_generated_blocks_are_the_reports_rendered_now(page: Path) -> None:
    text = page.read_text()
    fresh, unknown = regenerate(text)
    assert not unknown, f"blocks without a renderer in docs/generate.py: {unknown}"
    assert fresh == text, f"{page.name}: a generated block is stale or edited by hand; run `python -m docs.generate`"


def test_generated_blocks_open_and_close() -> None:
    for page in pages():
        text = page.read_text()
        opened = re.findall(r"^<!-- generated: .* -->$", text, re.MULTILINE)
        closed = re.findall(r"^<!-- end generated -->$", text, re.MULTILINE)
        assert len(opened) == len(closed) == len(block_names(text)), page.name


def test_a_typed_in_figure_fails() -> None:
    page = next(page for page in pages() if "everyday-eval" in block_names(page.read_text()))
    text = page.read_text()
    edited = text.replace("| everyday-5way | everyday |", "| everyday-5way | everyday | 1 |", 1)
    assert edited != text and regenerate(edited)[0] != edited


def test_readme_is_short() -> None:
    assert len(README.read_text()) <= README_LIMIT


def test_readme_has_the_two_commands() -> None:
    text = README.read_text()
    assert "make serve" in text and "make test" in text


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for match in LINK.finditer(page.read_text()):
        target = match["target"]
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor of the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


# ---- the README's settings and API tables against the code --------------------------------------------------------


def table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows (cells stripped) of the Markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def shown_default(name: str, value: Any) -> str:
    """How the settings table writes a default: '–' for none, MiB for byte sizes, thousands separators."""
    if value is None or value == ():
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(Path(item).name if isinstance(item, Path) else str(item) for item in value)
    if isinstance(value, int) and name.endswith("bytes") and value % MIB == 0:
        return f"{value // MIB} MiB"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_settings_table_is_app_settings() -> None:
    from app.settings import Settings

    rows = table_rows(README.read_text(), "| variable | default | meaning |")
    documented = {row[0].strip("`"): row[1] for row in rows}
    expected = {
        f"LRAEE_{name.upper()}": shown_default(name, field.default) for name, field in Settings.model_fields.items()
    }
    assert set(documented) == set(expected), "the README's settings table and app/settings.py name other variables"
    wrong = {name: (documented[name], default) for name, default in expected.items() if documented[name] != default}
    assert not wrong, f"README default vs app/settings.py default: {wrong}"


def test_api_table_names_every_route() -> None:
    from fastapi.routing import APIRoute

    from app.main import create_app

    documented = " ".join(row[0] for row in table_rows(README.read_text(), "| endpoint | what it does |"))
    missing = [
        f"{method} {route.path}"
        for route in create_app().routes
        if isinstance(route, APIRoute) and route.include_in_schema  # the page and Swagger's redirect are not API
        for method in sorted((route.methods or set()) - {"HEAD"})
        if f"`{method} {route.path}`" not in documented
    ]
    assert not missing, f"routes the README's API table does not name: {missing}"


def test_checkpoints_table_reads_manifest_formats_3_and_4() -> None:
    """The README's checkpoint table renders a format-4 manifest (one record per operating point) as it renders the
    same points in format 3's parallel maps, so a rebuilt checkpoint regenerates it without a change here."""
    import json

    from training.embedded.reports.summary_tables import checkpoints_table

    old: dict[str, Any] = {
        "checkpoint_id": "x",
        "backbone": {"model_name": "lraee-tiny-vit12"},
        "quant_mode": "full",
        "num_layers": 12,
        "width": 128,
        "image_size": 64,
        "head": {"pooling": "cls"},
        "candidate_layers": [6],
        "default_operating_point": "balanced",
        "format_version": 3,
        "operating_points": {"accurate": {"6": 0.9}, "balanced": {"6": 0.8}},
        "promises": {"accurate": 0.99, "balanced": 0.97},
        "label_caps": {"accurate": 5, "balanced": 10},
    }
    new = json.loads(json.dumps(old))
    for key in ("promises", "label_caps"):
        del new[key]
    new["format_version"] = 4
    new["operating_points"] = {
        name: {"promise": old["promises"][name], "label_cap": old["label_caps"][name], "thresholds": {"2": layers}}
        for name, layers in old["operating_points"].items()
    }
    rendered = checkpoints_table({"x": old})
    assert rendered == checkpoints_table({"x": new})
    assert "`accurate` ≥99%, ≤5 labels; `balanced` (default) ≥97%, ≤10 labels" in rendered
