"""Several models in one service: chosen by name on every route, each with its own engine, queue and metrics."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app

from . import imagegen
from .conftest import LABELS, multipart


@pytest.fixture(scope="module")
def two(make_settings: Any, tiny_checkpoint: Path, second_checkpoint: Path) -> Iterator[TestClient]:
    """One app serving ``untrained`` (the default) and ``untrained-b``."""
    with TestClient(create_app(make_settings(checkpoint=(tiny_checkpoint, second_checkpoint)))) as client:
        yield client


two_names = ("untrained", "untrained-b")


def test_the_model_field_chooses_the_model_on_every_route(two: TestClient) -> None:
    image = imagegen.noise_png(3)
    default = two.post("/classify", **multipart(image, operating_point="full"))
    by_form = two.post("/classify", **multipart(image, operating_point="full", model="untrained-b"))
    default_by_id = two.post("/classify", **multipart(image, operating_point="full", model="untrained"))
    assert default.json()["model"] == "untrained" and by_form.json()["model"] == "untrained-b"
    assert default_by_id.json()["predictions"] == default.json()["predictions"]
    # Another model, other exit heads (the two tiny checkpoints share their random backbone, not their heads).
    heads = [two.post("/classify", **multipart(image, operating_point="always", model=name)) for name in two_names]
    assert heads[0].json()["predictions"] != heads[1].json()["predictions"]
    encoded = base64.b64encode(image).decode()
    by_json = two.post(
        "/classify", json={"image": encoded, "labels": LABELS, "operating_point": "full", "model": "untrained-b"}
    )
    assert by_json.json()["model"] == "untrained-b" and by_json.json()["predictions"] == by_form.json()["predictions"]
    batch = two.post("/classify/batch", json={"images": [encoded] * 2, "labels": LABELS, "model": "untrained-b"})
    assert [result["model"] for result in batch.json()["results"]] == ["untrained-b"] * 2
    task = {"inputs": encoded, "parameters": {"candidate_labels": LABELS, "operating_point": "full"}}
    by_query = two.post("/compat/huggingface?model=untrained-b", json=task)
    task["parameters"]["model"] = "untrained-b"  # type: ignore[index]
    by_parameter = two.post("/compat/huggingface", json=task)
    for response in (by_query, by_parameter):
        assert response.status_code == 200, response.text
        top = response.json()[0]
        assert top == by_form.json()["predictions"][0]


def test_an_unknown_model_is_a_404_listing_the_served_ones(two: TestClient) -> None:
    for response in (
        two.post("/classify", **multipart(imagegen.png(), model="photos")),
        two.get("/model", params={"model": "photos"}),
        two.post("/v1/embeddings", json={"model": "photos", "input": "a cat"}),
        two.get("/v1/models/photos"),
    ):
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "unknown_model" and error["details"]["models"] == ["untrained", "untrained-b"]
        assert "untrained-b" in error["message"]


def test_model_and_models_describe_each_served_model(two: TestClient) -> None:
    assert two.get("/model").json()["model"] == "untrained"
    other = two.get("/model", params={"model": "untrained-b"}).json()
    assert other["model"] == other["checkpoint_id"] == "untrained-b" and other["embedding_dimensions"] > 0
    listing = two.get("/models").json()
    assert listing["default"] == "untrained"
    assert [(entry["model"], entry["default"]) for entry in listing["models"]] == [
        ("untrained", True),
        ("untrained-b", False),
    ]
    assert "full" in listing["models"][1]["operating_points"]


def test_each_model_has_its_own_series(two: TestClient) -> None:
    two.post("/classify", **multipart(imagegen.png(), model="untrained-b"))
    families = {family.name: family for family in text_string_to_metric_families(two.get("/metrics").text)}
    models = {sample.labels["model"] for sample in families["lraee_model_info"].samples}
    assert models == {"untrained", "untrained-b"}
    batches = {
        sample.labels["model"]: sample.value
        for sample in families["lraee_batch_size"].samples
        if sample.name == "lraee_batch_size_count"
    }
    assert batches["untrained-b"] >= 1
    depth = {sample.labels["model"] for sample in families["lraee_queue_depth"].samples}
    assert depth == {"untrained", "untrained-b"}
    runtime = two.app.state.runtime  # type: ignore[attr-defined]
    engines = [model.service.classifier for model in runtime.models]
    assert engines[0] is not engines[1] and engines[0].text_cache is not engines[1].text_cache
    assert runtime.models.default.batcher is not list(runtime.models)[1].batcher


def test_the_page_offers_the_served_models(two: TestClient) -> None:
    page = two.get("/").text
    assert 'id="model-choice"' in page and '<select id="model" name="model"' in page
    script = two.get("/static/page.js").text
    assert 'api("/models")' in script and 'form.append("model"' in script and "/model?model=" in script
