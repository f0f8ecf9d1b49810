"""Start-up, readiness and shutdown; settings from the environment; unexpected errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.errors import StartupError
from app.main import create_app
from app.service import ModelService
from app.settings import Settings
from lraee_core.assets import DEFAULT_CHECKPOINT, EMBEDDED_CHECKPOINTS

from . import imagegen
from .conftest import multipart, running


def test_readiness_follows_the_lifespan(make_settings: Any) -> None:
    client = TestClient(create_app(make_settings()))
    # Not started: alive, but not ready, and the model routes say why.
    assert client.get("/healthz").json() == {"status": "ok"}
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
    assert client.post("/classify", **multipart(imagegen.png())).status_code == 503
    assert client.get("/model").status_code == 503
    with client:
        assert client.get("/readyz").json() == {"status": "ready"}
    stopped = client.get("/readyz")
    assert stopped.status_code == 503 and "shutting down" in stopped.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.anyio
async def test_not_ready_until_warm_up_finishes(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    warm_up = ModelService.warm_up

    def slow_warm_up(self: ModelService) -> None:
        assert release.wait(timeout=30)
        warm_up(self)

    monkeypatch.setattr(ModelService, "warm_up", slow_warm_up)
    app = create_app(make_settings())
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        async with app.router.lifespan_context(app):
            started.set()
            await stop.wait()

    lifespan = asyncio.create_task(serve())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await asyncio.sleep(0.3)  # loading is done by now on the tiny model; warm-up is held
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200
        release.set()
        await asyncio.wait_for(started.wait(), 30)
        assert (await client.get("/readyz")).status_code == 200
        stop.set()
        await lifespan
        assert (await client.get("/readyz")).status_code == 503


@pytest.mark.anyio
async def test_not_ready_when_the_worker_has_stopped(make_settings: Any) -> None:
    app = create_app(make_settings())
    async with running(app) as client:
        assert (await client.get("/readyz")).status_code == 200
        await app.state.runtime.batcher.stop()
        response = await client.get("/readyz")
        assert response.status_code == 503 and "worker has stopped" in response.json()["error"]["message"]
        assert (await client.post("/classify", **multipart(imagegen.png()))).status_code == 503


@pytest.mark.anyio
async def test_readiness_fails_while_the_worker_is_wedged_and_recovers(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(stall_seconds=0.5))
    async with running(app) as client:
        runtime = app.state.runtime
        classifier = runtime.service.classifier
        entered, release = threading.Event(), threading.Event()
        classify = classifier.classify_rows

        def wedged(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            assert release.wait(timeout=60)
            return classify(*args, **kwargs)

        monkeypatch.setattr(classifier, "classify_rows", wedged)
        first = asyncio.create_task(client.post("/classify", **multipart(imagegen.png())))
        assert await asyncio.to_thread(entered.wait, 30)
        await asyncio.sleep(0.7)  # longer than stall_seconds, but nothing waits: a long call is not a stall
        assert (await client.get("/readyz")).status_code == 200
        second = asyncio.create_task(client.post("/classify", **multipart(imagegen.noise_png(3), labels=["x", "y"])))
        while runtime.batcher.depth == 0:
            await asyncio.sleep(0.01)
        stalled = await client.get("/readyz")
        assert stalled.status_code == 503, stalled.text
        assert "no progress" in stalled.json()["error"]["message"] and "1 images waiting" in stalled.text
        assert (await client.get("/healthz")).status_code == 200  # liveness stays: restarting would lose the work
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, second), 60)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert (await client.get("/readyz")).status_code == 200


def test_missing_checkpoint_stops_start_up(tmp_path: Path) -> None:
    app = create_app(Settings(checkpoint=(tmp_path / "nowhere",)))
    with pytest.raises(StartupError, match="LRAEE_CHECKPOINT") as info, TestClient(app):
        pass
    assert str(tmp_path / "nowhere") in str(info.value)


def test_corrupt_checkpoint_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{ not json")
    with (
        pytest.raises(StartupError, match=r"LRAEE_CHECKPOINT=.*unreadable"),
        TestClient(create_app(Settings(checkpoint=(tmp_path,)))),
    ):
        pass


def test_missing_weights_override_stops_start_up(make_settings: Any, tmp_path: Path) -> None:
    app = create_app(make_settings(backbone_weights=tmp_path / "missing.safetensors"))
    with pytest.raises(StartupError, match="LRAEE_BACKBONE_WEIGHTS"), TestClient(app):
        pass


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("LRAEE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().checkpoint == (DEFAULT_CHECKPOINT,)
    clean_env.setenv("LRAEE_CHECKPOINT", "/models/ckpt")
    clean_env.setenv("LRAEE_MAX_BATCH_SIZE", "7")
    clean_env.setenv("LRAEE_MAX_BATCH_WAIT_MS", "2.5")
    clean_env.setenv("LRAEE_API_KEY", "")
    clean_env.setenv("LRAEE_BACKBONE_WEIGHTS", "/weights/vit.safetensors")
    settings = Settings()
    assert settings.checkpoint == (Path("/models/ckpt"),) and settings.max_batch_size == 7
    assert settings.max_batch_wait_seconds == 0.0025 and settings.api_key is None
    assert settings.backbone_weights == Path("/weights/vit.safetensors")
    clean_env.setenv("LRAEE_API_KEY", "hunter2-secret")
    key = Settings().api_key
    assert key is not None and key.get_secret_value() == "hunter2-secret"
    assert "hunter2" not in repr(Settings())  # the secret never shows in logs of the settings
    clean_env.setenv("LRAEE_CHECKPOINT", "world")  # an embedded checkpoint by name
    assert Settings().checkpoint == (EMBEDDED_CHECKPOINTS["world"],) != (DEFAULT_CHECKPOINT,)
    clean_env.setenv("LRAEE_CHECKPOINT", "everyday, photos,/models/ckpt")  # several: the first is the default
    settings = Settings()
    assert settings.checkpoint == (
        EMBEDDED_CHECKPOINTS["everyday"],
        EMBEDDED_CHECKPOINTS["photos"],
        Path("/models/ckpt"),
    )
    assert settings.default_checkpoint == EMBEDDED_CHECKPOINTS["everyday"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LRAEE_THREADS": "0"}, "threads"),
        ({"LRAEE_MAX_BATCH_SIZE": "many"}, "max_batch_size"),
        ({"LRAEE_MAX_LABEL_CHARS": "500"}, "max_label_chars"),
        ({"LRAEE_MAX_BATCH_IMAGES": "64", "LRAEE_QUEUE_CAPACITY": "16"}, "LRAEE_QUEUE_CAPACITY"),
        ({"LRAEE_CHECKPOINT": "everyday,photos,everyday"}, "named twice"),
        ({"LRAEE_CHECKPOINT": " , "}, "at least one checkpoint"),
        ({"LRAEE_IMAGE_URL_ALLOW_HOSTS": "10.0.0.0/8,not a host!"}, "neither a hostname"),
    ],
)
def test_bad_settings_fail_at_start_up(clean_env: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        create_app()


def test_unexpected_errors_are_500_without_details(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(make_settings())
    with TestClient(app, raise_server_exceptions=False) as client:

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(app.state.runtime.service.classifier, "classify_rows", broken)
        response = client.post("/classify", **multipart(imagegen.png()))
        assert response.status_code == 500
        assert response.json() == {
            "error": {"code": "internal_error", "message": "internal server error", "status": 500}
        }
        monkeypatch.undo()
        assert client.post("/classify", **multipart(imagegen.png())).status_code == 200
