"""Everything the benchmark runs for one backbone: the checkpoint, LRA-EE engines per quant mode and backend, and
the full-depth baselines a user would otherwise pick.

Every engine is loaded from the checkpoint directory through :func:`lraee_core.load_classifier`, with its
``quant_mode=`` and ``backend=`` overrides: the checkpoint is never copied or rewritten, and the loader's checks run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

from torch import nn

from lraee_core import BackendOptions, EarlyExitClassifier, load_classifier, read_manifest
from lraee_core.assets import DEFAULT_CHECKPOINT, MODEL_CONFIGS_DIR
from lraee_core.backbone import ClipBackbone
from lraee_core.backends.onnxruntime import OrtClipBackbone, export_staged
from lraee_core.checkpoint import MANIFEST
from lraee_core.config import BackboneConfig, QuantMode
from lraee_core.random_init import untrained_checkpoint
from lraee_core.text import TextEmbeddingCache

from .baselines import OrtVisionTower, torch_int8_tower
from .exit_mix import PAPER_EXIT_MIX
from .static_ranges import bench_ranges
from .timing import RssProbe

VIT_B_32 = "ViT-B-32"
DEFAULT = "default"
BACKBONES = (VIT_B_32, DEFAULT)
RANDOM_WEIGHTS_NOTE = "random init, no pretrained weights available here"
TINY_CONFIG = BackboneConfig("lraee-tiny-vit12", model_config_file=str(MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"))
SERVICE_ENGINE = "service"  # engines[SERVICE_ENGINE]: the checkpoint's own quant mode on the service's backend
# Torch engines measured beside the service's (a static mode is added separately: it needs calibrated ranges).
TORCH_QUANT_MODES: tuple[QuantMode, ...] = ("paper",)
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


@dataclass
class BackboneUnderTest:
    """The engines and baselines of one backbone, built once and shared by its workloads."""

    name: str  # VIT_B_32 or DEFAULT
    checkpoint: CheckpointChoice
    engines: dict[str, EarlyExitClassifier]  # "none" (FP32), SERVICE_ENGINE, "torch-<mode>", "static", "ort-full"...
    own_mode: QuantMode  # the checkpoint's quant mode: its operating points are measured with engines[SERVICE_ENGINE]
    service_backend: str  # the backend the service picks for own_mode (LRAEE_BACKEND=auto)
    fp32: ClipBackbone  # the FP32 backbone (text tower, baselines, exports)
    torch_int8_tower: nn.Module  # a paper-mode INT8 copy of the vision tower, as the engine quantizes it
    ort_tower: OrtVisionTower
    setup_rss_mib: dict[str, float | None] = field(default_factory=dict)  # component -> resident memory it added
    setup_seconds: dict[str, float] = field(default_factory=dict)  # component -> seconds to build

    def share_text_cache(self, cache: TextEmbeddingCache) -> None:
        """Give every engine the same label-embedding cache (the text tower is never quantized)."""
        for engine in self.engines.values():
            engine.text_cache = cache

    @property
    def mix_applies(self) -> bool:
        """True when the checkpoint has exit heads at all the layers the paper mix names."""
        engine = self.engines[SERVICE_ENGINE]
        return self.fp32.shape.num_layers == 12 and set(MIX_CANDIDATES) <= set(engine.policy.candidate_layers)


class SetupLog:
    """Seconds and resident memory each component of a backbone's setup cost."""

    def __init__(self) -> None:
        self.rss_mib: dict[str, float | None] = {}
        self.seconds: dict[str, float] = {}

    def build(self, component: str | Callable[[T], str], make: Callable[[], T]) -> T:
        """Run ``make`` and record what it cost under ``component`` (or the name it gives what was built)."""
        started = time.perf_counter()
        with RssProbe() as probe:
            built = make()
        name = component if isinstance(component, str) else component(built)
        self.rss_mib[name] = probe.growth_mib
        self.seconds[name] = time.perf_counter() - started
        return built


def with_batch_scales(engine: EarlyExitClassifier) -> EarlyExitClassifier:
    """The same ORT engine with one activation scale per batch, what a bare ``quantize_dynamic`` does (a diagnosis
    row: what the engine's per-image scales cost). Heads and text cache are shared; the block sessions are new."""
    backbone = engine.backbone
    if not isinstance(backbone, OrtClipBackbone):
        raise TypeError(f"per-batch scales are an onnxruntime backend option, not {type(backbone).__name__}'s")
    other = copy.copy(engine)
    other.backbone = backbone.with_scales(False)
    return other


def build_backbone_under_test(name: str, workdir: Path, threads: int, *, tower_method: str) -> BackboneUnderTest:
    """Load the engines (the service's backend, torch modes, ORT full INT8 for the paper mix) and build the
    baselines of one backbone."""
    setup = SetupLog()
    choice = choose_checkpoint(name, workdir)
    own_mode = read_manifest(choice.directory).quant_mode

    load = partial(load_classifier, choice.directory)
    engines = {"none": setup.build("engine fp32 (text tower, baselines, exports)", partial(load, quant_mode="none"))}
    fp32 = engines["none"].backbone
    ort_options = BackendOptions(threads=threads)
    engines[SERVICE_ENGINE] = setup.build(  # what the service runs with LRAEE_BACKEND at its default, auto
        lambda engine: f"engine {engine.backend} {own_mode} (the service's)",
        partial(load, backend="auto", backend_options=ort_options),
    )
    service_backend = engines[SERVICE_ENGINE].backend
    for mode in TORCH_QUANT_MODES:
        engines[f"torch-{mode}"] = setup.build(f"engine torch {mode}", partial(load, quant_mode=mode))
    # static INT8 needs calibrated activation ranges; neither checkpoint carries any (see bench.static_ranges)
    ranges, ranges_note = bench_ranges(fp32)
    choice = CheckpointChoice(choice.directory, (*choice.notes, ranges_note))
    engines["static"] = setup.build("engine torch static", partial(load, quant_mode="static", activation_ranges=ranges))
    # The ORT INT8 baseline converts every matmul; the engine in the same mode is the like-for-like comparison. On a
    # checkpoint calibrated under another mode (the default's paper mode) its heads and gates are that mode's: its
    # rows time the full mode, their exits are not the full mode's own.
    if own_mode != "full":
        engines["ort-full"] = setup.build(
            "engine ORT full", partial(load, quant_mode="full", backend="onnxruntime", backend_options=ort_options)
        )
    if name == VIT_B_32:
        engines["ort-full-batch"] = setup.build(
            "engine ORT full, per-batch scales", lambda: with_batch_scales(engines["ort-full"])
        )
    staged = None
    if tower_method == "compose":
        staged = setup.build("ORT staged export (composed baseline)", lambda: export_staged(fp32, workdir / "staged"))
    torch_tower = setup.build("torch INT8 tower (paper)", lambda: torch_int8_tower(fp32))
    ort_tower = setup.build(
        "ORT INT8 tower",
        lambda: OrtVisionTower(fp32, workdir / "onnx-tower", threads, method=tower_method, staged=staged),
    )
    under_test = BackboneUnderTest(
        name=name,
        checkpoint=choice,
        engines=engines,
        own_mode=own_mode,
        service_backend=service_backend,
        fp32=fp32,
        torch_int8_tower=torch_tower,
        ort_tower=ort_tower,
        setup_rss_mib=setup.rss_mib,
        setup_seconds=setup.seconds,
    )
    under_test.share_text_cache(engines["none"].text_cache)
    return under_test
