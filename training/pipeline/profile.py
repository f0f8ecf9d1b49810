"""Step ``profile``: the layer-wise quantization-noise profile (QIRC) of the INT8 vision tower.

For each layer ``l`` (hidden state after ``l`` blocks) both towers run the same images; ``h_l`` is the FP32
state, ``hq_l`` the INT8 one (its own trajectory from the shared input, so noise accumulates with depth as it does
at inference). Norms are over all tokens and channels of an image; expectations are means over images.

* ``NSR_l = E||hq_l - h_l||^2 / E||h_l - h_{l-1}||^2``: the paper's formula was lost in extraction; we divide the
  quantization noise by the block's own representational change (what block ``l`` adds to the residual stream in
  FP32), so NSR says how loud the noise is against the signal the block contributes. A spike marks a block whose
  INT8 error is large for the work it does.
* ``INR_l = 1 / NSR_l`` (capped at 1e12 when there is no noise, e.g. quant mode "none").
* ``cosine_l``: mean over tokens and images of cos(hq_l[t], h_l[t]).
* ``mse_l``: mean squared error over every element; ``max_abs_fp32_l`` / ``max_abs_int8_l``: largest activation.
* ``outlier_share_l``: the share of FP32 activations larger in magnitude than ``OUTLIER_RMS`` x the RMS of their
  image's state at that layer. Outliers set a per-tensor scale, so the more of the range they take, the coarser the
  step every other activation gets under a static (fixed-range) quant mode.

The static quant modes profile the tower built from the build's calibrated activation ranges (step ``ranges``),
observed on the first images of the calib split, the same images profiled here: their figures are in-sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .data import ImageDataset, run_split
from .features import build_backbones
from .jobs import Job, backbone_identity, config_hash, read_json, step, write_json, write_record
from .ranges import activation_ranges

PROFILE_FILE = "profile.json"
PROFILE_PLOT = "profile.png"
MAX_INR = 1e12
OUTLIER_RMS = 6.0  # an activation is an outlier beyond this many RMS of its image's state (LLM.int8's 6, scale-free)


@dataclass(frozen=True)
class LayerProfile:
    """Quantization-noise statistics of one layer (see module docstring)."""

    layer: int  # 1-based layer: hidden state after this many blocks
    nsr: float  # noise-to-signal ratio
    inr: float  # information-to-noise ratio, 1 / nsr
    cosine: float  # mean token cosine between INT8 and FP32 states
    mse: float  # mean squared elementwise error
    max_abs_fp32: float  # largest |activation| of the FP32 state
    max_abs_int8: float  # largest |activation| of the INT8 state
    noise: float  # E||hq_l - h_l||^2 per image
    change: float  # E||h_l - h_{l-1}||^2 per image
    outlier_share: float = 0.0  # share of FP32 activations beyond OUTLIER_RMS x their image's RMS (0: not measured)


class ProfileAccumulator:
    """Running sums over image batches of the statistics :class:`LayerProfile` reports."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        size = num_layers + 1  # index 0 is the embedding output, reported layers are 1..L
        self.noise = torch.zeros(size, dtype=torch.float64)
        self.change = torch.zeros(size, dtype=torch.float64)
        self.cosine = torch.zeros(size, dtype=torch.float64)
        self.squared_error = torch.zeros(size, dtype=torch.float64)
        self.max_fp32 = torch.zeros(size, dtype=torch.float64)
        self.max_int8 = torch.zeros(size, dtype=torch.float64)
        self.outliers = torch.zeros(size, dtype=torch.float64)
        self.images = 0
        self.tokens = 0
        self.elements = 0

    def update(self, fp32_states: Sequence[torch.Tensor], int8_states: Sequence[torch.Tensor]) -> None:
        """Add a batch: ``num_layers + 1`` states each (layer 0 = embedding output), every one [B, T, D]."""
        if len(fp32_states) != self.num_layers + 1 or len(int8_states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} states per tower (layer 0..{self.num_layers})")
        batch, tokens, width = fp32_states[0].shape
        for layer, (h, hq) in enumerate(zip(fp32_states, int8_states, strict=True)):
            h, hq = h.double(), hq.double()
            error = hq - h
            self.noise[layer] += error.square().sum()
            if layer > 0:
                self.change[layer] += (h - fp32_states[layer - 1].double()).square().sum()
            self.cosine[layer] += F.cosine_similarity(hq, h, dim=-1).sum()
            self.squared_error[layer] += error.square().sum()
            self.max_fp32[layer] = max(float(self.max_fp32[layer]), float(h.abs().max()))
            self.max_int8[layer] = max(float(self.max_int8[layer]), float(hq.abs().max()))
            rms = h.square().mean(dim=(1, 2), keepdim=True).sqrt()  # [B, 1, 1]
            self.outliers[layer] += (h.abs() > OUTLIER_RMS * rms).sum()
        self.images += batch
        self.tokens += batch * tokens
        self.elements += batch * tokens * width

    def result(self) -> list[LayerProfile]:
        """Per-layer statistics for layers 1..L."""
        if self.images == 0:
            raise ValueError("no images profiled")
        out = []
        for layer in range(1, self.num_layers + 1):
            noise = float(self.noise[layer]) / self.images
            change = float(self.change[layer]) / self.images
            nsr = noise / change if change > 0 else float("inf")
            out.append(
                LayerProfile(
                    layer=layer,
                    nsr=nsr,
                    inr=min(MAX_INR, 1.0 / nsr) if nsr > 0 else MAX_INR,
                    cosine=float(self.cosine[layer]) / self.tokens,
                    mse=float(self.squared_error[layer]) / self.elements,
                    max_abs_fp32=float(self.max_fp32[layer]),
                    max_abs_int8=float(self.max_int8[layer]),
                    noise=noise,
                    change=change,
                    outlier_share=float(self.outliers[layer]) / self.elements,
                )
            )
        return out


def profile_hash(job: Job, splits_hash: str) -> str:
    """Identity of the profile: the splits, the backbone and quant mode, the profile settings."""
    return config_hash("profile", splits_hash, backbone_identity(job.config), job.config.profile, OUTLIER_RMS)


@step("profile")
def run_profile(job: Job) -> str:
    """Step ``profile``: write ``profile/profile.json`` and ``profile.png``; returns the step hash."""
    splits = run_split(job)
    wanted = profile_hash(job, splits.content_hash)
    directory = job.step_dir("profile")
    if job.should_skip("profile", wanted):
        return wanted
    config = job.config
    quantized, fp32, _ = build_backbones(config, activation_ranges(job))
    calib = splits.splits["calib"]
    count = min(config.profile.num_images, len(calib.items))
    dataset = Subset(ImageDataset(calib, quantized.preprocess), range(count))
    accumulator = ProfileAccumulator(quantized.shape.num_layers)
    with torch.inference_mode():
        for images, _ in tqdm(DataLoader(dataset, batch_size=config.profile.batch_size), desc="profile", leave=False):
            states = {}
            for name, backbone in (("fp32", fp32), ("int8", quantized)):
                hidden = backbone.embed(images)
                trajectory = [hidden]
                for layer in range(1, backbone.shape.num_layers + 1):
                    hidden = backbone.block(layer, hidden)
                    trajectory.append(hidden)
                states[name] = trajectory
            accumulator.update(states["fp32"], states["int8"])
    layers = accumulator.result()
    write_json(
        directory / PROFILE_FILE,
        {"images": count, "quant_mode": config.quant_mode, "layers": [asdict(p) for p in layers]},
    )
    plot_profile(layers, directory / PROFILE_PLOT, title=f"{quantized.name}, INT8 {config.quant_mode}")
    write_record(directory, "profile", wanted, {"images": count})
    return wanted


def plot_profile(layers: Sequence[LayerProfile], path: Path, title: str = "") -> None:
    """NSR/INR, INT8-vs-FP32 cosine and largest activations per layer."""
    from matplotlib.figure import Figure  # matplotlib is imported only when a plot is drawn

    x = [p.layer for p in layers]
    figure = Figure(figsize=(12, 3.8))
    figure.subplots_adjust(left=0.07, right=0.97, bottom=0.14, top=0.84, wspace=0.55)
    nsr_axis, cosine_axis, max_axis = figure.subplots(1, 3)
    (nsr_line,) = nsr_axis.plot(x, [p.nsr for p in layers], "o-", label="NSR")
    nsr_axis.set_yscale("log")
    nsr_axis.set_ylabel("NSR: noise / block change")
    inr_axis = nsr_axis.twinx()
    (inr_line,) = inr_axis.plot(x, [p.inr for p in layers], "s--", color="tab:orange", label="INR = 1 / NSR")
    inr_axis.set_yscale("log")
    nsr_axis.legend(handles=[nsr_line, inr_line], fontsize=8)
    nsr_axis.set_title("noise-to-signal ratio")
    cosine_axis.plot(x, [p.cosine for p in layers], "o-")
    cosine_axis.ticklabel_format(axis="y", useOffset=False)
    cosine_axis.set_title("cosine(INT8, FP32) per token")
    max_axis.plot(x, [p.max_abs_fp32 for p in layers], "o-", label="FP32")
    max_axis.plot(x, [p.max_abs_int8 for p in layers], "s--", label="INT8")
    max_axis.set_title("max |activation|")
    max_axis.legend()
    for axis in (nsr_axis, cosine_axis, max_axis):
        axis.set_xticks(x)
        axis.set_xlabel("layer (blocks run)")
    if title:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def load_profile(job: Job) -> list[LayerProfile]:
    """The per-layer statistics the ``profile`` step wrote."""
    return [LayerProfile(**p) for p in read_json(job.step_dir("profile") / PROFILE_FILE)["layers"]]
