"""EarlyExitClassifier: a batch of preprocessed images in, rows with their own label sets, one result per image out.

The vision blocks run once over the rows still alive, whatever their label sets. At each candidate layer the exit
head runs on those rows in one op; each row's logits are taken against its own label set (every distinct label set
sits in one text matrix: one GEMM, then a gather padded with -inf), and the gate features (which depend on K) and
the exit rule's thresholds are per row, so a row leaves exactly when it would in a batch of its own. The head and
the gate run with the span that ends at the candidate layer (:meth:`ClipBackbone.span`; inside its graph on a
backend that compiles spans), so a candidate costs one call, not a train of small ops. Rows the exit
rule (:mod:`lraee_core.exits`: an operating point's thresholds, ``full``, or a forced benchmark mix) lets go leave
the batch with their logits (batch compaction by index: the remaining blocks run on a smaller batch, so FLOPs saved
are time saved). Rows that reach the end take the ordinary full-depth CLIP path ([CLS] pooling + projection).

:meth:`EarlyExitClassifier.classify` asks one question of a whole batch; :meth:`EarlyExitClassifier.classify_rows`
takes one :class:`LabelQuery` per row (text embeddings resolved beforehand, as the service does). Build a
classifier with :func:`lraee_core.checkpoint.load_classifier`.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .backbone import ClipBackbone, VisionShape
from .backends import DEFAULT_BACKEND, BackendName
from .config import FULL_OPERATING_POINT, ExitPolicy, HeadConfig
from .errors import InputError
from .exits import ExitRule, RowExits
from .flops import FlopsModel, flops_model
from .gate import GateParams, GateQuestion, row_logits
from .heads import ExitHead
from .manifest import Manifest
from .quant_base import QuantReport
from .text import DEFAULT_TEMPLATES, TextEmbeddingCache, validate_labels, validate_templates

ExitPath = Literal["head", "full"]


@dataclass(frozen=True)
class Prediction:
    """One label and its probability over the request's label set."""

    label: str
    score: float


@dataclass(frozen=True)
class ExitResult:
    """What happened to one image."""

    predictions: tuple[Prediction, ...]  # top-k, highest score first
    exit_layer: int  # 1-based layer the answer came from; num_layers for the full-depth path
    num_layers: int  # blocks in the vision tower
    exit_path: ExitPath  # "head": an exit head answered; "full": the full-depth CLIP path answered
    gate_probability: float | None  # the gate's probability at the exit layer (None on the full path)
    flops: int  # FLOPs actually spent on this image, heads and gates included
    flops_saved: float  # 1 - flops / flops_full
    flops_full: int  # FLOPs of the plain full-depth CLIP path for this label set (the reference)

    @property
    def exited_early(self) -> bool:
        """True when the image skipped at least one block."""
        return self.exit_layer < self.num_layers


class EarlyExitClassifier:
    """LRA-EE inference over a (possibly INT8) open_clip ViT backbone."""

    max_labels = 10_000  # engine-level bound on a label set; the service sets a tighter one

    def __init__(
        self,
        backbone: ClipBackbone,
        quant_report: QuantReport,
        heads: dict[int, ExitHead],
        gates: dict[int, GateParams],
        policy: ExitPolicy,
        head_config: HeadConfig,
        *,
        text_cache_capacity: int = 4096,
        checkpoint_id: str = "uncheckpointed",
        manifest: Manifest | None = None,
        backend: BackendName = DEFAULT_BACKEND,
    ) -> None:
        if set(heads) != set(policy.candidate_layers) or set(gates) != set(policy.candidate_layers):
            raise ValueError("heads, gates and the policy's candidate layers must name the same layers")
        self.backbone = backbone
        self.quant_report = quant_report
        self.heads = {layer: head.eval() for layer, head in heads.items()}
        self.gates = gates
        self.policy = policy
        self.head_config = head_config
        self.checkpoint_id = checkpoint_id
        self.manifest = manifest
        self.backend = backend  # what runs the vision tower (lraee_core.backends)
        self.text_cache = TextEmbeddingCache(backbone.encode_text, model_id=checkpoint_id, capacity=text_cache_capacity)
        self._logit_scale = backbone.logit_scale
        self._rules: dict[str, ExitRule] = {}  # operating point name -> its rule, built once

    @property
    def default_templates(self) -> tuple[str, ...]:
        """Prompts of a request that names none: the checkpoint's calibration templates, else DEFAULT_TEMPLATES."""
        if self.manifest is not None and self.manifest.templates:
            return tuple(self.manifest.templates)
        return tuple(DEFAULT_TEMPLATES)

    @property
    def num_layers(self) -> int:
        """Blocks in the vision tower."""
        return self.backbone.shape.num_layers

    def flops(self, num_labels: int) -> FlopsModel:
        """Per-stage FLOPs for a label set of ``num_labels``."""
        return flops_model(self.backbone.shape, self.head_config.hidden_dim, num_labels)

    def text_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Cached FP16 unit label embeddings [K, E] (prompt-ensembled over ``templates``)."""
        chosen = self.default_templates if templates is None else validate_templates(templates)
        return self.text_cache.get(labels, chosen)

    def cached_text_rows(
        self, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, ...] | None:
        """Each label's cached embedding [E] when all are in the text cache, else None (nothing is encoded; no torch
        op runs, see :meth:`TextEmbeddingCache.lookup_rows`)."""
        chosen = self.default_templates if templates is None else validate_templates(templates)
        return self.text_cache.lookup_rows(labels, chosen)

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit full-depth image embeddings [B, E] float32 of preprocessed images [B, 3, H, W]: the ones the ``full``
        path classifies with (every block, no exit head), through the backend that serves the classifier."""
        _check_images(images)
        final = self.backbone.span(0, self.num_layers, images, final=True).final
        assert final is not None  # a span that ends at the top block with final=True returns it
        return final

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings [N, E] float32 of ``texts`` as given: no prompt template, nothing cached (label
        embeddings for classification are :meth:`text_embeddings`). CLIP's tokenizer truncates a text past its
        context (77 tokens for ViT-B-32)."""
        if not texts or not all(isinstance(text, str) for text in texts):
            raise InputError("expected one or more texts")
        return self.backbone.encode_text(list(texts))

    def exit_rule(self, operating_point: str | None = None) -> ExitRule:
        """The rule of a named operating point (the default when None; ``full`` on every checkpoint);
        :class:`InputError` naming the known ones if unknown."""
        name = operating_point or self.policy.default_operating_point
        rule = self._rules.get(name)
        if rule is None:
            if name == FULL_OPERATING_POINT:
                rule = ExitRule.full()
            else:
                try:
                    point = self.policy.point(name)
                except KeyError:
                    known = list(self.policy.names)
                    raise InputError(f"unknown operating point {name!r}; this model has {known}") from None
                rule = ExitRule.of_point(point)
            # One (frozen) rule object per point: rows of different requests at one point share it, which keeps
            # their thresholds a constant column in the engine.
            self._rules[name] = rule
        return rule

    def query(
        self,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        operating_point: str | None = None,
        exit_rule: ExitRule | None = None,
        text: torch.Tensor | None = None,
    ) -> LabelQuery:
        """Validate one request's question and resolve its text side: a :class:`LabelQuery` for its rows.

        ``text`` [K, E] passes embeddings resolved beforehand (the service encodes new labels off the inference
        worker); None takes them from the text cache, encoding the labels it lacks here. The query's rule is the
        point's rule for its label count (its thresholds at that K, or above its label cap no heads:
        :meth:`ExitRule.for_labels`).
        """
        rule = exit_rule if exit_rule is not None else self.exit_rule(operating_point)
        labels = validate_labels(labels, self.max_labels)
        rule = rule.for_labels(len(labels))
        if text is None:
            text = self.text_embeddings(labels, templates)
        elif text.dim() != 2 or text.shape[0] != len(labels):
            raise InputError(f"text embeddings of shape {tuple(text.shape)} for {len(labels)} labels")
        return LabelQuery(labels, text, rule, max(1, min(top_k, len(labels))))

    def classify(
        self,
        images: torch.Tensor,
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        operating_point: str | None = None,
        exit_rule: ExitRule | None = None,
    ) -> list[ExitResult]:
        """Classify preprocessed images [B, 3, H, W] against ``labels``.

        ``exit_rule`` (see :mod:`lraee_core.exits`) replaces the named ``operating_point``'s rule: custom
        thresholds, ``ExitRule.full()``, or a forced per-image exit mix for benchmarks.
        """
        _check_images(images)
        query = self.query(
            labels, templates=templates, top_k=top_k, operating_point=operating_point, exit_rule=exit_rule
        )
        return self.classify_rows(images, [query] * images.shape[0])

    @torch.inference_mode()
    def classify_rows(self, images: torch.Tensor, queries: Sequence[LabelQuery]) -> list[ExitResult]:
        """Classify preprocessed images [B, 3, H, W], row i against ``queries[i]`` (rows of one request share one
        query object). The blocks run once for all rows whatever their label sets; each row's exit logits, gate
        features and thresholds are its own, so a row gets the answer it would get in a batch of its own."""
        _check_images(images)
        if len(queries) != images.shape[0]:
            raise InputError(f"{len(queries)} queries for {images.shape[0]} images")
        plan = _RowPlan.of(
            queries, self.policy.candidate_layers, self.head_config.hidden_dim, self.backbone.shape, self._logit_scale
        )
        batch = images.shape[0]
        # Per row, as Python lists rather than tensors: a batch-1 call is mostly fixed costs, and every torch op
        # between two session calls starts on caches the session has just evicted (tens of microseconds each).
        exit_layer = [self.num_layers] * batch
        gate_prob: list[float | None] = [None] * batch  # the gate's probability where a head answered, else None
        answered: list[tuple[torch.Tensor, torch.Tensor]] = []  # (batch rows [n], their padded logits [n, W])
        heads = self.heads if plan.exits.any_evaluate else {}

        # The batch row of each row still running, and each running row's top-1 at the previous candidate layer,
        # aligned with ``alive`` (-1, which matches no label, before the first candidate). Rows whose rule runs no
        # heads carry one too and never read it.
        alive, previous_top1 = _batch_rows(batch)
        hidden = images  # the first span starts from the images (embedding stage included), later ones at a block
        final: torch.Tensor | None = None  # [alive, E] unit full-depth embeddings once the top span has run
        done = 0  # blocks run so far
        # The hidden state is only read at candidate layers, so the blocks between two run as one span (one call;
        # one graph, the exit head, its gate and the final pooling included, on a backend that compiles spans).
        for layer in sorted({*heads, self.num_layers}):
            head = heads.get(layer)
            # Rows whose rule runs no heads (`full`) ride along without them.
            evaluating = None
            if head is not None and not plan.exits.all_evaluate:
                evaluating = plan.exits.evaluates[alive].nonzero().flatten()
                if evaluating.numel() == 0:
                    head = None
            question = None if head is None else plan.question(self.gates[layer], alive, previous_top1)
            first = done + 1 if done else 0  # 0: from the images
            span = self.backbone.span(first, layer, hidden, head, final=layer == self.num_layers, gate=question)
            hidden, final, done = span.hidden, span.final, layer
            if span.gate is None:
                continue
            verdict = span.gate  # for every running row; the rows that run no heads are dropped here
            rows = alive if evaluating is None else alive[evaluating]
            logits, probability = (
                (verdict.logits, verdict.probability)
                if evaluating is None
                else (verdict.logits[evaluating], verdict.probability[evaluating])
            )
            leaving = plan.exits.leaving(layer, rows, probability)
            previous_top1 = verdict.top1
            if leaving is None:
                continue
            gone = rows[leaving]
            for row, value in zip(gone.tolist(), probability[leaving].float().tolist(), strict=True):
                exit_layer[row] = layer
                gate_prob[row] = value
            answered.append((gone, logits[leaving]))
            staying = torch.ones(batch, dtype=torch.bool)
            staying[gone] = False
            keep = staying[alive].nonzero().flatten()  # compaction by index: positions in the running batch
            hidden, alive, previous_top1 = hidden[keep], alive[keep], previous_top1[keep]
            final = None if final is None else final[keep]
            if alive.numel() == 0:
                break
        if alive.numel() > 0:
            assert final is not None  # the top span ran (span(final=True) returns it) and nobody broke out
            answered.append((alive, plan.logits(final, alive)))
        # Heads and gates each row ran: every candidate up to its exit layer (all of them on the full path) when its
        # rule evaluates heads, none otherwise; counted once here rather than per layer.
        candidates = sorted(heads)
        evaluates = [True] * batch if plan.exits.all_evaluate else plan.exits.evaluates.tolist()
        evaluated = [
            bisect.bisect_right(candidates, layer) if runs_heads else 0
            for layer, runs_heads in zip(exit_layer, evaluates, strict=True)
        ]
        return self._results(plan, answered, exit_layer, gate_prob, evaluated)

    def _results(
        self,
        plan: _RowPlan,
        answered: list[tuple[torch.Tensor, torch.Tensor]],
        exit_layer: list[int],
        gate_prob: list[float | None],
        evaluated: list[int],
    ) -> list[ExitResult]:
        """One :class:`ExitResult` per row from the answering logits (top-k in one op per group of rows); per row its
        exit layer, its gate probability where a head answered (None: the full path) and the heads it ran."""
        batch = len(exit_layer)
        top: list[tuple[list[float], list[int]]] = [([], [])] * batch
        for rows, logits in answered:
            probs = logits.float().softmax(dim=-1)  # [n, W]; padding gets 0
            padding = plan.padding(rows, probs.shape[1])
            if padding is not None:
                probs = probs.masked_fill(padding, -1.0)  # never ranked above a real label, even one at 0
            best = probs.topk(min(plan.max_top_k(rows), probs.shape[1]), dim=-1)
            for row, values, indices in zip(rows.tolist(), best.values.tolist(), best.indices.tolist(), strict=True):
                top[row] = (values, indices)
        results = []
        for row in range(batch):
            query, cost = plan.queries[row], plan.costs[row]
            values, indices = top[row]
            at_head = gate_prob[row] is not None
            spent = cost.spent(exit_layer[row], evaluated[row], not at_head)
            results.append(
                ExitResult(
                    predictions=tuple(
                        Prediction(query.labels[index], score)
                        for score, index in zip(values[: query.top_k], indices[: query.top_k], strict=True)
                    ),
                    exit_layer=exit_layer[row],
                    num_layers=self.num_layers,
                    exit_path="head" if at_head else "full",
                    gate_probability=gate_prob[row],
                    flops=spent,
                    flops_saved=cost.saved(spent),
                    flops_full=cost.full_depth,
                )
            )
        return results


@dataclass(frozen=True, eq=False)
class LabelQuery:
    """One request's question, shared by the rows (images) that ask it: build it with
    :meth:`EarlyExitClassifier.query`, which validates it, or directly from parts validated already (the service
    validates a request once, before its text is encoded)."""

    labels: tuple[str, ...]  # validated label set, in request order
    text: torch.Tensor  # [K, E] FP16 unit text embeddings of ``labels`` (prompt-ensembled)
    rule: ExitRule  # the exit rule of the request's operating point (or a custom / forced / full rule)
    top_k: int  # predictions per image, already cut to 1..K


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[0] == 0:
        raise InputError(f"expected a non-empty image batch [B, 3, H, W], got shape {tuple(images.shape)}")


@dataclass(frozen=True)
class _RowPlan:
    """Per-row bookkeeping of one engine call: every distinct label set side by side in one text matrix, and for
    each row where its labels sit in it, so one GEMM gives every row's logits against every label and one gather
    picks each row's own (padded with -inf to the widest label set)."""

    queries: list[LabelQuery]  # per row
    costs: list[FlopsModel]  # per row (one model per distinct label-set size)
    text: torch.Tensor  # [sum K, E] float32: each distinct query's text embeddings, concatenated
    counts: torch.Tensor | None  # [B] long: K of each row's label set (None: one label set, ``width``)
    columns: torch.Tensor | None  # [B, W] long: each row's label columns in ``text``, padding repeats its last
    width: int  # the widest label set
    exits: RowExits  # per-row exit rules
    top_ks: list[int]  # per row: predictions wanted
    logit_scale: float  # CLIP's temperature, exp(logit_scale)

    @classmethod
    def of(
        cls,
        queries: Sequence[LabelQuery],
        candidate_layers: Sequence[int],
        head_hidden_dim: int,
        shape: VisionShape,
        logit_scale: float,
    ) -> _RowPlan:
        distinct: dict[int, int] = {}
        index = [distinct.setdefault(id(query), len(distinct)) for query in queries]
        unique = list({id(query): query for query in queries}.values())
        positions = _positions_within(index)
        for number, query in enumerate(unique):
            try:
                query.rule.check(index.count(number), candidate_layers)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
        sizes = [len(query.labels) for query in unique]
        models = {size: flops_model(shape, head_hidden_dim, size) for size in set(sizes)}
        counts = columns = None
        if len(unique) > 1:
            starts = [0]
            for size in sizes[:-1]:
                starts.append(starts[-1] + size)
            which = torch.tensor(index, dtype=torch.long)  # [B] distinct query of each row
            counts = torch.tensor(sizes, dtype=torch.long)[which]
            offsets = torch.tensor(starts, dtype=torch.long)[which].unsqueeze(1)
            columns = offsets + torch.arange(max(sizes)).clamp_max(counts.unsqueeze(1) - 1)  # [B, W]
        return cls(
            queries=list(queries),
            costs=[models[len(query.labels)] for query in queries],
            text=torch.cat([query.text for query in unique]).float() if len(unique) > 1 else unique[0].text.float(),
            counts=counts,
            columns=columns,
            width=max(sizes),
            exits=RowExits.of([query.rule for query in queries], positions, candidate_layers),
            top_ks=[query.top_k for query in queries],
            logit_scale=logit_scale,
        )

    def logits(self, embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each row's logits [b, W] against its own labels (columns past its K are -inf) from unit embeddings [b, E]
        of batch rows ``rows``."""
        if self.counts is None or self.columns is None:
            return row_logits(embeddings, self.text, self.logit_scale)
        return row_logits(embeddings, self.text, self.logit_scale, self.columns[rows], self.counts[rows])

    def question(self, gate: GateParams, rows: torch.Tensor, previous_top1: torch.Tensor) -> GateQuestion:
        """The gate question of batch rows ``rows`` at one candidate layer."""
        if self.counts is None or self.columns is None:
            return GateQuestion(gate, self.logit_scale, self.text, None, None, previous_top1)
        return GateQuestion(gate, self.logit_scale, self.text, self.columns[rows], self.counts[rows], previous_top1)

    def padding(self, rows: torch.Tensor, width: int) -> torch.Tensor | None:
        """Mask [b, W] of the padding columns of ``rows``, None when there is none."""
        if self.counts is None:
            return None
        return torch.arange(width) >= self.counts[rows].unsqueeze(1)

    def max_top_k(self, rows: torch.Tensor) -> int:
        """The most predictions any of ``rows`` wants."""
        if self.counts is None:
            return self.top_ks[0]
        return max(self.top_ks[row] for row in rows.tolist())


@functools.lru_cache(maxsize=64)
def _batch_rows(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``arange(batch)`` and ``batch`` times -1 (long), made once per batch size: two torch ops fewer per call, where a
    batch-1 call is mostly such fixed costs. Shared between calls and threads, so nobody writes to them (the engine
    only indexes them, which makes new tensors)."""
    return torch.arange(batch), torch.full((batch,), -1, dtype=torch.long)


def _positions_within(groups: Sequence[int]) -> list[int]:
    """For each entry, how many earlier entries share its group (its index among its own request's rows)."""
    seen: dict[int, int] = {}
    positions = []
    for group in groups:
        positions.append(seen.get(group, 0))
        seen[group] = positions[-1] + 1
    return positions
