"""The full-depth baselines a user would otherwise pick, as a user writes them: the whole vision tower in PyTorch
INT8 (paper mode) and as one ONNX Runtime INT8 graph, with zero-shot logits, softmax and top-k on top.

No backend lives here: the LRA-EE engines of the benchmark come from :func:`lraee_core.load_classifier` with its
``quant_mode=`` and ``backend=`` overrides. The ORT tower reuses the ONNX export and INT8 quantization of
:mod:`lraee_core.backends.onnxruntime`, so the baseline and the engine's ORT backend convert the same matmuls.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from lraee_core.backbone import ClipBackbone
from lraee_core.backends.onnxruntime import (
    INPUT,
    OUTPUT,
    ExportTimings,
    StagedGraphs,
    export_onnx,
    quantize_int8,
    quantized_nodes,
    run_session,
    session_options,
)
from lraee_core.heads import class_logits
from lraee_core.quantize import PerImageDynamicLinear, quantize_vision


def tower_classifier(
    encode: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor, logit_scale: float, top_k: int = 5
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Full-depth zero-shot classification as a user writes it: features -> cosine logits -> softmax -> top-k."""
    text = text.float()

    @torch.inference_mode()
    def classify(images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(encode(images).float(), dim=-1)
        probabilities = class_logits(features, text, logit_scale).softmax(dim=-1)
        return probabilities.topk(min(top_k, text.shape[0])).indices

    return classify


def torch_int8_tower(fp32: ClipBackbone) -> nn.Module:
    """A paper-mode INT8 copy of the vision tower, as the engine quantizes it."""
    tower = copy.deepcopy(fp32.visual)
    quantize_vision(tower, "paper")
    return tower


def plain_quantize_dynamic(module: nn.Module) -> nn.Module:
    """Remove the engine's per-image activation-scale wrappers: a bare ``quantize_dynamic`` (diagnosis only)."""
    for name, child in list(module.named_children()):
        if isinstance(child, PerImageDynamicLinear):
            setattr(module, name, child.quantized)
        else:
            plain_quantize_dynamic(child)
    return module


def compose_tower(graphs: StagedGraphs, path: Path) -> Path:
    """Chain the staged graphs into one tower graph (input ``input`` -> output ``output``), as one export would be.

    Every tensor of stage ``s`` is renamed ``s<index>/<name>`` except the links: each stage reads the previous
    stage's output.
    """
    tower: onnx.ModelProto | None = None
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    previous_output = INPUT
    stages = graphs.stages
    for index, stage_path in enumerate(stages):
        model = onnx.load(str(stage_path))
        if tower is None:
            tower = model
        last = index == len(stages) - 1

        def rename(name: str, index: int = index, previous: str = previous_output, last: bool = last) -> str:
            if name == INPUT:
                return previous
            if name == OUTPUT:
                return OUTPUT if last else f"s{index}/{OUTPUT}"
            return f"s{index}/{name}" if name else name

        for node in model.graph.node:
            node.name = f"s{index}/{node.name}"
            node.input[:] = [rename(name) for name in node.input]
            node.output[:] = [rename(name) for name in node.output]
            nodes.append(node)
        for initializer in model.graph.initializer:
            initializer.name = rename(initializer.name)
            initializers.append(initializer)
        for info in model.graph.value_info:
            info.name = rename(info.name)
            value_info.append(info)
        previous_output = rename(OUTPUT)
    assert tower is not None
    first, final = (
        onnx.load(str(stages[0]), load_external_data=False),
        onnx.load(str(stages[-1]), load_external_data=False),
    )
    graph = onnx.helper.make_graph(
        nodes, "vision_tower", list(first.graph.input), list(final.graph.output), initializers, value_info=value_info
    )
    composed = onnx.helper.make_model(graph, opset_imports=list(tower.opset_import), ir_version=tower.ir_version)
    onnx.save(composed, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


class OrtVisionTower:
    """The whole vision tower as one ORT INT8 graph: images [B, 3, H, W] -> features [B, E] (unnormalised).

    ``method="export"`` exports the tower in one ``torch.onnx.export`` call, as a user would; ``"compose"`` chains
    the staged graphs of :func:`export_staged` into the same tower graph in a fraction of the time (``--quick``).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        workdir: Path,
        threads: int,
        *,
        method: str = "export",
        staged: StagedGraphs | None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if method == "export":
            example = torch.randn(2, 3, backbone.shape.image_size, backbone.shape.image_size)
            fp32 = export_onnx(backbone.visual, example, workdir / "tower.onnx")
        elif method == "compose" and staged is not None:
            fp32 = compose_tower(staged, workdir / "tower.onnx")
        else:
            raise ValueError(f"unknown tower method {method!r} (compose needs the staged graphs)")
        self.method = method
        exported = time.perf_counter()
        int8 = quantize_int8(fp32, workdir / "tower.int8.onnx")
        quantized = time.perf_counter()
        self.session = ort.InferenceSession(str(int8), session_options(threads), providers=["CPUExecutionProvider"])
        self.timings = ExportTimings(exported - started, 0.0, quantized - exported, time.perf_counter() - quantized)
        self.converted = quantized_nodes(int8)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, images, per_image=False)
