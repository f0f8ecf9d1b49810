"""Step ``extract``: one pass of the frozen backbones over every split image, cached on disk for all later steps.

Per image and per cached layer ``l`` (default: every layer from 3 up, so calibration can weigh every depth by the
time it saves, and prune among them): the SSA input (mean of the patch tokens), the [CLS] token and the SAV gate
feature, all from the INT8 tower exactly as the engine computes them; plus the INT8 full-depth embedding (the
baseline and the engine's fall-back path) and the FP32 full-depth embedding (distillation target, FP32
baseline), both unit-norm.
The label prompts' text embeddings are cached too, FP16 as the engine keeps them, and with ``data.word_sets`` the
words' (:class:`~training.pipeline.word_sets.WordSets`, kept in ``meta.json``). Head training, gate fitting,
calibration and evaluation never run the backbone again.

Layout: ``extract/meta.json``, ``extract/text.safetensors``, ``extract/<split>/shard-00000.safetensors``
(``shard_size`` images each, FP32). A shard carries the hash of its split's features (files, backbone, layers) in
its metadata, so an interrupted extraction resumes at the first missing shard, and a build that shares a split
with an earlier one copies that split's shards from it (``extract.reuse_from``) instead of recomputing them.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lraee_core.backbone import ClipBackbone, VisionShape, build_backbone
from lraee_core.gate import spatial_activation_variance
from lraee_core.quantize import QuantReport, quantize_vision
from lraee_core.static_quant import ActivationRanges
from lraee_core.text import TextEmbeddingCache, validate_templates

from .config import SPLIT_NAMES, BuildConfig, ConfigError
from .data import ImageDataset, Splits, run_split
from .jobs import Job, backbone_identity, config_hash, read_json, step, write_json, write_record
from .ranges import activation_ranges
from .word_sets import WordSets

META_FILE = "meta.json"
TEXT_FILE = "text.safetensors"


def build_backbones(
    config: BuildConfig, ranges: ActivationRanges | None = None
) -> tuple[ClipBackbone, ClipBackbone, QuantReport]:
    """(INT8 backbone, FP32 backbone, quantization report): two independent builds of the same weights.

    ``ranges``: the calibrated activation ranges of a static quant mode (step ``ranges``)."""
    quantized = build_backbone(config.backbone)
    report = quantize_vision(quantized.visual, config.quant_mode, ranges)
    return quantized, build_backbone(config.backbone), report


def default_candidate_layers(num_layers: int) -> tuple[int, ...]:
    """Every layer from 3 (or the last, on a shallower tower) to the last: 3..12 on a 12-block tower. Below block 3
    an exit would read a state that has barely mixed its patches."""
    return tuple(range(min(3, num_layers), num_layers + 1))


def cached_layers(config: BuildConfig, num_layers: int) -> tuple[int, ...]:
    """The layers whose features ``extract`` caches (validated against the tower's depth)."""
    layers = config.extract.candidate_layers or default_candidate_layers(num_layers)
    if sorted(set(layers)) != list(layers) or layers[0] < 1 or layers[-1] > num_layers:
        raise ConfigError(f"candidate layers {layers} must be ascending, unique and within 1..{num_layers}")
    return tuple(layers)


def word_sets(config: BuildConfig, labels: Sequence[str]) -> WordSets | None:
    """The build's word sets (``data.word_sets``), checked against its label set; None without."""
    if config.data.word_sets is None:
        return None
    try:
        return WordSets.read(Path(config.data.word_sets), labels)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"data.word_sets {config.data.word_sets}: {error}") from error


def extract_hash(config: BuildConfig, splits: Splits) -> str:
    """Identity of the feature cache: the splits, the backbone and quant mode, extraction and prompt settings, and
    the word sets (their content, not their path)."""
    extract = config.extract
    words = word_sets(config, splits.labels)
    identity: list[Any] = [extract.candidate_layers, list(config.data.templates)]
    if words is not None:  # builds without word sets keep their former identity
        identity.append(words.to_json(splits.labels))
    return config_hash("extract", splits.content_hash, backbone_identity(config), *identity)


@torch.inference_mode()
def features_of_batch(
    quantized: ClipBackbone, fp32: ClipBackbone, images: torch.Tensor, layers: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Everything later steps need from one image batch [B, 3, H, W] (see module docstring)."""
    out: dict[str, torch.Tensor] = {}
    hidden = quantized.embed(images)  # [B, T, D]
    for layer in range(1, quantized.shape.num_layers + 1):
        hidden = quantized.block(layer, hidden)
        if layer in layers:
            out[f"ssa.{layer}"] = quantized.pool_ssa(hidden).float()  # [B, D]
            out[f"cls.{layer}"] = quantized.pool_cls(hidden).float()  # [B, D]
            out[f"sav.{layer}"] = spatial_activation_variance(hidden)  # [B]
    out["int8_final"] = quantized.final_embedding(hidden)  # [B, E]
    out["fp32_final"] = F.normalize(fp32.encode_image_staged(images).float(), dim=-1)  # [B, E]
    return out


def _shard_path(directory: Path, split: str, shard: int) -> Path:
    return directory / split / f"shard-{shard:05d}.safetensors"


def split_features_hash(job: Job, splits: Splits, split: str) -> str:
    """Identity of one split's image features: its files, the backbone and quant mode, the cached layers. Prompts
    and the other splits do not change them, so another build's shards of the same split can be reused. Images inside
    the work dir (a generated data set exported there) are named relative to it: every build generates the same."""
    items = splits.splits[split]
    root = items.root.resolve()
    work = job.work_dir.resolve()
    where = root.relative_to(work).as_posix() if root.is_relative_to(work) else str(root)
    config = job.config
    return config_hash(
        "extract-split", where, list(items.items), backbone_identity(config), config.extract.candidate_layers
    )


def _shard_done(path: Path, wanted: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("split_hash") == wanted
    except Exception:  # a truncated shard from an interrupted run is simply redone
        return False


def _reuse(path: Path, source: Path, wanted: str) -> bool:
    """Copy an identical shard from another build's extract dir (``--reuse-features``); True when it did."""
    if not _shard_done(source, wanted):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return True


@step("extract")
def run_extract(job: Job) -> str:
    """Step ``extract``: cache features of every split; returns the step hash."""
    splits = run_split(job)
    config = job.config
    wanted = extract_hash(config, splits)
    directory = job.step_dir("extract")
    if job.should_skip("extract", wanted):
        return wanted
    validate_templates(config.data.templates)
    quantized, fp32, report = build_backbones(config, activation_ranges(job))
    layers = cached_layers(config, quantized.shape.num_layers)
    cache = TextEmbeddingCache(quantized.encode_text, model_id=quantized.name)
    texts = {"text_embeddings": cache.get(splits.labels, config.data.templates).contiguous()}
    words = word_sets(config, splits.labels)
    if words is not None and words.extra:
        texts["word_text_embeddings"] = cache.get(words.extra, config.data.templates).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(texts, str(directory / TEXT_FILE))
    shard_size = config.extract.shard_size
    shards: dict[str, list[str]] = {}
    for split in SPLIT_NAMES:
        items = splits.splits[split]
        split_hash = split_features_hash(job, splits, split)
        dataset = ImageDataset(items, quantized.preprocess)
        num_shards = math.ceil(len(dataset) / shard_size)
        shards[split] = [_shard_path(directory, split, s).relative_to(directory).as_posix() for s in range(num_shards)]
        progress = tqdm(total=len(dataset), desc=f"extract {split}", unit="img", leave=False)
        for shard in range(num_shards):
            path = _shard_path(directory, split, shard)
            start, stop = shard * shard_size, min(len(dataset), (shard + 1) * shard_size)
            reuse = config.extract.reuse_from
            if "extract" not in job.force and (
                _shard_done(path, split_hash)
                or (reuse is not None and _reuse(path, _shard_path(Path(reuse), split, shard), split_hash))
            ):
                progress.update(stop - start)
                continue
            loader = DataLoader(
                Subset(dataset, range(start, stop)),
                batch_size=config.extract.batch_size,
                num_workers=config.extract.num_workers,
            )
            parts: dict[str, list[torch.Tensor]] = {"labels": []}
            for images, labels in loader:
                for name, value in features_of_batch(quantized, fp32, images, layers).items():
                    parts.setdefault(name, []).append(value)
                parts["labels"].append(labels.long())
                progress.update(len(labels))
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
            save_file(tensors, str(path), metadata={"split_hash": split_hash, "start": str(start)})
        progress.close()
    meta = {
        "shape": asdict(quantized.shape),
        "layers": list(layers),
        "logit_scale": quantized.logit_scale,
        "labels": list(splits.labels),
        "templates": list(config.data.templates),
        "counts": {split: len(splits.splits[split].items) for split in SPLIT_NAMES},
        "shards": shards,
        "quant_mode": config.quant_mode,
        "quantized_modules": len(report.converted),
        "backbone": quantized.name,
        "weights_sha256": quantized.weights_sha256,
        "splits_hash": splits.content_hash,
        "word_sets": None if words is None else words.to_json(splits.labels),
    }
    write_json(directory / META_FILE, meta)
    write_record(directory, "extract", wanted, {"layers": list(layers), "counts": meta["counts"]})
    return wanted


class FeatureStore:
    """Read access to the cached features of a finished ``extract`` step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta: dict[str, Any] = read_json(directory / META_FILE)
        self.shape = VisionShape(**self.meta["shape"])
        self.layers: tuple[int, ...] = tuple(self.meta["layers"])
        self.labels: tuple[str, ...] = tuple(self.meta["labels"])
        self.logit_scale: float = float(self.meta["logit_scale"])

    def text_embeddings(self) -> torch.Tensor:
        """The label set's FP16 unit text embeddings [K, E], exactly as the engine's text cache makes them."""
        return load_file(str(self.directory / TEXT_FILE))["text_embeddings"]

    def word_sets(self) -> WordSets | None:
        """The build's word sets, or None when it has none."""
        document = self.meta.get("word_sets")
        return None if document is None else WordSets.from_json(document, self.labels)

    def view_text(self) -> torch.Tensor:
        """The text matrix label sets index: the class prompts' embeddings, then those of the words that are no
        class name (if any)."""
        texts = load_file(str(self.directory / TEXT_FILE))
        if "word_text_embeddings" not in texts:
            return texts["text_embeddings"]
        return torch.cat([texts["text_embeddings"], texts["word_text_embeddings"]])

    def count(self, split: str) -> int:
        """Images in a split."""
        return int(self.meta["counts"][split])

    def load(self, split: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors of every image of ``split``, concatenated over shards (only those keys are read)."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for relative in self.meta["shards"][split]:
            with safe_open(str(self.directory / relative), framework="pt") as handle:
                for name in names:
                    parts[name].append(handle.get_tensor(name))
        return {name: torch.cat(values) for name, values in parts.items()}
