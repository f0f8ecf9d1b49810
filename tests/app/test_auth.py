"""Optional API key: required everywhere but the health probes when LRAEE_API_KEY is set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from . import imagegen
from .conftest import multipart

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(make_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key=KEY))) as client:
        yield client


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_need_no_key(guarded: TestClient, path: str) -> None:
    assert guarded.get(path).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/classify"),
        ("POST", "/classify/batch"),
        ("GET", "/model"),
        ("GET", "/metrics"),
        ("GET", "/thresholds"),
        ("POST", "/thresholds/reset"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/nowhere"),
    ],
)
def test_everything_else_needs_it(guarded: TestClient, method: str, path: str) -> None:
    response = guarded.request(method, path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": "wrong"},
        {"Authorization": KEY},
        {"X-API-Key": ""},
        {"Authorization": f"Basic {KEY}"},
        {"X-API-Key": KEY + "x"},
    ],
    ids=["wrong-bearer", "wrong-header", "no-scheme", "empty", "basic-scheme", "longer"],
)
def test_wrong_keys_are_refused(guarded: TestClient, headers: dict[str, str]) -> None:
    assert guarded.get("/model", headers=headers).status_code == 401


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}, {"X-API-Key": KEY}]
)
def test_right_key_is_accepted(guarded: TestClient, headers: dict[str, str]) -> None:
    assert guarded.get("/model", headers=headers).status_code == 200
    response = guarded.post("/classify", headers=headers, **multipart(imagegen.png()))
    assert response.status_code == 200


def test_blank_key_setting_means_no_key(make_settings: Any) -> None:
    assert make_settings(api_key="  ").api_key is None
