"""POST /compat/huggingface: the Hugging Face zero-shot-image-classification task format on the /classify path.

In-process cases for every body shape the Hugging Face clients send, the errors and the headers; then the real
``huggingface_hub.InferenceClient`` against a live uvicorn on a real photo (skipped without the shared photos).
"""

from __future__ import annotations

import base64
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routers.compat import EXIT_LAYER_HEADER, FLOPS_SAVED_HEADER, OPERATING_POINT_HEADER
from lraee_core.paths import photos_root

from . import imagegen
from .conftest import LABELS
from .test_metrics import scrape, value
from .test_uvicorn import free_port, start, stop, wait_until_ready

ROUTE = "/compat/huggingface"
PHOTOS_TAR = photos_root() / "imagenet-val-acuity.tar"
SCHOOL_BUS = "n04146614/ILSVRC2012_val_00031163.JPEG"  # docs/api.md's example photo
PHOTO_LABELS = ["school bus", "sports car", "lion", "banana", "teapot"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def task_body(image: bytes, labels: Any = LABELS, **parameters: Any) -> dict[str, Any]:
    """What huggingface_hub's InferenceClient sends for zero_shot_image_classification."""
    return {"inputs": b64(image), "parameters": {"candidate_labels": labels, **parameters}}


def classify_json(client: TestClient, image: bytes, labels: list[str] = LABELS, **options: Any) -> dict[str, Any]:
    """The /classify answer for the same question, every label returned."""
    response = client.post("/classify", json={"image": b64(image), "labels": labels, "top_k": len(labels), **options})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The project's one error shape, with this status and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["status"], error["code"]) == (status, code) and error["message"]
    return error


def test_task_format_answers_like_classify(client: TestClient) -> None:
    image = imagegen.noise_png(11)
    response = client.post(ROUTE, json=task_body(image))
    assert response.status_code == 200, response.text
    answer = response.json()
    reference = classify_json(client, image)
    assert answer == reference["predictions"]  # every label, {label, score} only, highest first
    assert {p["label"] for p in answer} == set(LABELS)
    scores = [p["score"] for p in answer]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1.0) < 1e-4
    assert int(response.headers[EXIT_LAYER_HEADER]) == reference["exit_layer"]
    assert float(response.headers[FLOPS_SAVED_HEADER]) == pytest.approx(reference["flops_saved"])
    assert response.headers[OPERATING_POINT_HEADER] == reference["operating_point"] == "half"


@pytest.mark.parametrize(
    "shape",
    [
        "inputs object with labels",  # the older task schema
        "inputs object, labels in parameters",  # what @huggingface/inference sends
        "top-level image, comma-separated labels",  # what older huggingface_hub releases send
        "data URL, labels as a comma-separated string with spaces",
    ],
)
def test_other_shapes_the_clients_send(client: TestClient, shape: str) -> None:
    image = imagegen.noise_png(12)
    bodies = {
        "inputs object with labels": {"inputs": {"image": b64(image), "candidate_labels": LABELS}},
        "inputs object, labels in parameters": {
            "inputs": {"image": b64(image)},
            "parameters": {"candidate_labels": LABELS},
        },
        "top-level image, comma-separated labels": {
            "image": b64(image),
            "parameters": {"candidate_labels": ",".join(LABELS)},
        },
        "data URL, labels as a comma-separated string with spaces": {
            "inputs": "data:image/png;base64," + b64(image),
            "parameters": {"candidate_labels": ", ".join(LABELS) + ","},
            "options": {"wait_for_model": True},
        },
    }
    response = client.post(ROUTE, json=bodies[shape])
    assert response.status_code == 200, response.text
    assert response.json() == client.post(ROUTE, json=task_body(image)).json()


def test_hypothesis_template_is_the_single_template(client: TestClient) -> None:
    image = imagegen.noise_png(13)
    template = "This is a photo of {}."
    answer = client.post(ROUTE, json=task_body(image, hypothesis_template=template)).json()
    assert answer == classify_json(client, image, templates=[template])["predictions"]
    assert answer != classify_json(client, image)["predictions"]  # the template really changed the prompts


@pytest.mark.parametrize(("operating_point", "exit_layer"), [("never", 12), ("always", 9)])
def test_operating_point_is_honoured(client: TestClient, operating_point: str, exit_layer: int) -> None:
    response = client.post(ROUTE, json=task_body(imagegen.png(), operating_point=operating_point))
    assert response.status_code == 200, response.text
    assert response.headers[OPERATING_POINT_HEADER] == operating_point
    assert int(response.headers[EXIT_LAYER_HEADER]) == exit_layer
    saved = float(response.headers[FLOPS_SAVED_HEADER])
    assert saved < 0 if operating_point == "never" else saved > 0.2  # every head paid for / blocks skipped


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (task_body(b"this is not an image"), 415, "invalid_image"),
        ({"inputs": "%%% not base64 %%%", "parameters": {"candidate_labels": LABELS}}, 400, "invalid_base64"),
        (
            {"inputs": "https://example.com/cat.jpg", "parameters": {"candidate_labels": LABELS}},
            400,
            "image_urls_disabled",
        ),
        ({"inputs": "", "parameters": {"candidate_labels": LABELS}}, 400, "empty_image"),
        ({"inputs": b64(imagegen.png())}, 422, "invalid_labels"),
        (task_body(imagegen.png(), labels=[]), 422, "invalid_labels"),
        (task_body(imagegen.png(), labels=" , ,"), 422, "invalid_labels"),
        (task_body(imagegen.png(), labels=["cat", "cat"]), 422, "invalid_labels"),
        (task_body(imagegen.png(), labels=[1, 2]), 422, "validation_error"),
        (task_body(imagegen.png(), operating_point="turbo"), 422, "unknown_operating_point"),
        (task_body(imagegen.png(), hypothesis_template="a photo of a cat"), 422, "invalid_templates"),
        (task_body(imagegen.png(), candidate_label=["typo"]), 422, "validation_error"),
        ({"parameters": {"candidate_labels": LABELS}}, 422, "validation_error"),
        ({"inputs": b64(imagegen.png()), "image": b64(imagegen.png()), "parameters": {}}, 422, "validation_error"),
        (
            {
                "inputs": {"image": b64(imagegen.png()), "candidate_labels": LABELS},
                "parameters": {"candidate_labels": LABELS},
            },
            422,
            "validation_error",
        ),
        ({"inputs": [b64(imagegen.png())], "parameters": {"candidate_labels": LABELS}}, 422, "validation_error"),
    ],
    ids=[
        "not-an-image",
        "bad-base64",
        "url-not-fetched",
        "empty-image",
        "no-labels",
        "empty-labels",
        "blank-comma-string",
        "duplicate-labels",
        "labels-not-strings",
        "unknown-operating-point",
        "template-without-placeholder",
        "unknown-parameter",
        "no-image",
        "image-twice",
        "labels-twice",
        "inputs-as-list",
    ],
)
def test_bad_input_is_a_4xx_in_the_one_error_shape(client: TestClient, body: Any, status: int, code: str) -> None:
    assert_error(client.post(ROUTE, json=body), status, code)


@pytest.mark.parametrize("labels", [["x" * 300, "y"], "x" * 5000 + ",y", ["y"] * 20_000], ids=["long", "huge", "many"])
def test_oversized_label_sets_are_refused_not_crashed_on(client: TestClient, labels: Any) -> None:
    response = client.post(ROUTE, json=task_body(imagegen.png(), labels=labels))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["status"] == 422


def test_malformed_bodies(client: TestClient) -> None:
    json_type = {"Content-Type": "application/json"}
    assert_error(client.post(ROUTE, content=b"{not json", headers=json_type), 400, "invalid_json")
    assert_error(client.post(ROUTE, content=b"", headers=json_type), 400, "invalid_json")
    assert_error(client.post(ROUTE, content=b"[1, 2]", headers=json_type), 422, "validation_error")
    # A bare image body is what the clients send for tasks without parameters; this task always has labels.
    raw = client.post(ROUTE, content=imagegen.png(), headers={"Content-Type": "image/png"})
    assert "candidate_labels" in assert_error(raw, 415, "unsupported_media_type")["message"]
    form = client.post(ROUTE, files={"image": ("a.png", imagegen.png(), "image/png")}, data={"labels": LABELS})
    assert_error(form, 415, "unsupported_media_type")


def test_body_limit_is_the_one_image_classify_limit(make_settings: Any) -> None:
    settings = make_settings(max_upload_bytes=2048, max_labels=4, max_label_chars=8)
    oversized = settings.body_limit(1) + 1
    with TestClient(create_app(settings)) as small:
        assert_error(
            small.post(ROUTE, json=task_body(imagegen.noise_png(1, (64, 64)), ["a", "b"])), 413, "image_too_large"
        )
        padding = {"inputs": "A" * oversized, "parameters": {"candidate_labels": ["a", "b"]}}
        assert_error(small.post(ROUTE, json=padding), 413, "payload_too_large")


def test_requests_are_counted_under_the_route(make_settings: Any) -> None:
    with TestClient(create_app(make_settings())) as fresh:
        assert fresh.post(ROUTE, json=task_body(imagegen.png())).status_code == 200
        assert fresh.post(ROUTE, json=task_body(b"nope")).status_code == 415
        samples = scrape(fresh)
    assert value(samples, "lraee_requests_total", route=ROUTE, status="200") == 1
    assert value(samples, "lraee_requests_total", route=ROUTE, status="415") == 1
    assert sum(v for _, v in samples["lraee_exit_layer_total"]) == 1  # the refused image never reached the engine


def test_openapi_documents_the_route(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][ROUTE]["post"]
    assert "application/json" in operation["requestBody"]["content"]
    assert set(operation["responses"]["200"]["headers"]) == {
        EXIT_LAYER_HEADER,
        FLOPS_SAVED_HEADER,
        OPERATING_POINT_HEADER,
    }


# ---- the real client against a live server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def school_bus_photo() -> bytes:
    """docs/api.md's school-bus photo, a real ILSVRC2012 validation photo (read from the shared tar, never copied)."""
    if not PHOTOS_TAR.is_file():
        pytest.skip(f"real photos not found at {PHOTOS_TAR}")
    with tarfile.open(PHOTOS_TAR) as tar:
        extracted = tar.extractfile(SCHOOL_BUS)
        assert extracted is not None
        return extracted.read()


@pytest.fixture(scope="module")
def live_service() -> Iterator[str]:
    """uvicorn serving the default embedded checkpoint on loopback, as `make serve` does; its base URL."""
    port = free_port()
    process = start(Path("photos"), port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, base)
        yield base
    finally:
        stop(process)


@pytest.mark.slow
@pytest.mark.photos
def test_huggingface_hub_client_ranks_a_real_photo_like_classify(school_bus_photo: bytes, live_service: str) -> None:
    from huggingface_hub import InferenceClient

    photo = school_bus_photo
    hf = InferenceClient(model=f"{live_service}{ROUTE}", timeout=60)
    answer = hf.zero_shot_image_classification(photo, candidate_labels=PHOTO_LABELS)
    reference = httpx.post(
        f"{live_service}/classify",
        files={"image": ("bus.jpg", photo, "image/jpeg")},
        data={"labels": PHOTO_LABELS, "top_k": str(len(PHOTO_LABELS))},
        timeout=60,
    ).json()
    assert [a.label for a in answer] == [p["label"] for p in reference["predictions"]]
    for got, want in zip(answer, reference["predictions"], strict=True):
        assert got.score == pytest.approx(want["score"], abs=1e-6)
    # The exit facts the client's list has no room for: the same request over plain HTTP, headers read.
    raw = httpx.post(f"{live_service}{ROUTE}", json=task_body(photo, PHOTO_LABELS), timeout=60)
    assert raw.status_code == 200 and raw.json()[0]["label"] == answer[0].label
    assert int(raw.headers[EXIT_LAYER_HEADER]) == reference["exit_layer"]
    assert float(raw.headers[FLOPS_SAVED_HEADER]) == pytest.approx(reference["flops_saved"])
    assert raw.headers[OPERATING_POINT_HEADER] == reference["operating_point"]


@pytest.mark.slow
def test_huggingface_hub_client_gets_a_clear_http_error(live_service: str) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    hf = InferenceClient(model=f"{live_service}{ROUTE}", timeout=60)
    with pytest.raises(HfHubHTTPError) as caught:
        hf.zero_shot_image_classification(b"these bytes are no image", candidate_labels=["cat", "dog"])
    assert caught.value.response.status_code == 415
    message = str(caught.value)  # the client puts our error object into its exception's message
    assert "415" in message and "invalid_image" in message and "not a decodable image" in message
