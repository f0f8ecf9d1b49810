"""A checkpoint's engine answers for rows of images, each with its own labels, under named exit rules, written as JSON.

Run as ``python -m tests.engine_answers IN.json OUT.json`` in a process whose environment picks the kernels (see
:func:`tests.decisions.another_instruction_set`): the instruction set a library runs is fixed when it loads, so a
test that wants another one asks a fresh process. IN: ``{"checkpoint", "images": [paths], "labels": [[label, ...]
per image], "templates": [...] or null, "rules": {name: {layer: threshold}}}``. OUT: ``{name: [[exit_layer,
exit_path, top-1 label, flops] per image]}``; every image is classified alone, as a client's single request is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lraee_core import load_classifier
from lraee_core.exits import ExitRule
from lraee_core.images import load_image


def answers(request: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """OUT for IN (module docstring)."""
    classifier = load_classifier(request["checkpoint"])
    images = torch.stack([classifier.backbone.preprocess(load_image(Path(p))) for p in request["images"]])
    result: dict[str, list[list[Any]]] = {}
    for name, thresholds in request["rules"].items():
        rule = ExitRule.from_thresholds({int(layer): value for layer, value in thresholds.items()})
        result[name] = []
        for row, labels in enumerate(request["labels"]):
            [answer] = classifier.classify(
                images[row : row + 1], labels, templates=request["templates"], top_k=1, exit_rule=rule
            )
            result[name].append([answer.exit_layer, answer.exit_path, answer.predictions[0].label, answer.flops])
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    source, target = sys.argv[1:3]
    Path(target).write_text(json.dumps(answers(json.loads(Path(source).read_text()))))
