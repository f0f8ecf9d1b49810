"""Files shipped with the package: the tiny model's architecture and the embedded checkpoints.

Three embedded checkpoints, all built by the project's own ``lraee-train`` jobs on the tiny 12-block CLIP:

* ``everyday``: the photos CLIP trained further on everyday photos (CIFAR-10, Intel scenes, flowers, Flickr8k's
  human captions) with WordNet captions, so it knows everyday words ("dog", "car", "fruit"); the default, since
  clients send such labels (docs/measurements.md);
* ``photos``: the CLIP trained on real ImageNet-class photos (202 classes) only; the default before ``everyday``,
  kept by name;
* ``world``: the CLIP trained on the generated shape world; it knows coloured shapes and nothing else.

A checkpoint setting may name any of them instead of giving a path.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
MODEL_CONFIGS_DIR = ASSETS_DIR / "model_configs"  # open_clip JSON architectures of the project's own models
EMBEDDED_CHECKPOINTS = {  # name -> checkpoint directory inside the package
    "photos": ASSETS_DIR / "photos",
    "everyday": ASSETS_DIR / "everyday",
    "world": ASSETS_DIR / "world",
}
DEFAULT_EMBEDDED = "everyday"  # the checkpoint `make serve` loads when none is configured
DEFAULT_CHECKPOINT = EMBEDDED_CHECKPOINTS[DEFAULT_EMBEDDED]


def resolve_checkpoint(value: str | Path) -> Path:
    """An embedded checkpoint's name (``everyday``, ``photos``, ``world``) becomes its directory;
    anything else is a path."""
    name = str(value)
    return EMBEDDED_CHECKPOINTS[name] if name in EMBEDDED_CHECKPOINTS else Path(value)
