"""Everything the benchmark runs for one backbone: the checkpoint, LRA-EE engines per quant mode and backend, and
the full-depth baselines a user would otherwise pick.

Every engine is loaded from a checkpoint directory through :func:`lraee_core.checkpoint.load_classifier`. A quant
mode other than the checkpoint's own is loaded from a copy of the checkpoint whose manifest names that mode (tensors
untouched), so the loader's own checks still run.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lraee_core.assets import DEFAULT_CHECKPOINT, MODEL_CONFIGS_DIR
from lraee_core.backbone import ClipBackbone
from lraee_core.checkpoint import MANIFEST, load_classifier, read_manifest
from lraee_core.config import BackboneConfig, QuantMode
from lraee_core.engine import EarlyExitClassifier
from lraee_core.heads import class_logits
from lraee_core.quantize import PerImageDynamicLinear, quantize_vision
from lraee_core.random_init import untrained_checkpoint
from lraee_core.text import TextEmbeddingCache

from .exit_mix import PAPER_EXIT_MIX
from .ort_backend import OrtClipBackbone, OrtVisionTower, StagedGraphs, export_staged
from .timing import RssProbe

VIT_B_32 = "ViT-B-32"
DEFAULT = "default"
BACKBONES = (VIT_B_32, DEFAULT)
RANDOM_WEIGHTS_NOTE = "random init, no pretrained weights available here"
TINY_CONFIG = BackboneConfig("lraee-tiny-vit12", model_config_file=str(MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"))
MIX_CANDIDATES = tuple(sorted(layer for layer in PAPER_EXIT_MIX if layer is not None))  # (9, 11, 12)

T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a backbone is benchmarked with, and what the reader must know about it."""

    directory: Path  # checkpoint directory (manifest.json + heads.safetensors)
    notes: tuple[str, ...]  # printed with the results (random weights, untrained heads, fallbacks)


def choose_checkpoint(name: str, workdir: Path) -> CheckpointChoice:
    """ViT-B-32: untrained heads on random weights, candidates at the mix layers. ``default``: the embedded default
    checkpoint, or an untrained tiny one when the project has none yet."""
    if name == VIT_B_32:
        directory = workdir / "checkpoint"
        untrained_checkpoint(directory, BackboneConfig(VIT_B_32), candidate_layers=MIX_CANDIDATES, quant_mode="paper")
        return CheckpointChoice(
            directory,
            (
                f"{VIT_B_32}: {RANDOM_WEIGHTS_NOTE}; untrained exit heads and gates, so its operating points exit "
                "at random and only the forced-mix rows say something about early exit",
            ),
        )
    if name == DEFAULT:
        if (DEFAULT_CHECKPOINT / MANIFEST).is_file():
            return CheckpointChoice(DEFAULT_CHECKPOINT, (f"default: the embedded checkpoint {DEFAULT_CHECKPOINT}",))
        directory = workdir / "checkpoint"
        untrained_checkpoint(directory, TINY_CONFIG)
        return CheckpointChoice(
            directory,
            (
                f"default: {DEFAULT_CHECKPOINT} does not exist yet; fell back to an UNTRAINED tiny checkpoint "
                f"({TINY_CONFIG.model_name}, random weights, random heads and gates)",
            ),
        )
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def checkpoint_with_mode(source: Path, target: Path, mode: QuantMode, converted: int) -> Path:
    """A copy of checkpoint ``source`` whose manifest asks for quant ``mode`` (``converted`` modules)."""
    if read_manifest(source).quant_mode == mode:
        return source
    shutil.copytree(source, target, dirs_exist_ok=True)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["quant_mode"] = mode
    manifest["quantized_modules"] = converted
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def plain_quantize_dynamic(module: nn.Module) -> nn.Module:
    """Remove the engine's per-image activation-scale wrappers: a bare ``quantize_dynamic`` (diagnosis only)."""
    for name, child in list(module.named_children()):
        if isinstance(child, PerImageDynamicLinear):
            setattr(module, name, child.quantized)
        else:
            plain_quantize_dynamic(child)
    return module


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


@dataclass
class BackboneUnderTest:
    """The engines and baselines of one backbone, built once and shared by its workloads."""

    name: str  # VIT_B_32 or DEFAULT
    checkpoint: CheckpointChoice
    engines: dict[str, EarlyExitClassifier]  # "paper", "full", "none", "ort-image", "ort-batch"
    own_mode: QuantMode  # the checkpoint's quant mode: its operating points are measured with engines[own_mode]
    fp32: ClipBackbone  # the FP32 backbone (text tower, baselines, exports)
    torch_int8_tower: nn.Module  # a paper-mode INT8 copy of the vision tower, as the engine quantizes it
    ort_tower: OrtVisionTower
    ort_graphs: StagedGraphs
    setup_rss_mib: dict[str, float | None] = field(default_factory=dict)  # component -> resident memory it added
    setup_seconds: dict[str, float] = field(default_factory=dict)  # component -> seconds to build

    def share_text_cache(self, cache: TextEmbeddingCache) -> None:
        """Give every engine the same label-embedding cache (the text tower is never quantized)."""
        for engine in self.engines.values():
            engine.text_cache = cache

    @property
    def mix_applies(self) -> bool:
        """True when the checkpoint has exit heads at all the layers the paper mix names."""
        engine = self.engines[self.own_mode]
        return self.fp32.shape.num_layers == 12 and set(MIX_CANDIDATES) <= set(engine.policy.candidate_layers)


class SetupLog:
    """Seconds and resident memory each component of a backbone's setup cost."""

    def __init__(self) -> None:
        self.rss_mib: dict[str, float | None] = {}
        self.seconds: dict[str, float] = {}

    def build(self, component: str, make: Callable[[], T]) -> T:
        """Run ``make`` and record what it cost under ``component``."""
        started = time.perf_counter()
        with RssProbe() as probe:
            built = make()
        self.rss_mib[component] = probe.growth_mib
        self.seconds[component] = time.perf_counter() - started
        return built


def _torch_int8_tower(fp32: ClipBackbone) -> nn.Module:
    tower = copy.deepcopy(fp32.visual)
    quantize_vision(tower, "paper")
    return tower


def build_backbone_under_test(name: str, workdir: Path, threads: int, *, tower_method: str) -> BackboneUnderTest:
    """Build the checkpoint, the engines (torch paper/full, ORT per-block) and the baselines of one backbone."""
    setup = SetupLog()
    choice = choose_checkpoint(name, workdir)
    own_mode = read_manifest(choice.directory).quant_mode
    none_dir = checkpoint_with_mode(choice.directory, workdir / "checkpoint-none", "none", 0)
    engines = {"none": setup.build("engine fp32 (text tower, baselines, exports)", lambda: load_classifier(none_dir))}
    fp32 = engines["none"].backbone
    for mode in ("paper", "full"):
        converted = len(quantize_vision(copy.deepcopy(fp32.visual), mode).converted)
        directory = checkpoint_with_mode(choice.directory, workdir / f"checkpoint-{mode}", mode, converted)
        engines[mode] = setup.build(f"engine torch {mode}", functools.partial(load_classifier, directory))
    torch_tower = setup.build("torch INT8 tower (paper)", lambda: _torch_int8_tower(fp32))
    graphs = setup.build("ORT staged export", lambda: export_staged(fp32, workdir / "onnx-staged"))
    ort_image = setup.build("ORT staged INT8 sessions", lambda: OrtClipBackbone(fp32, graphs, threads))
    ort_tower = setup.build(
        "ORT INT8 tower",
        lambda: OrtVisionTower(fp32, workdir / "onnx-tower", threads, method=tower_method, staged=graphs),
    )
    source = engines["none"]
    for key, backbone in (("ort-image", ort_image), ("ort-batch", ort_image.with_scales(False))):
        engines[key] = EarlyExitClassifier(
            backbone,
            ort_image.quant_report,
            source.heads,
            source.gates,
            source.policy,
            source.head_config,
            checkpoint_id=source.checkpoint_id,
            manifest=source.manifest,
        )
    under_test = BackboneUnderTest(
        name=name,
        checkpoint=choice,
        engines=engines,
        own_mode=own_mode,
        fp32=fp32,
        torch_int8_tower=torch_tower,
        ort_tower=ort_tower,
        ort_graphs=graphs,
        setup_rss_mib=setup.rss_mib,
        setup_seconds=setup.seconds,
    )
    under_test.share_text_cache(source.text_cache)
    return under_test
