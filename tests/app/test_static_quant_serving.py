"""The app serves a static-INT8 checkpoint like any other: it loads the calibrated ranges the checkpoint carries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from lraee_core.backbone import build_backbone
from lraee_core.config import BackboneConfig
from lraee_core.random_init import untrained_checkpoint
from lraee_core.static_quant import observe_ranges

from . import imagegen
from .conftest import LABELS, multipart


@pytest.fixture(scope="module")
def static_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: BackboneConfig) -> Path:
    backbone = build_backbone(tiny_config)
    side = backbone.shape.image_size
    images = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(3))
    directory = tmp_path_factory.mktemp("static-serving")
    ranges = observe_ranges(backbone.visual, [images])
    untrained_checkpoint(directory, tiny_config, quant_mode="static", activation_ranges=ranges, backbone=backbone)
    return directory


def test_static_checkpoint_serves_classify(static_checkpoint: Path) -> None:
    with TestClient(create_app(Settings(checkpoint=(static_checkpoint,)))) as client:
        model = client.get("/model").json()
        assert model["quant_mode"] == "static" and model["quantized_modules"] == 48
        response = client.post("/classify", **multipart(imagegen.noise_png(1)))
        assert response.status_code == 200, response.text
        body = response.json()
        assert {p["label"] for p in body["predictions"]} <= set(LABELS)
        assert body["exit_layer"] >= 1
        again = client.post("/classify", **multipart(imagegen.noise_png(1)))
        assert again.json()["predictions"] == body["predictions"]  # fixed scales: the same answer every time
