"""How far down a trained tiny CLIP carries its answer: its training exit heads probed on the validation tasks.

For a run of ``training.embedded.everyday`` with exit heads (``auxiliary.safetensors`` beside ``weights.safetensors``),
every validation task of ``training.embedded.everyday_eval`` (the same photos and label sets, FP32, the everyday
checkpoint's templates) is scored at full depth and through each exit head: top-1, and how often the head's top-1
equals the full-depth top-1. That agreement bounds what a gate can let leave at a layer under a promise, so it is
the ablation's figure for what each training loss did, measured before any LRA-EE build.

Run: ``python -m training.embedded.exit_probe RUN_DIR [RUN_DIR ...] --out FILE``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lraee_core.images import load_image
from training.embedded.everyday import EVERYDAY_TEMPLATES as TEMPLATES
from training.embedded.everyday import EverydayClipConfig
from training.embedded.everyday_eval import Item, everyday_tasks, imagenet_tasks
from training.embedded.exit_training import ExitTraining, exit_heads, probe
from training.embedded.trainer import AUXILIARY_FILE, LOG_FILE, WEIGHTS_FILE, build_model

TASKS = ("tiny-names-10way", "everyday-5way", "cifar10-10way", "intel-6way", "flowers-5way")


@torch.inference_mode()
def text_rows(model: Any, tokenizer: Any, labels: Sequence[str]) -> torch.Tensor:
    """Unit prompt-ensembled text embeddings [K, E] of ``labels`` over :data:`TEMPLATES`."""
    rows = []
    for start in range(0, len(labels), 64):
        chunk = labels[start : start + 64]
        prompts = [template.format(label) for label in chunk for template in TEMPLATES]
        features = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)
        mean = features.view(len(chunk), len(TEMPLATES), -1).mean(dim=1)
        rows.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(rows)


def probe_run(run_dir: Path, tasks: dict[str, list[Item]]) -> dict[str, Any]:
    """Every task through the run's CLIP and its exit heads (:func:`training.embedded.exit_training.probe`)."""
    log = json.loads((run_dir / LOG_FILE).read_text())
    config = log["config"]
    plan = ExitTraining.parse(config["exit_layers"], config["exit_pooling"], 1.0, 0.0)
    if plan is None:
        raise ValueError(f"{run_dir} trained no exit heads")
    model, preprocess, tokenizer = build_model(run_dir / WEIGHTS_FILE)
    heads = exit_heads(model, plan)
    heads.load_state_dict(load_file(run_dir / AUXILIARY_FILE))
    report: dict[str, Any] = {"run": run_dir.name, "steps": log["steps"], "config": config, "tasks": {}}
    for name, items in tasks.items():
        labels = sorted({label for item in items for label in item.labels})
        column = {label: i for i, label in enumerate(labels)}
        text = text_rows(model, tokenizer, labels)
        images = torch.stack([preprocess(load_image(item.image)) for item in items])
        sets = [[column[label] for label in item.labels] for item in items]
        report["tasks"][name] = {"images": len(items)} | probe(
            model, heads, images, text, sets, [item.truth for item in items]
        )
        print(run_dir.name, name, json.dumps(report["tasks"][name]), flush=True)
    return report


def table(reports: Sequence[dict[str, Any]], layers: Sequence[int] = (3, 6, 9, 11)) -> str:
    """Markdown: per probed run and task, the full-depth top-1 and the exit heads' agreement with it at ``layers``."""
    header = ["run", "steps", "task", "images", "full top-1", *(f"agree @{layer}" for layer in layers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for report in reports:
        for task, figures in report["tasks"].items():
            cells = [report["run"], str(report["steps"]), task, str(figures["images"])]
            cells.append(f"{100 * figures['full']['top1']:.1f}%")
            cells += [f"{100 * figures[str(layer)]['agreement_with_full']:.1f}%" for layer in layers]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Probe runs on the validation tasks; write their reports as one JSON list."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="everyday CLIP run folders with exit heads")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--train-dir", default=EverydayClipConfig().train_dir, help="extracted Tiny train photos")
    parser.add_argument("--sample", type=int, default=500, help="Tiny val photos sampled for the k-way tasks")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_dir = Path(args.train_dir)
    cfg = EverydayClipConfig(train_dir=str(train_dir))
    tasks = imagenet_tasks(train_dir.parent / "val", train_dir.parent / "acuity", args.sample, seed=0)
    tasks |= everyday_tasks(cfg)[0]
    tasks = {name: tasks[name] for name in TASKS}
    reports = [probe_run(run, tasks) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
