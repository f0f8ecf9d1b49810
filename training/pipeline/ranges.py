"""Step ``ranges``: the activation ranges a static quant mode calibrates offline (:mod:`lraee_core.static_quant`).

Observed on the FP32 tower over the first :data:`CALIBRATION_IMAGES` images of the calib split (never the head,
gate or evaluation images), with a min/max observer on every Linear's input and output. The later steps build their
INT8 tower from these ranges, and ``calibrate`` writes them into the checkpoint beside the heads. For the other
quant modes the step does nothing.

The count is a constant rather than a setting: the ranges are then a pure function of the splits and the backbone,
which the feature cache's identity already covers, so a cached extraction can never be stale against them.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lraee_core.backbone import build_backbone
from lraee_core.static_quant import RANGES_FILE, STATIC_MODES, ActivationRanges, observe_ranges

from .data import ImageDataset, run_split
from .jobs import Job, backbone_identity, config_hash, step, write_record

CALIBRATION_IMAGES = 512  # calib-split images observed (all of them when the split is smaller)
BATCH_SIZE = 32  # images per FP32 forward pass


def ranges_hash(job: Job, splits_hash: str) -> str:
    """Identity of the ranges: the splits and the backbone (the FP32 tower they are observed on)."""
    identity = {**backbone_identity(job.config), "quant_mode": "fp32"}  # every static mode shares one set
    return config_hash("ranges", splits_hash, identity, CALIBRATION_IMAGES)


@step("ranges")
def run_ranges(job: Job) -> str | None:
    """Step ``ranges``: write ``ranges/activation_ranges.safetensors`` for a static quant mode; returns the step
    hash (None for a mode that needs no ranges)."""
    config = job.config
    if config.quant_mode not in STATIC_MODES:
        return None
    splits = run_split(job)
    wanted = ranges_hash(job, splits.content_hash)
    directory = job.step_dir("ranges")
    if job.should_skip("ranges", wanted):
        return wanted
    fp32 = build_backbone(config.backbone)
    calib = splits.splits["calib"]
    count = min(CALIBRATION_IMAGES, len(calib.items))
    dataset = Subset(ImageDataset(calib, fp32.preprocess), range(count))
    batches = (images for images, _ in tqdm(DataLoader(dataset, batch_size=BATCH_SIZE), desc="ranges", leave=False))
    ranges = observe_ranges(fp32.visual, batches)
    directory.mkdir(parents=True, exist_ok=True)
    ranges.save(directory / RANGES_FILE)
    write_record(directory, "ranges", wanted, {"images": ranges.images, "modules": len(ranges.inputs)})
    return wanted


def activation_ranges(job: Job) -> ActivationRanges | None:
    """The calibrated ranges of this build's static quant mode (observed first if needed); None for other modes."""
    if run_ranges(job) is None:
        return None
    return ActivationRanges.load(job.step_dir("ranges") / RANGES_FILE)
