"""The ONNX Runtime backend: the vision tower's staged forward (``embed``, ``block(l)``, ``blocks(first, last)``) as
ORT graphs.

Blocks are written directly as ONNX by :mod:`.ort_graphs` (every block checked in FP32 against its PyTorch module
first): INT8 Linears whose activation scale and zero point are computed per image inside the graph, so a whole
batch runs in one session call and each image's result is bit-identical to what it gets alone. Quant modes convert
the same Linears as the torch backend: ``paper`` the two MLP Linears of each block, ``full`` every Linear of the
blocks, ``none`` nothing. Attention scores and softmax stay FP32 (one fused ``MultiHeadAttention`` kernel), and so
does the embedding stage (exported with the dynamo exporter; ORT's ``ConvInteger`` ran the patch convolution 2.8x
slower than FP32 on ViT-B-32 here). A span's graph also holds what the engine reads at its last block, in FP32:
the exit head, the gate (logits against the rows' own label sets, features and probability) and, at the top, the
final [CLS] pooling and projection; each equals PyTorch's within float rounding. The text tower stays PyTorch FP32.

The exporter helpers below (:func:`export_onnx`, :func:`quantize_int8`, :func:`export_staged`) also build the
benchmark's baseline: the tower as one exported graph under ORT's own ``quantize_dynamic`` (one activation scale
per tensor, i.e. per batch).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import threading
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

from ..backbone import ClipBackbone, SpanHead, SpanOutput
from ..config import QuantMode
from ..errors import BackboneError
from ..gate import GateAnswer, GateParams, GateQuestion
from ..quant_base import QuantReport
from .options import BackendOptions
from .ort_graphs import (
    COLUMNS,
    ENTROPY_DIVISOR,
    EXIT,
    FINAL,
    LINEARS,
    LOG_K,
    LOGITS,
    PADDING,
    PREVIOUS,
    PROBABILITY,
    TEXT,
    TOP1,
    UnsupportedBlock,
    blocks_graph,
    embed_graph,
    final_in_graph,
)

INPUT = "input"
OUTPUT = "output"
# A span call on fewer activations than this (rows x tokens x width) runs on one thread: on the tiny default model
# two ORT threads were slower than one up to batch 2 and faster from batch 4 (1.53 vs 1.81 ms at batch 1, 5.2 vs
# 6.3 ms at batch 4, three blocks); ViT-B-32 at batch 1 (38,400) stays above it. Same results either way (tested).
SMALL_CALL = 32_768
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
    _compare(
        ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"]), module, example, what
    )


def _compare(session: ort.InferenceSession, module: nn.Module, example: torch.Tensor, what: str) -> None:
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


MODE_LINEARS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "paper": frozenset({"mlp.c_fc", "mlp.c_proj"}),  # what quantize_dynamic converts in open_clip (torch backend)
    "full": frozenset(LINEARS),
}


class OrtClipBackbone(ClipBackbone):
    """A ClipBackbone whose ``embed`` and spans (blocks, exit head, gate, final pooling) run as ORT graphs (INT8 as
    ``quant_mode`` says); the text tower stays PyTorch FP32.

    Blocks are written directly as ONNX (:mod:`.ort_graphs`): INT8 Linears with activation scales per image inside
    the graph, so a batch runs in one session call and each image gets the result it gets alone. A run of
    consecutive blocks (:meth:`blocks`) is one graph and one call; its session is built on first use and kept
    (the engine runs the same spans, between candidate layers, every time; the service's warm-up builds them).
    """

    def __init__(
        self,
        source: ClipBackbone,
        embed: onnx.ModelProto,
        threads: int,
        *,
        quant_mode: QuantMode = "full",
        per_image_scales: bool = True,
    ) -> None:
        super().__init__(source.model, source.preprocess, source.tokenizer, source.config, source.weights_sha256)
        if quant_mode not in MODE_LINEARS:
            raise BackboneError(f"the onnxruntime backend runs quant modes {tuple(MODE_LINEARS)}, not {quant_mode!r}")
        self.quant_mode = quant_mode
        self.per_image_scales = per_image_scales
        self.threads = threads
        self._quantize = MODE_LINEARS[quant_mode]
        self._options = session_options(threads, interleaved=True)
        self._small_options = session_options(1, interleaved=True)
        self._resblocks = list(self.visual.transformer.resblocks)  # FP32 modules the block graphs are written from
        self._lock = threading.Lock()
        # (first, last, id of the exit head, id of the gate and its logit scale, final pooling in the graph, one
        # thread) -> (session, its head and gate: kept so their ids cannot be reused by others)
        self._sessions: dict[_SessionKey, tuple[ort.InferenceSession, SpanHead | None, GateParams | None]] = {}
        self._final_in_graph = final_in_graph(self.visual)
        self._embed = ort.InferenceSession(embed.SerializeToString(), self._options, providers=["CPUExecutionProvider"])
        self.quant_report = QuantReport(
            mode=quant_mode,
            converted=tuple(
                f"transformer.resblocks.{index}.{linear}"
                for index in range(self.shape.num_layers)
                for linear in LINEARS
                if linear in self._quantize
            ),
        )

    def with_scales(self, per_image_scales: bool) -> OrtClipBackbone:
        """The same tower with the other activation-scale policy (its own block sessions, the same embed graph)."""
        other = copy.copy(self)
        other.per_image_scales = per_image_scales
        other._lock = threading.Lock()
        other._sessions = {}
        return other

    def _segment(
        self,
        first: int,
        last: int,
        head: SpanHead | None = None,
        final: bool = False,
        small: bool = False,
        gate: GateQuestion | None = None,
    ) -> ort.InferenceSession:
        # The head and gate are kept with their session, so their ids (part of the key) cannot be reused by others.
        params = None if gate is None else gate.params
        gate_key = None if gate is None else (id(params), gate.logit_scale)
        key = (first, last, None if head is None else id(head), gate_key, final, small)
        entry = self._sessions.get(key)
        if entry is None:
            with self._lock:
                entry = self._sessions.get(key)
                if entry is None:
                    graph = blocks_graph(
                        self._resblocks[max(first, 1) - 1 : last],
                        quantize=self._quantize,
                        per_image=self.per_image_scales,
                        head=head,
                        final=self.visual if final else None,
                        gate=params,
                        logit_scale=1.0 if gate is None else gate.logit_scale,
                        embed=self.visual if first == 0 else None,
                        tokens=self.shape.num_tokens,
                    )
                    options = self._small_options if small else self._options
                    session = ort.InferenceSession(
                        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
                    )
                    entry = self._sessions[key] = (session, head, params)
        return entry[0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + positions + ln_pre in ORT: [B, 3, H, W] -> [B, T, D]."""
        return run_session(self._embed, images, per_image=False)  # no quantized op: nothing depends on the batch

    def block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block number ``layer`` (1-based) in ORT: [B, T, D] -> [B, T, D]."""
        return self.blocks(layer, layer, hidden)

    def blocks(self, first: int, last: int, hidden: torch.Tensor) -> torch.Tensor:
        """Blocks ``first``..``last`` (1-based, inclusive) as one session call: [B, T, D] -> [B, T, D]."""
        if first < 1:
            raise ValueError(f"blocks {first}..{last} outside 1..{self.shape.num_layers}")
        return self.span(first, last, hidden).hidden

    def span(
        self,
        first: int,
        last: int,
        hidden: torch.Tensor,
        head: SpanHead | None = None,
        final: bool = False,
        gate: GateQuestion | None = None,
    ) -> SpanOutput:
        """Blocks ``first``..``last``, the exit head's embedding, its gate's verdict and the final embedding as one
        graph and one session call (see :meth:`ClipBackbone.span`); each image's outputs are its own whatever its
        batch."""
        if gate is not None and head is None:
            raise ValueError("a gate reads an exit head's embedding: pass the head too")
        if not (0 <= first <= last <= self.shape.num_layers and last >= 1):
            raise ValueError(f"blocks {first}..{last} outside 1..{self.shape.num_layers} (0: from the images)")
        top = final and last == self.shape.num_layers
        pooled_here = top and self._final_in_graph
        names = [OUTPUT] + ([EXIT] if head is not None else []) + ([FINAL] if pooled_here else [])
        names += [LOGITS, PROBABILITY, TOP1] if gate is not None else []
        array = np.ascontiguousarray(hidden.detach().float().numpy())
        feeds = {INPUT: array} if gate is None else {INPUT: array, **_gate_feeds(gate, array.shape[0])}
        small = self.threads > 1 and array.size < SMALL_CALL
        session = self._segment(first, last, head, pooled_here, small, gate)
        outputs = dict(zip(names, session.run(names, feeds), strict=True))
        out = torch.from_numpy(outputs[OUTPUT])
        exit_embedding = torch.from_numpy(outputs[EXIT]) if EXIT in outputs else None
        if pooled_here:
            final_embedding: torch.Tensor | None = torch.from_numpy(outputs[FINAL])
        else:
            final_embedding = self.final_embedding(out) if top else None
        answer = None
        if gate is not None:
            # probability and top1 come as [B, 1] columns (see ort_graphs._write_gate)
            answer = GateAnswer(
                torch.from_numpy(outputs[LOGITS]),
                torch.from_numpy(outputs[PROBABILITY].reshape(-1)),
                torch.from_numpy(outputs[TOP1].reshape(-1)),
            )
        return SpanOutput(out, exit_embedding, final_embedding, answer)


_SessionKey = tuple[int, int, int | None, tuple[int, float] | None, bool, bool]


def _gate_feeds(gate: GateQuestion, rows: int) -> dict[str, np.ndarray]:
    """A gated span's extra inputs (:data:`.ort_graphs.GATE_INPUTS`) for ``rows`` rows; with one label set every
    row reads all of ``text`` in order."""
    text = np.ascontiguousarray(gate.text.float().numpy())
    if gate.columns is None or gate.counts is None:
        feeds = dict(_one_label_set_feeds(text.shape[0], rows))
    else:
        counts = gate.counts.numpy()
        feeds = _label_count_feeds(counts)
        feeds[COLUMNS] = np.ascontiguousarray(gate.columns.numpy())
        feeds[PADDING] = np.arange(feeds[COLUMNS].shape[1]) >= counts[:, None]
    feeds[TEXT] = text
    feeds[PREVIOUS] = np.ascontiguousarray(gate.previous_top1.numpy()).reshape(-1, 1)
    return feeds


def _label_count_feeds(counts: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs that depend on each row's K alone: log K (as lraee_core.gate's log K per row) and the entropy's
    divisor."""
    log_k = np.log(counts.astype(np.float64)).astype(np.float32)[:, None]
    return {LOG_K: log_k, ENTROPY_DIVISOR: np.where(counts[:, None] > 1, -log_k, np.float32(-1.0))}


@functools.lru_cache(maxsize=256)
def _one_label_set_feeds(labels: int, rows: int) -> dict[str, np.ndarray]:
    """The label-set inputs of ``rows`` rows sharing one set of ``labels`` labels, made once per shape: every call
    with one label set (most of them) needs the same arrays. Read-only, so no caller can change a shared one."""
    feeds = _label_count_feeds(np.full(rows, labels, dtype=np.int64))
    feeds[COLUMNS] = np.arange(labels, dtype=np.int64)[None, :].repeat(rows, axis=0)
    feeds[PADDING] = np.zeros((rows, labels), dtype=bool)
    for array in feeds.values():
        array.flags.writeable = False
    return feeds


def checked_embed_graph(backbone: ClipBackbone) -> onnx.ModelProto:
    """The embedding stage as ONNX (:func:`.ort_graphs.embed_graph`), checked in FP32 against PyTorch."""
    try:
        graph = embed_graph(backbone.visual)
    except UnsupportedBlock as exc:
        raise OrtExportError(f"embed: {exc}") from exc
    shape = backbone.shape
    images = torch.randn(2, 3, shape.image_size, shape.image_size, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(graph.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    _compare(session, _Stage(backbone, backbone.embed), images, "embed")
    return graph


def check_block_graphs(backbone: ClipBackbone) -> float:
    """Raise :class:`OrtExportError` unless every block's FP32 graph reproduces its PyTorch block; returns seconds."""
    started = time.perf_counter()
    shape = backbone.shape
    hidden = torch.randn(2, shape.num_tokens, shape.width, generator=torch.Generator().manual_seed(0))
    options = session_options(1)
    for index, block in enumerate(backbone.visual.transformer.resblocks, start=1):
        try:
            graph = blocks_graph([block])
        except UnsupportedBlock as exc:
            raise OrtExportError(f"block {index}: {exc}") from exc
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        _compare(session, block, hidden, f"block {index}")
    return time.perf_counter() - started


def prepare_onnxruntime(
    backbone: ClipBackbone, quant_mode: QuantMode, options: BackendOptions
) -> tuple[ClipBackbone, QuantReport]:
    """Write ``backbone``'s embedding stage and blocks as ONNX (each checked in FP32 against PyTorch), quantize per
    ``quant_mode`` and open the ORT sessions."""
    if quant_mode not in MODE_LINEARS:
        raise BackboneError(f"the onnxruntime backend runs quant modes {tuple(MODE_LINEARS)}, not {quant_mode!r}")
    threads = options.threads or torch.get_num_threads()
    check_block_graphs(backbone)
    ort_backbone = OrtClipBackbone(backbone, checked_embed_graph(backbone), threads, quant_mode=quant_mode)
    return ort_backbone, ort_backbone.quant_report
