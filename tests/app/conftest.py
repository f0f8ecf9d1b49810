"""App fixtures: the app built on the tiny untrained checkpoint, started through its lifespan.

``tiny_checkpoint`` (tests/conftest.py) is built once per session; each app loads its own classifier from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from lraee_core.config import BackboneConfig

LABELS = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio (the loop uvicorn uses)."""
    return "asyncio"


@pytest.fixture(scope="session")
def make_settings(tiny_checkpoint: Path) -> Any:
    """Settings on the tiny checkpoint with overrides; environment variables do not leak in for the overridden."""

    def make(**overrides: Any) -> Settings:
        return Settings(**{"checkpoint": tiny_checkpoint, **overrides})

    return make


@pytest.fixture(scope="session")
def second_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: BackboneConfig) -> Path:
    """Another untrained tiny checkpoint (other seed), served as ``untrained-b`` beside ``untrained``."""
    from lraee_core.random_init import untrained_checkpoint

    directory = tmp_path_factory.mktemp("tiny-ckpt-b")
    untrained_checkpoint(directory, tiny_config, seed=1, checkpoint_id="untrained-b")
    return directory


@pytest.fixture(scope="session")
def client(make_settings: Any) -> Iterator[TestClient]:
    """One app with default limits, started once for the session (read-mostly tests share it)."""
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and yield an async client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as async_client:
            yield async_client


def multipart(image: bytes, labels: list[str] = LABELS, **fields: Any) -> dict[str, Any]:
    """Keyword arguments of a multipart ``/classify`` post."""
    return {"files": {"image": ("image.bin", image, "application/octet-stream")}, "data": {"labels": labels, **fields}}


def ranking(body: dict[str, Any]) -> list[tuple[str, float]]:
    """A /classify answer's predictions as (label, score), highest first."""
    return [(p["label"], p["score"]) for p in body["predictions"]]
