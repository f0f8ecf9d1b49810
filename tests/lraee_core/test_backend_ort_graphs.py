"""The directly written ORT block graphs: FP32 equal to PyTorch, INT8 equal to a NumPy reference of the per-image
quantization, one image's result independent of its batch, and a run of blocks equal to the blocks one by one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from lraee_core.backends.ort_graphs import (
    EXIT,
    INPUT,
    IR_VERSION,
    LINEARS,
    OPSET,
    OUTPUT,
    PROBABILITY,
    TOP1,
    GraphWriter,
    UnsupportedBlock,
    blocks_graph,
    embed_graph,
    quantize_weight,
)
from lraee_core.backends.ort_graphs import LOGITS as GATE_LOGITS

from ..decisions import near, top2_gap

WIDTH, HEADS, TOKENS = 32, 4, 9


def _session(model: object) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]


@pytest.fixture(scope="module")
def blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [ResidualAttentionBlock(WIDTH, HEADS, batch_first=True).eval() for _ in range(3)]


@pytest.fixture(scope="module")
def hidden() -> np.ndarray:
    # Images of very different ranges: a per-batch scale would be set by the loudest one.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, TOKENS, WIDTH)).astype(np.float32)
    return x * np.array([0.1, 1.0, 3.0, 10.0, 0.5], dtype=np.float32)[:, None, None]


def test_fp32_graph_equals_pytorch(blocks: list[nn.Module], hidden: np.ndarray) -> None:
    with torch.inference_mode():
        expected = blocks[0](torch.from_numpy(hidden)).numpy()
    got = _run(_session(blocks_graph(blocks[:1])), hidden)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_int8_linear_equals_numpy_reference() -> None:
    """One INT8 Linear against the scheme written out in NumPy: per image, activations asymmetric in [0, 127]
    with a zero point, weights symmetric INT8 per output channel, exact integer products. The reference clips the
    zero point to [0, 127] as ONNX's formula does; the graph leaves that clip out (it cannot bite)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, TOKENS, WIDTH)) * np.array([0.2, 1.0, 4.0, 1.0, 1.0, 1.0])[:, None, None]).astype(
        np.float32
    )
    x[1] += 0.5  # an image whose range does not straddle zero symmetrically
    x[3] = np.abs(x[3])  # an image with no negative value: zero point 0, as after a ReLU
    x[4] = -np.abs(x[4])  # no positive value: the range's top is its floor, lost in rounding against the bottom
    x[5] = 0.0  # all zero: the floored range gives the smallest normal scale, and the output is the bias
    weight = torch.from_numpy(rng.standard_normal((16, WIDTH)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(16).astype(np.float32))
    writer = GraphWriter()
    out = writer.linear(INPUT, weight, bias, int8=True, per_image=True)
    writer.nodes.append(helper.make_node("Identity", [out], [OUTPUT]))
    graph = helper.make_graph(
        writer.nodes,
        "linear",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["b", TOKENS, WIDTH])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["b", TOKENS, 16])],
        writer.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    got = _run(_session(model), x)

    w_int8, w_scale = quantize_weight(weight.numpy().T)
    for image in range(x.shape[0]):
        xi = x[image]
        high, low = max(float(xi.max()), 0.0), min(float(xi.min()), 0.0)
        scale = np.float32(max((high - low) / 127.0, float(np.finfo(np.float32).tiny)))
        zero_point = np.clip(np.rint(-low / scale), 0, 127)
        q = np.clip(np.rint(xi / scale) + zero_point, 0, 127)
        product = (q - zero_point).astype(np.int64) @ w_int8.astype(np.int64)  # exact integers
        expected = product.astype(np.float32) * (scale * w_scale) + bias.numpy()
        np.testing.assert_allclose(got[image], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        if image == 5:
            np.testing.assert_array_equal(got[image], np.broadcast_to(bias.numpy(), got[image].shape))
            continue
        # And the scheme is a fair INT8 approximation of the FP32 Linear.
        exact = xi @ weight.numpy().T + bias.numpy()
        assert np.abs(expected - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("quantize", [frozenset({"mlp.c_fc", "mlp.c_proj"}), frozenset(LINEARS)])
def test_each_image_gets_its_own_result_and_runs_fuse(
    blocks: list[nn.Module], hidden: np.ndarray, quantize: frozenset[str]
) -> None:
    """Bit-identical alone and in a batch (per-image scales), and a three-block graph equals three one-block graphs
    (the same ops on the same values). The per-batch variant has teeth: it changes an image's result."""
    together = _session(blocks_graph(blocks, quantize=quantize))
    batch = _run(together, hidden)
    alone = np.concatenate([_run(together, hidden[i : i + 1]) for i in range(hidden.shape[0])])
    assert np.array_equal(batch, alone)

    chained = hidden
    for block in blocks:
        chained = _run(_session(blocks_graph([block], quantize=quantize)), chained)
    assert np.array_equal(batch, chained)

    with torch.inference_mode():
        reference = hidden
        for block in blocks:
            reference = block(torch.from_numpy(reference)).numpy()
    relative = np.linalg.norm(batch - reference) / np.linalg.norm(reference)
    assert relative < 0.02  # INT8 noise on three blocks (measured ~0.002-0.005); a wrong weight is >> 0.1

    per_batch = _session(blocks_graph(blocks, quantize=quantize, per_image=False))
    mixed = _run(per_batch, hidden)
    alone_per_batch = np.concatenate([_run(per_batch, hidden[i : i + 1]) for i in range(hidden.shape[0])])
    assert not np.array_equal(mixed, alone_per_batch)


def test_unsupported_blocks_are_refused(blocks: list[nn.Module]) -> None:
    with pytest.raises(ValueError, match="unknown Linears"):
        blocks_graph(blocks[:1], quantize=frozenset({"attn.qkv"}))
    odd = ResidualAttentionBlock(WIDTH, HEADS, batch_first=True, act_layer=nn.ReLU)
    with pytest.raises(UnsupportedBlock, match="activation ReLU"):
        blocks_graph([odd])
    with pytest.raises(UnsupportedBlock, match="batch-first"):
        blocks_graph([ResidualAttentionBlock(WIDTH, HEADS, batch_first=False)])


def test_embed_graph_equals_open_clip() -> None:
    torch.manual_seed(3)
    visual = VisionTransformer(
        image_size=16, patch_size=4, width=WIDTH, layers=1, heads=HEADS, mlp_ratio=4.0, output_dim=8
    ).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        expected = visual._embeds(images).numpy()
    got = _run(_session(embed_graph(visual)), images.numpy())
    assert got.shape == (3, 17, WIDTH)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# Nodes the graph writes for an exit head and for a gate over every feature (before ORT's own fusions). Each node
# costs ORT a few microseconds whatever its size, which on a small model at batch 1 is what a head and gate cost.
HEAD_NODES = 8  # Gather, LayerNorm, Gemm, Gelu, Gemm, ReduceL2, Max, Div (was 10: MatMul + Add per Linear)
GATE_NODES = 24  # was 35 with every feature (everyday's six: 32 -> 22; the paper's three: 22 -> 15)


@pytest.mark.parametrize("pooling", ["cls", "ssa"])
@pytest.mark.parametrize("label_sets", ["one", "several"])
def test_head_and_gate_in_the_span_equal_pytorch_in_few_nodes(
    blocks: list[nn.Module], hidden: np.ndarray, pooling: str, label_sets: str
) -> None:
    """The exit head and the gate written into a span's graph give what PyTorch's head and
    :func:`lraee_core.gate.answer_gate` give on the same hidden state (every feature, random weights; one label set,
    and a label set per row with one-label rows), in few nodes: the gate's features that are linear in a tensor the
    graph has anyway (the top-two logits and probabilities, the squared token-norm ratios of 'sav') enter its one
    Gemm directly, with the feature's weight spread over them."""
    from lraee_core.backends.onnxruntime import _gate_feeds
    from lraee_core.config import HeadConfig
    from lraee_core.gate import FEATURES, GateParams, GateQuestion, answer_gate
    from lraee_core.heads import ExitHead

    torch.manual_seed(4)
    head = ExitHead(HeadConfig(pooling=pooling, width=WIDTH, hidden_dim=16, embed_dim=8)).eval()  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(5)
    params = GateParams(tuple(torch.randn(len(FEATURES), generator=generator).tolist()), 0.3, FEATURES)
    text = torch.nn.functional.normalize(torch.randn(9, 8, generator=generator), dim=-1)
    rows, scale = hidden.shape[0], 30.0
    columns = counts = None
    if label_sets == "several":  # label sets [0:3], [3:4] (one label) and [4:9]
        counts = torch.tensor([3, 1, 5, 3, 1])
        starts = torch.tensor([0, 3, 4, 0, 3])
        columns = starts.unsqueeze(1) + torch.arange(5).clamp_max(counts.unsqueeze(1) - 1)
    question = GateQuestion(params, scale, text, columns, counts, torch.tensor([-1, 0, 2, 1, 0]))
    graph = blocks_graph(blocks[:1], head=head, gate=params, logit_scale=scale, tokens=TOKENS)
    parts = [node.name.split("/")[0] for node in graph.graph.node]
    assert parts.count(EXIT) == HEAD_NODES + (pooling == "ssa")  # ssa pools with Slice + ReduceMean, not Gather
    assert parts.count("gate") == GATE_NODES

    session = _session(graph)
    names = [OUTPUT, EXIT, GATE_LOGITS, PROBABILITY, TOP1]
    feeds = {INPUT: hidden, **_gate_feeds(question, rows)}
    layer, embedding, logits, probability, top1 = session.run(names, feeds)
    with torch.inference_mode():
        expected_embedding = head(head.pool(torch.from_numpy(layer)))
        reference = answer_gate(question, torch.from_numpy(embedding), torch.from_numpy(layer))
    np.testing.assert_allclose(embedding, expected_embedding.numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(np.isinf(logits), reference.logits.isinf().numpy())  # the same padding
    finite = np.isfinite(logits)
    np.testing.assert_allclose(logits[finite], reference.logits.numpy()[finite], rtol=0, atol=1e-5)
    np.testing.assert_allclose(probability.reshape(-1), reference.probability.numpy(), rtol=0, atol=1e-6)
    # Top-1 labels compared where the runner-up is further than the tie band (tests/decisions.py).
    decided = torch.from_numpy(~near(top2_gap(reference.logits / scale), 0.0))
    assert decided.sum() >= rows - 1
    assert torch.from_numpy(top1.reshape(-1))[decided].tolist() == reference.top1[decided].tolist()


def test_a_gate_reading_sav_needs_the_token_count(blocks: list[nn.Module]) -> None:
    from lraee_core.config import HeadConfig
    from lraee_core.gate import GateParams
    from lraee_core.heads import ExitHead

    head = ExitHead(HeadConfig(pooling="cls", width=WIDTH, hidden_dim=16, embed_dim=8))
    with pytest.raises(ValueError, match="token count"):
        blocks_graph(blocks[:1], head=head, gate=GateParams((1.0,), 0.0, ("sav",)))
    blocks_graph(blocks[:1], head=head, gate=GateParams((1.0,), 0.0, ("cos_top1",)))  # no 'sav': no count needed
