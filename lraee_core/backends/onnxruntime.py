"""The ONNX Runtime backend: the vision tower's staged forward (``embed``, ``block(l)``) as ORT graphs.

The FP32 tower is exported with the dynamo ONNX exporter (its graphs ran about 2x faster in ORT than the legacy
TorchScript exporter's on ViT-B-32 here), then ``onnxruntime.quantization.quantize_dynamic`` converts MatMul/Gemm
weights to INT8 (per output channel; activations UINT8 with one scale per tensor computed at run time). Quant modes
convert the same matmuls as the torch backend: ``paper`` the two MLP matmuls of each block, ``full`` every weight
matmul of the blocks, ``none`` nothing. MatMuls between activations (attention scores) stay FP32, and so does the
patch-embedding convolution.

A dynamo export costs seconds per block, so one block is exported and the others are made by swapping its weights
in; every graph is checked against PyTorch in FP32 before it is quantized. ``pool_final`` ([CLS] LayerNorm +
projection of one token, 0.1% of the tower's FLOPs) and the text tower stay PyTorch FP32.

Activation scales: ORT's dynamic quantization takes one scale per input tensor, so a batched call would make an
image's result depend on its batch mates. :class:`OrtClipBackbone` therefore runs each image through its own
session call (per-image scales, the engine's batch-invariance promise); ``per_image_scales=False`` runs the batch at
once (what a bare ``quantize_dynamic`` does; benchmarks use it to show what the promise costs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from ..backbone import ClipBackbone
from ..config import QuantMode
from ..errors import BackboneError
from ..quantize import QuantReport
from . import BackendOptions

INPUT = "input"
OUTPUT = "output"
_QUANTIZED_OPS = ("MatMulInteger", "ConvInteger")
_WEIGHT_MATMULS = ("MatMul", "Gemm")
_PAPER_PREFIX = "mlp."  # the paper mode converts the MLP Linears of each block (see lraee_core.quantize)
_FP32_CHECK_TOLERANCE = 1e-3  # max |ORT - PyTorch| relative to max |PyTorch| for an FP32 block


class OrtExportError(BackboneError):
    """An exported graph does not reproduce its PyTorch module."""


def session_options(threads: int, *, interleaved: bool = False) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads, sequential execution, full graph optimisation.

    ``interleaved``: the session is called in alternation with PyTorch work (the staged backbone). ORT's idle
    workers then spin at most 10 us for more work; by default they spin on through the PyTorch ops between calls
    and starve them (the staged engine ran 8-10x slower at batch 1 on 2 cores here). A session that does all the
    work of a call (the whole tower) keeps ORT's default, which was faster for it.
    """
    options = ort.SessionOptions()
    if interleaved:
        options.add_session_config_entry("session.intra_op.spin_duration_us", "10")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``module`` (one tensor in, one out) with a dynamic batch dimension; returns ``path``."""
    if example.shape[0] < 2:
        raise ValueError("export with a batch of at least 2, or the exporter specialises the batch dimension to 1")
    batch = torch.export.Dim("batch")
    # The exporter logs its progress at INFO and warns about deprecated internals on every call.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        # It also prints progress lines to stdout, which would interleave with the benchmark's table.
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                (example,),
                None,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    if program is None:
        raise OrtExportError(f"the exporter returned no program for {type(module).__name__}")
    program.save(str(path))
    return path


def quantize_int8(source: Path, target: Path, nodes: Sequence[str] | None = None) -> Path:
    """ORT dynamic INT8 of the MatMul/Gemm weights: per output channel (QInt8), activations per tensor at run time.

    ``nodes`` limits the conversion to those node names (None: every MatMul/Gemm). The patch-embedding convolution
    stays FP32 (as in torch's paper mode): ORT's ConvInteger ran it 2.8x slower than its FP32 Conv on ViT-B-32
    here, which would hand LRA-EE a weaker baseline than a user can have.
    """
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its pre-processing hint
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=list(_WEIGHT_MATMULS),
        nodes_to_quantize=list(nodes) if nodes is not None else None,
    )
    return target


def quantized_nodes(path: Path) -> tuple[str, ...]:
    """Names of the integer matmul/conv nodes of a quantized graph."""
    model = onnx.load(str(path), load_external_data=False)
    return tuple(node.name for node in model.graph.node if node.op_type in _QUANTIZED_OPS)


def run_session(session: ort.InferenceSession, inputs: torch.Tensor, per_image: bool) -> torch.Tensor:
    """One graph over a batch, either at once or image by image (see the module docstring on scales)."""
    array = np.ascontiguousarray(inputs.detach().float().numpy())
    if not per_image or array.shape[0] == 1:
        return torch.from_numpy(session.run(None, {INPUT: array})[0])
    rows = [session.run(None, {INPUT: array[i : i + 1]})[0] for i in range(array.shape[0])]
    return torch.from_numpy(np.concatenate(rows))


@dataclass(frozen=True)
class ExportTimings:
    """Seconds spent building an ORT backend (reported, never part of a throughput)."""

    export_s: float  # torch -> ONNX FP32
    check_s: float  # FP32 graphs checked against PyTorch
    quantize_s: float  # ORT dynamic INT8 quantization
    session_s: float  # InferenceSession creation


def _initializer_sources(template: onnx.ModelProto, params: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Which parameter (and whether transposed) each weight initializer of an exported block holds.

    The exporter keeps parameters under their names except where it folded a transpose into a new constant; those
    are found by value and must match exactly one parameter. Initializers that match none are graph constants.
    """
    sources: dict[str, tuple[str, bool]] = {}
    for initializer in template.graph.initializer:
        value = numpy_helper.to_array(initializer)
        if initializer.name in params and params[initializer.name].shape == value.shape:
            sources[initializer.name] = (initializer.name, False)
            continue
        if value.dtype != np.float32 or value.ndim == 0 or value.size < 2:
            continue
        matches = [
            (name, transposed)
            for name, param in params.items()
            for transposed, candidate in ((False, param), (True, param.T))
            if candidate.shape == value.shape and np.array_equal(candidate, value)
        ]
        if len(matches) > 1:
            raise OrtExportError(f"initializer {initializer.name} matches several parameters: {matches}")
        if matches:
            sources[initializer.name] = matches[0]
    return sources


def _block_params(block: nn.Module) -> dict[str, np.ndarray]:
    return {name: value.detach().float().numpy() for name, value in block.state_dict().items()}


def _check_fp32(path: Path, module: nn.Module, example: torch.Tensor, what: str) -> None:
    """Raise :class:`OrtExportError` unless the FP32 graph at ``path`` reproduces ``module`` on ``example``."""
    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = module(example)
    got = torch.from_numpy(session.run(None, {INPUT: example.numpy()})[0])
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if error > _FP32_CHECK_TOLERANCE:
        raise OrtExportError(f"{what}: exported FP32 graph differs from PyTorch (relative max error {error:.2e})")


class _Stage(nn.Module):
    """One stage of the staged forward (``embed`` or ``pool_final``) as a module, so the exporter sees the tower's
    parameters as parameters (registered through ``visual``) rather than constants."""

    def __init__(self, backbone: ClipBackbone, stage: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.visual = backbone.visual
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


@dataclass(frozen=True)
class StagedGraphs:
    """FP32 ONNX files of the staged tower, each checked against PyTorch, and what making them cost."""

    embed: Path  # images [B, 3, H, W] -> layer 0 [B, T, D]
    blocks: tuple[Path, ...]  # block l (1-based: blocks[l - 1]): [B, T, D] -> [B, T, D]
    pool: Path  # last layer [B, T, D] -> features [B, E]
    mlp_nodes: tuple[str, ...]  # names of the MLP weight matmuls in every block graph (the same in each)
    export_s: float  # torch -> ONNX, including the weight swaps
    check_s: float  # running every graph against its PyTorch module

    @property
    def stages(self) -> tuple[Path, ...]:
        """Every graph in execution order."""
        return (self.embed, *self.blocks, self.pool)


def export_staged(backbone: ClipBackbone, workdir: Path) -> StagedGraphs:
    """Export embed, block 1 and pool; derive blocks 2..L from block 1 by swapping weights; check all in FP32."""
    workdir.mkdir(parents=True, exist_ok=True)
    shape = backbone.shape
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, shape.image_size, shape.image_size, generator=generator)
    hidden = torch.randn(2, shape.num_tokens, shape.width, generator=generator)
    blocks = list(backbone.visual.transformer.resblocks)

    started = time.perf_counter()
    embed = export_onnx(_Stage(backbone, backbone.embed), images, workdir / "embed.onnx")
    pool = export_onnx(_Stage(backbone, backbone.pool_final), hidden, workdir / "pool.onnx")
    template_path = export_onnx(blocks[0], hidden, workdir / "block01.onnx")
    template = onnx.load(str(template_path))
    sources = _initializer_sources(template, _block_params(blocks[0]))
    mlp_nodes = _weight_matmuls_of(template, sources, _PAPER_PREFIX)
    block_paths = [template_path]
    for index, block in enumerate(blocks[1:], start=2):
        params = _block_params(block)
        model = copy.deepcopy(template)
        for initializer in model.graph.initializer:
            if initializer.name in sources:
                name, transposed = sources[initializer.name]
                value = params[name].T if transposed else params[name]
                initializer.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), initializer.name))
        path = workdir / f"block{index:02d}.onnx"
        onnx.save(model, str(path))
        block_paths.append(path)
    exported = time.perf_counter()

    _check_fp32(embed, _Stage(backbone, backbone.embed), images, "embed")
    _check_fp32(pool, _Stage(backbone, backbone.pool_final), hidden, "pool")
    for index, (path, block) in enumerate(zip(block_paths, blocks, strict=True), start=1):
        _check_fp32(path, block, hidden, f"block {index}")
    return StagedGraphs(embed, tuple(block_paths), pool, mlp_nodes, exported - started, time.perf_counter() - exported)


def _weight_matmuls_of(model: onnx.ModelProto, sources: dict[str, tuple[str, bool]], prefix: str) -> tuple[str, ...]:
    """Names of the MatMul/Gemm nodes whose weight is a parameter named ``prefix...`` (e.g. the block's MLP)."""
    names = tuple(
        node.name
        for node in model.graph.node
        if node.op_type in _WEIGHT_MATMULS
        and any(name in sources and sources[name][0].startswith(prefix) for name in node.input)
    )
    if not names:
        raise OrtExportError(f"no weight matmul of the exported block reads a {prefix}* parameter")
    return names


class OrtClipBackbone(ClipBackbone):
    """A ClipBackbone whose ``embed`` and ``block`` run as ORT graphs (INT8 as ``quant_mode`` says); the text tower
    and ``pool_final`` stay PyTorch FP32."""

    def __init__(
        self,
        source: ClipBackbone,
        graphs: StagedGraphs,
        threads: int,
        *,
        quant_mode: QuantMode = "full",
        per_image_scales: bool = True,
    ) -> None:
        super().__init__(source.model, source.preprocess, source.tokenizer, source.config, source.weights_sha256)
        self.graphs = graphs
        self.per_image_scales = per_image_scales
        started = time.perf_counter()
        paths = [graphs.embed, *graphs.blocks]
        if quant_mode != "none":
            # The embed graph has no weight matmul (its convolution stays FP32); paper converts the MLPs only.
            nodes = graphs.mlp_nodes if quant_mode == "paper" else None
            paths = [graphs.embed, *(quantize_int8(p, p.with_suffix(".int8.onnx"), nodes) for p in graphs.blocks)]
        quantized = time.perf_counter()
        options = session_options(threads, interleaved=True)
        self._sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
        self.timings = ExportTimings(
            graphs.export_s, graphs.check_s, quantized - started, time.perf_counter() - quantized
        )
        names = ["embed"] + [f"block{index}" for index in range(1, len(graphs.blocks) + 1)]
        self.quant_report = QuantReport(
            mode=quant_mode,
            converted=tuple(
                f"{name}/{node}" for name, path in zip(names, paths, strict=True) for node in quantized_nodes(path)
            ),
        )

    def with_scales(self, per_image_scales: bool) -> OrtClipBackbone:
        """The same sessions with the other activation-scale policy."""
        other = copy.copy(self)
        other.per_image_scales = per_image_scales
        return other

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + positions + ln_pre in ORT: [B, 3, H, W] -> [B, T, D]."""
        return run_session(self._sessions[0], images, self.per_image_scales)

    def block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block number ``layer`` (1-based) in ORT: [B, T, D] -> [B, T, D]."""
        return run_session(self._sessions[layer], hidden, self.per_image_scales)


def prepare_onnxruntime(
    backbone: ClipBackbone, quant_mode: QuantMode, options: BackendOptions
) -> tuple[ClipBackbone, QuantReport]:
    """Export ``backbone``'s FP32 tower stage by stage, quantize it per ``quant_mode`` and open ORT sessions."""
    threads = options.threads or torch.get_num_threads()
    if options.workdir is not None:
        ort_backbone = OrtClipBackbone(
            backbone, export_staged(backbone, Path(options.workdir)), threads, quant_mode=quant_mode
        )
        return ort_backbone, ort_backbone.quant_report
    # Sessions hold their graphs in memory, so the files may go once the sessions exist.
    with tempfile.TemporaryDirectory(prefix="lraee-onnx-") as workdir:
        ort_backbone = OrtClipBackbone(backbone, export_staged(backbone, Path(workdir)), threads, quant_mode=quant_mode)
    return ort_backbone, ort_backbone.quant_report
