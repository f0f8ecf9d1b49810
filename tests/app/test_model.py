"""``GET /model``: a compact summary by default, the whole manifest with ``?full=true``, no path of this machine in
either (the backbone named by architecture and weights source, never by the file the service loaded)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app.main import create_app
from app.settings import Settings
from lraee_core.backbone import build_backbone
from lraee_core.checkpoint import read_manifest, write_manifest
from lraee_core.config import BackboneConfig
from lraee_core.text import DEFAULT_TEMPLATES

REPO = Path(__file__).resolve().parents[2]
FIGURES = {  # one label count's figures as a build records them (training.pipeline.evaluate)
    "rows": 40,
    "agreement": 0.975,
    "agreement_se": 0.0247,
    "top1": 0.55,
    "flops_saved": 0.31,
    "heads_in_blocks": 0.08,
    "exit_shares": {"9": 0.5, "full": 0.5},
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_config: BackboneConfig) -> Path:
    """The tiny checkpoint with held-out figures in its manifest, as a build writes them, two absolute paths in its
    calibration record (as a hand-made checkpoint may hold), and its backbone's weights saved to a file outside it
    (``weights.safetensors`` beside the checkpoint directory)."""
    root = tmp_path_factory.mktemp("measured")
    directory = root / "checkpoint"
    shutil.copytree(tiny_checkpoint, directory)
    manifest = read_manifest(directory)
    points = {name: {"2": FIGURES, "5": FIGURES} for name in (*manifest.operating_points, "full")}
    calibration = {**manifest.calibration, "data": {"source": str(root / "photos"), "notes": str(directory / "a.txt")}}
    metrics = {"held_out": {"split": "eval", "operating_points": points}}
    write_manifest(directory, replace(manifest, calibration=calibration, metrics=metrics))
    state = build_backbone(tiny_config).model.state_dict()
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(root / "weights.safetensors"))
    return directory


@pytest.fixture(scope="module")
def client(measured: Path) -> Iterator[TestClient]:
    """The service on that checkpoint, its weights given by the backbone_weights setting (a machine path)."""
    settings = Settings(checkpoint=(measured,), backbone_weights=measured.parent / "weights.safetensors")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def machine_paths(body: Any, measured: Path) -> list[str]:
    """Strings of ``body`` that start with a path or hold a directory of this machine (the checkpoint's, the
    project's, the temporary one)."""
    directories = [str(measured), str(REPO), str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir()]
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            found.extend(key for key in value if any(d in key for d in directories))
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and (value.startswith("/") or any(d in value for d in directories)):
            found.append(value)

    walk(body)
    return found


def test_the_summary_is_compact(client: TestClient) -> None:
    response = client.get("/model")
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "untrained" and body["backbone"] == "lraee-tiny-vit12"
    assert body["backbone_source"] == "weights.safetensors (the backbone_weights setting)"
    assert body["quant_mode"] == "paper" and body["quantized_modules"] == 24 and body["exit_heads"] == "ssa"
    assert body["candidate_layers"] == [9, 11, 12] and body["pruned_layers"] == []
    assert body["default_operating_point"] == "half"
    assert body["default_templates"] == list(DEFAULT_TEMPLATES)  # the untrained checkpoint stores none
    # thresholds per calibrated label count; the untrained checkpoint has one set, for every K from 1
    assert body["operating_points"]["never"]["thresholds"] == {"1": {"9": 1.0, "11": 1.0, "12": 1.0}}
    assert body["operating_points"]["full"]["thresholds"] == {}
    assert body["limits"]["max_labels"] == 1000
    assert body["manifest"] is None and "calibration" not in body and "metrics" not in body
    for point in body["operating_points"].values():  # per label count: what the promise is about, and how many
        assert point["held_out"] == {"2": {"agreement": 0.975, "flops_saved": 0.31, "rows": 40}} | {
            "5": {"agreement": 0.975, "flops_saved": 0.31, "rows": 40}
        }


def test_full_true_adds_the_whole_manifest(client: TestClient, measured: Path) -> None:
    compact, full = client.get("/model").json(), client.get("/model", params={"full": "true"}).json()
    assert {key: value for key, value in full.items() if key not in ("manifest", "operating_points")} == {
        key: value for key, value in compact.items() if key not in ("manifest", "operating_points")
    }
    assert full["operating_points"]["half"]["held_out"]["2"] == FIGURES
    stored = json.loads((measured / "manifest.json").read_text())
    assert set(full["manifest"]) == set(stored) and full["manifest"]["metrics"] == stored["metrics"]
    assert full["manifest"]["backbone"] == stored["backbone"] and full["manifest"]["calibration"]["kind"] == "untrained"
    # absolute paths as the build writes them: under the checkpoint by root name, elsewhere by file name only
    assert full["manifest"]["calibration"]["data"] == {"source": "${elsewhere}/photos", "notes": "${checkpoint}/a.txt"}
    compact_bytes, full_bytes = len(client.get("/model").content), len(client.get("/model?full=true").content)
    assert compact_bytes < full_bytes and compact_bytes < 4096


@pytest.mark.parametrize("query", ["", "?full=true"])
def test_no_path_of_this_machine_appears(client: TestClient, measured: Path, query: str) -> None:
    body = client.get(f"/model{query}").json()
    assert machine_paths(body, measured) == []
