"""The generated blocks of README.md and docs/*.md, rendered from the committed reports: ``python -m docs.generate``.

A generated block sits between two comment lines:

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

``python -m docs.generate`` rewrites every block's body with what ``BLOCKS[NAME]`` renders now; ``--check`` changes
nothing and exits 1 naming each stale or unknown block (``make docs`` / ``make docs-check``; tests/test_docs.py runs
the check). The renderers only read JSON under reports/, bench/results/ and the embedded checkpoints' manifests, so
a rebuilt model's figures reach every page in seconds: rerun the generator after its reports are committed. Figures
in pages belong in these blocks, never typed into prose, where they go stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.embedded.reports.summary_tables import (
    EVERYDAY_EVAL_FILE,
    backends_table,
    checkpoints_table,
    everyday_table,
    exit_probe_table,
    quant_modes_table,
    quant_speed_table,
    ship_choice_table,
    table,
    training_stages_table,
)

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
BENCH_RESULT = ROOT / "bench" / "results" / "latest.json"
ASSETS = ROOT / "lraee_core" / "assets"
EMBEDDED = ("everyday", "photos", "world")  # the embedded checkpoints, default first
PAGES = ("README.md", "docs/*.md")  # where generated blocks may stand

# A block's marker lines stand alone on their lines (a marker quoted in prose is no block).
BLOCK = re.compile(
    r"(?P<open>^<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<close>^<!-- end generated -->$)",
    re.DOTALL | re.MULTILINE,
)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _reports(*folders: str) -> list[Path]:
    return [REPORTS / folder for folder in folders]


def _stage_number(path: Path) -> int:
    return int(path.name.split(".stage")[1].split(".")[0])


def clip_training() -> str:
    """The CLIP training stages behind the embedded models: world, photos, then every everyday stage in order."""
    logs = {
        "`world`": _json(REPORTS / "world" / "clip_training_log.json"),
        "`photos`": _json(REPORTS / "photos" / "clip_training_log.json"),
    }
    for path in sorted((REPORTS / "everyday").glob("clip_training_log.stage*.json"), key=_stage_number):
        logs[f"`everyday` {_stage_number(path)}"] = _json(path)
    return training_stages_table(logs)


def bench_table(backbone: str) -> str:
    """One backbone of the latest ``make bench`` result: every row's images/s at batch 1 and 32 (median and the
    spread over rounds) and the FLOPs it saved at batch 32."""
    result = _json(BENCH_RESULT)
    rows = result["backbones"][backbone]["rows"]
    lines = ["| row | images/s, batch 1 | images/s, batch 32 | FLOPs saved |", "|---|---|---|---|"]
    for row in rows:
        saved = row.get("flops_saving_batch32")
        lines.append(
            f"| {row['title']} | {row['batch1_images_per_s']:.1f} | {row['batch32_images_per_s']:.1f} | "
            + ("–" if saved is None else f"{100 * saved:.1f}%")
            + " |"
        )
    return "\n".join(lines)


def bench_standing() -> str:
    """The latest bench run: when and where, then each target it chases and where it stands (never asserted)."""
    result = _json(BENCH_RESULT)
    meta = result["meta"]
    lines = [
        f"Run {meta['timestamp']} at commit {meta['git_commit']}: {meta['cpu_count']} CPUs, {meta['threads']} threads, "
        f"medians of {meta['repeats']} interleaved rounds, load average {meta['load_average_before']} before and "
        f"{meta['load_average_after']} after; torch {meta['versions']['torch']}, onnxruntime "
        f"{meta['versions']['onnxruntime']}.",
        "",
    ]
    for name, backbone in result["backbones"].items():
        lines += [f"- {name}: {line}" for line in backbone["standing"]]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "checkpoints": lambda: checkpoints_table({name: _json(ASSETS / name / "manifest.json") for name in EMBEDDED}),
    "ship-choice": lambda: ship_choice_table(
        {
            "everyday": _json(REPORTS / "everyday" / "tiny-val" / "report.json"),
            "photos": _json(REPORTS / "photos" / "tiny-val" / "report.json"),
            "world": _json(REPORTS / "world" / "colour_shape-test" / "report.json"),
        },
        {name: _json(ASSETS / name / "manifest.json")["calibration"].get("charges", {}) for name in EMBEDDED},
    ),
    "everyday-eval": lambda: everyday_table(
        {
            "everyday": _json(REPORTS / "everyday" / "everyday-eval" / EVERYDAY_EVAL_FILE),
            "photos": _json(REPORTS / "everyday" / "photos-eval" / EVERYDAY_EVAL_FILE),
        }
    ),
    "everyday-sweep": lambda: table(_reports("everyday/tiny-val", "everyday/ilsvrc-val")),
    "photos-sweep": lambda: table(_reports("photos/tiny-val", "photos/ilsvrc-val")),
    "world-sweep": lambda: table(
        _reports("world/colour_shape-test", "world/colour_shape-heldout", "world/shapes-test", "world/colours-test")
    ),
    "everyday-backends": lambda: backends_table(
        {
            backend: _json(REPORTS / "everyday" / "backends" / f"everyday-tiny-val-{backend}.json")
            for backend in ("onnxruntime", "torch")
        }
    ),
    "exit-ablation-everyday-5way": lambda: exit_probe_table(
        _json(REPORTS / "everyday" / "exit-ablation" / "probe.json"), "everyday-5way"
    ),
    "exit-ablation-tiny-names-10way": lambda: exit_probe_table(
        _json(REPORTS / "everyday" / "exit-ablation" / "probe.json"), "tiny-names-10way"
    ),
    "clip-training": clip_training,
    "quant-modes": lambda: quant_modes_table(_json(REPORTS / "quant-modes" / "summary.json")).rstrip("\n"),
    "quant-modes-speed": lambda: quant_speed_table(_json(REPORTS / "quant-modes" / "speed.json")),
    "bench-default": lambda: bench_table("default"),
    "bench-vit-b-32": lambda: bench_table("ViT-B-32"),
    "bench-standing": bench_standing,
}


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return sorted(path for pattern in PAGES for path in root.glob(pattern))


def regenerate(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated block rendered anew, and the names of blocks that are not in ``BLOCKS``."""
    unknown: list[str] = []

    def render(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            unknown.append(name)
            return match[0]
        try:
            body = BLOCKS[name]()
        except (OSError, KeyError, ValueError, TypeError) as error:  # a report moved, renamed or reshaped
            raise RuntimeError(f"generated block {name!r} could not be rendered: {error!r}") from error
        return match["open"] + body.rstrip("\n") + "\n" + match["close"]

    return BLOCK.sub(render, text), unknown


def block_names(text: str) -> list[str]:
    """The names of the generated blocks in ``text``, in order."""
    return [match["name"] for match in BLOCK.finditer(text)]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite every generated block, or (``--check``) report the stale ones and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m docs.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale or unknown")
    args = parser.parse_args(argv)
    problems = []
    for page in pages():
        text = page.read_text()
        fresh, unknown = regenerate(text)
        name = page.relative_to(ROOT)
        problems += [f"{name}: unknown generated block {block!r}" for block in unknown]
        if fresh != text:
            if args.check:
                problems.append(f"{name}: generated blocks are stale (python -m docs.generate rewrites them)")
            else:
                page.write_text(fresh)
                print(f"rewrote {name}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
