"""Fixtures shared by every test package: tiny and ViT-B-32 backbones with random weights, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lraee_core.assets import MODEL_CONFIGS_DIR
from lraee_core.config import BackboneConfig

torch.set_num_threads(int(os.environ.get("LRAEE_TEST_THREADS", "2")))

TINY_CONFIG_FILE = MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"


@pytest.fixture(scope="session")
def tiny_config() -> BackboneConfig:
    """The project's 12-block tiny open_clip CLIP, random init (seeded)."""
    return BackboneConfig("lraee-tiny-vit12", model_config_file=str(TINY_CONFIG_FILE))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: BackboneConfig) -> Path:
    """An untrained LRA-EE checkpoint on the tiny backbone (operating points half/never/always)."""
    from lraee_core.random_init import untrained_checkpoint

    directory = tmp_path_factory.mktemp("tiny-ckpt")
    untrained_checkpoint(directory, tiny_config)
    return directory
