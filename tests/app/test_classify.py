"""Happy paths of /classify and /classify/batch, in both content types, and GET /model."""

from __future__ import annotations

import base64
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ..decisions import same_ranking
from ..lraee_core.thresholds import assert_exits_clear_of_ties
from . import imagegen
from .conftest import LABELS, multipart, ranking


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_multipart_response_shape(client: TestClient) -> None:
    response = client.post("/classify", **multipart(imagegen.png()))
    assert response.status_code == 200, response.text
    body = response.json()
    scores = [p["score"] for p in body["predictions"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert {p["label"] for p in body["predictions"]} == set(LABELS)
    assert abs(sum(scores) - 1.0) < 1e-4  # top-5 of 5 labels: the whole softmax
    assert body["num_layers"] == 12 and body["model"] == "untrained" and body["operating_point"] == "half"
    assert body["exited_early"] == (body["exit_layer"] < 12)
    assert body["exit_path"] in ("head", "full")
    assert 0 < body["flops"] < 1  # GFLOPs of the tiny model
    assert set(body["timing_ms"]) == {"decode", "queue", "inference"}
    assert all(value >= 0 for value in body["timing_ms"].values())


def test_json_equals_multipart(client: TestClient) -> None:
    image = imagegen.noise_png(3)
    form = client.post("/classify", **multipart(image, top_k="2")).json()
    plain = client.post("/classify", json={"image": b64(image), "labels": LABELS, "top_k": 2}).json()
    data_url = client.post(
        "/classify", json={"image": "data:image/png;base64," + b64(image), "labels": LABELS, "top_k": 2}
    ).json()
    for other in (plain, data_url):
        assert other["predictions"] == form["predictions"]
        assert other["exit_layer"] == form["exit_layer"]
    assert len(form["predictions"]) == 2


def test_labels_as_one_json_field(client: TestClient) -> None:
    response = client.post("/classify", **multipart(imagegen.png(), labels=['["cat", "dog"]']))
    assert response.status_code == 200
    assert {p["label"] for p in response.json()["predictions"]} == {"cat", "dog"}


def test_templates_both_forms(client: TestClient) -> None:
    templates = ["a photo of a {}.", "a drawing of a {}."]
    repeated = client.post("/classify", **multipart(imagegen.png(), templates=templates)).json()
    as_json = client.post(
        "/classify", **multipart(imagegen.png(), templates='["a photo of a {}.", "a drawing of a {}."]')
    ).json()
    body = client.post("/classify", json={"image": b64(imagegen.png()), "labels": LABELS, "templates": templates})
    assert repeated["predictions"] == as_json["predictions"] == body.json()["predictions"]


def test_top_k_beyond_the_label_count_returns_every_label(client: TestClient) -> None:
    response = client.post("/classify", **multipart(imagegen.png(), labels=["cat", "dog"], top_k="50"))
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def test_labels_are_stripped_and_urls_are_just_text(client: TestClient) -> None:
    labels = ["  cat ", "https://example.com/dog.jpg"]
    response = client.post("/classify", **multipart(imagegen.png(), labels=labels))
    assert response.status_code == 200
    assert {p["label"] for p in response.json()["predictions"]} == {"cat", "https://example.com/dog.jpg"}


@pytest.mark.parametrize(("operating_point", "exit_path", "exit_layer"), [("never", "full", 12), ("always", "head", 9)])
def test_operating_points(client: TestClient, operating_point: str, exit_path: str, exit_layer: int) -> None:
    body = client.post("/classify", **multipart(imagegen.png(), operating_point=operating_point)).json()
    assert (body["operating_point"], body["exit_path"], body["exit_layer"]) == (operating_point, exit_path, exit_layer)
    if operating_point == "never":
        assert not body["exited_early"] and body["gate_probability"] is None
        assert body["flops_saved"] < 0  # every head was evaluated and none was used
    else:
        assert body["exited_early"] and body["flops_saved"] > 0.2


def test_batch_in_order_both_forms(client: TestClient) -> None:
    images = [imagegen.noise_png(seed) for seed in range(3)]
    singles = [client.post("/classify", **multipart(image)).json() for image in images]
    form = client.post(
        "/classify/batch",
        files=[("images", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)],
        data={"labels": LABELS},
    )
    body = client.post("/classify/batch", json={"images": [b64(image) for image in images], "labels": LABELS})
    # A batch of three runs other GEMM shapes than each image alone (tests/decisions.py): exits compare exactly
    # where no image lies on a threshold, rankings where no two scores tie.
    classifier = client.app.state.runtime.service.classifier  # type: ignore[attr-defined]
    assert_exits_clear_of_ties(classifier, images, [LABELS], classifier.policy.point(None))
    for response in (form, body):
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        for result, single in zip(results, singles, strict=True):
            assert result["exit_layer"] == single["exit_layer"]
            same_ranking(ranking(result), ranking(single), atol=1e-5)


def test_text_encoding_runs_on_the_text_worker(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """New labels are encoded on the text worker's thread, never the inference worker's (which only reads the
    embeddings the request brings)."""
    cache = client.app.state.runtime.service.classifier.text_cache  # type: ignore[attr-defined]
    threads: list[str] = []
    original = cache.get

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "get", spy)
    response = client.post("/classify", **multipart(imagegen.png(), labels=["a label set never seen", "another"]))
    assert response.status_code == 200
    assert threads and all(name.startswith("lraee-text") for name in threads)


def test_a_non_image_is_refused_before_its_new_labels_are_encoded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image headers are checked before a request's fresh labels go to the text worker: garbage bytes get their
    415 (with the image's index in a batch) and no prompt is encoded for them."""
    cache = client.app.state.runtime.service.classifier.text_cache  # type: ignore[attr-defined]
    encoded: list[object] = []
    original = cache.get

    def spy(*args: Any, **kwargs: Any) -> Any:
        encoded.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "get", spy)
    fresh = ["a label nobody sent before", "and its sibling"]
    single = client.post("/classify", **multipart(b"not an image at all", labels=fresh))
    batch = client.post(
        "/classify/batch", json={"images": [b64(imagegen.png()), b64(b"GIF89a nonsense")], "labels": fresh}
    )
    assert single.status_code == 415 and batch.status_code == 415
    assert batch.json()["error"]["details"] == {"index": 1}  # the second image
    assert encoded == []
    assert client.post("/classify", **multipart(imagegen.png(), labels=fresh)).status_code == 200
    assert len(encoded) == 1  # a good image with the same labels encodes them once


def test_openapi_documents_both_content_types(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert "429" in spec["paths"]["/classify"]["post"]["responses"]
    assert client.get("/docs").status_code == 200
