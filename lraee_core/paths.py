"""Where the project's files and shared data live: the one module that computes the source tree's root and reads
``LRAEE_DATA_ROOT`` and ``LRAEE_PHOTOS_SRC``.

A build records the paths it read relative to these roots by name (``${repo}``, ``${data}``), so a checkpoint's
manifest stays portable; whoever reads such a path back resolves the same names here.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the project's root when run from the source tree


def data_root() -> Path:
    """The shared data folder: ``LRAEE_DATA_ROOT``, else ``../shared/data`` next to the project."""
    return Path(os.environ.get("LRAEE_DATA_ROOT", str(REPO_ROOT.parent / "shared" / "data")))


def photos_root() -> Path:
    """The shared ImageNet-class photo tars and their ``classes.tsv``: ``LRAEE_PHOTOS_SRC``, else the data folder's
    ``imagenet-photos``."""
    return Path(os.environ.get("LRAEE_PHOTOS_SRC", str(data_root() / "imagenet-photos")))
