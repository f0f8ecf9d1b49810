"""The browser page, the offline API docs and CORS, over HTTP (tests/app/test_browser.py drives a real browser).

None of these routes needs the model, so the apps here are not started through their lifespan.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routers.page import STATIC_DIR

KEY = "page-key"
ORIGIN = "https://viewer.example"
LOCAL_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def references(html: str) -> list[str]:
    """Every src= and href= of an HTML page."""
    return LOCAL_REFERENCE.findall(html)


def test_page_is_served_with_a_policy_that_forbids_other_origins(make_settings: Any) -> None:
    client = TestClient(create_app(make_settings()))
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for reference in references(response.text):
        assert reference.startswith(("/", "#", "data:")), reference
        if reference.startswith("/static/"):
            assert client.get(reference).status_code == 200, reference


def test_page_assets_name_no_other_origin() -> None:
    for asset in STATIC_DIR.iterdir():
        assert not re.search(r"https?://", asset.read_text()), f"{asset.name} refers to another origin"


def test_page_and_its_assets_need_no_key_but_the_api_does(make_settings: Any) -> None:
    client = TestClient(create_app(make_settings(api_key=KEY)))
    for path in ("/", "/static/page.js", "/static/page.css", "/static/docs/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 200, path
    assert client.get("/model").status_code == 401
    assert client.get("/docs").status_code == 401
    # A public prefix is not a way around the key to a guarded route.
    assert client.get("/static/../model").status_code in (401, 404)
    assert client.get("/static").status_code == 401


@pytest.mark.parametrize("docs", ["/docs", "/redoc"])
def test_docs_load_their_assets_from_this_service(make_settings: Any, docs: str) -> None:
    client = TestClient(create_app(make_settings()))
    response = client.get(docs)
    assert response.status_code == 200
    assets = [reference for reference in references(response.text) if reference != "/openapi.json"]
    assert assets, "the docs page references no script"
    for asset in assets:
        assert asset.startswith("/static/docs/"), asset
        assert client.get(asset).status_code == 200, asset
    assert "cdn" not in response.text.lower()


def test_cors_is_off_by_default(make_settings: Any) -> None:
    client = TestClient(create_app(make_settings()))
    preflight = client.options("/classify", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": ORIGIN}).headers


def test_cors_origins_allow_exactly_those_origins(make_settings: Any) -> None:
    client = TestClient(create_app(make_settings(api_key=KEY, cors_origins=f"{ORIGIN}, http://other.example")))
    preflight = client.options(
        "/classify",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200  # answered before the key check: a preflight carries no key
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    # A refusal reaches the other origin's script with CORS headers, so it can read why.
    refused = client.get("/model", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    stranger = client.options(
        "/classify", headers={"Origin": "https://stranger.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in stranger.headers


def test_cors_origins_read_from_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch, make_settings: Any) -> None:
    monkeypatch.setenv("LRAEE_CORS_ORIGINS", f" {ORIGIN},http://localhost:3000 ,")
    assert make_settings().cors_origins == (ORIGIN, "http://localhost:3000")
    monkeypatch.setenv("LRAEE_CORS_ORIGINS", "")
    assert make_settings().cors_origins == ()


def test_openapi_document_has_no_dangling_schema_references(make_settings: Any) -> None:
    # A "#/$defs/..." pointer inside an operation resolves against the document root, which has no $defs: ReDoc
    # then renders nothing at all (Swagger UI shrugs it off, so only /redoc shows the break).
    spec = TestClient(create_app(make_settings())).get("/openapi.json").json()
    assert "$defs" not in json.dumps(spec)
