"""Micro-batching under load: batches form, results equal sequential ones, a full queue answers 429, departed
clients are withdrawn from the queue, and distinct label sets never share an engine batch."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from app.batching import MicroBatcher
from app.errors import QueueFull, ServiceUnavailable
from app.main import create_app
from lraee_core.engine import ExitResult, Prediction

from . import imagegen
from .conftest import LABELS, running

OTHER_LABELS = ["apple", "banana", "cherry"]


def form(image: bytes, labels: list[str] = LABELS) -> dict[str, Any]:
    return {"files": {"image": ("i.png", image, "image/png")}, "data": {"labels": labels}}


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class BlockedEngine:
    """Holds the engine's next batches until released (patched onto one app's classifier)."""

    def __init__(self, app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
        classifier = app.state.runtime.service.classifier
        original = classifier.classify
        self.entered = threading.Event()
        self.release = threading.Event()

        def classify(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.release.wait(timeout=30), "test never released the engine"
            return original(*args, **kwargs)

        monkeypatch.setattr(classifier, "classify", classify)


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric family: label items -> value."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                break
        else:
            continue
        return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}
    return {}


@pytest.mark.anyio
async def test_concurrent_requests_batch_and_match_sequential(make_settings: Any) -> None:
    images = [imagegen.noise_png(seed) for seed in range(8)]
    label_sets = [LABELS, OTHER_LABELS]

    def request_of(i: int) -> tuple[int, int]:
        return i % len(images), (i // len(images)) % len(label_sets)

    async with running(create_app(make_settings())) as client:

        async def post(i: int) -> httpx.Response:
            image, labels = request_of(i)
            return await client.post("/classify", **form(images[image], label_sets[labels]))

        sequential = {}
        for i in range(16):
            response = await post(i)
            assert response.status_code == 200
            sequential[request_of(i)] = response.json()

        slots = asyncio.Semaphore(16)  # 16 concurrent clients

        async def client_request(i: int) -> tuple[int, httpx.Response]:
            async with slots:
                return i, await post(i)

        answers = await asyncio.gather(*(client_request(i) for i in range(200)))
        for i, response in answers:
            assert response.status_code == 200, response.text
            got, want = response.json(), sequential[request_of(i)]
            assert got["exit_layer"] == want["exit_layer"]
            assert got["predictions"][0]["label"] == want["predictions"][0]["label"]
            for a, b in zip(got["predictions"], want["predictions"], strict=True):
                assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-5

        text = (await client.get("/metrics")).text
        buckets = metric_samples(text, "lraee_batch_size_bucket")
        single = buckets[(("le", "1.0"),)]
        total = metric_samples(text, "lraee_batch_size_count")[()]
        assert total > single, "no engine batch held more than one image"
        assert metric_samples(text, "lraee_requests_total")[(("route", "/classify"), ("status", "200"))] == 216


@pytest.mark.anyio
async def test_full_queue_answers_429_with_retry_after(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(make_settings(queue_capacity=2, max_batch_images=2, max_batch_size=1, max_batch_wait_ms=0))
    async with running(app) as client:
        engine = BlockedEngine(app, monkeypatch)
        batcher = app.state.runtime.batcher
        running_request = asyncio.create_task(client.post("/classify", **form(imagegen.png())))
        await wait_until(engine.entered.is_set)
        queued = [asyncio.create_task(client.post("/classify", **form(imagegen.png()))) for _ in range(2)]
        await wait_until(lambda: batcher.depth == 2)

        refused = await client.post("/classify", **form(imagegen.png()))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        refused_batch = await client.post(
            "/classify/batch", files=[("images", ("i.png", imagegen.png(), "image/png"))], data={"labels": LABELS}
        )
        assert refused_batch.status_code == 429

        engine.release.set()
        for response in await asyncio.gather(running_request, *queued):
            assert response.status_code == 200
        assert batcher.depth == 0
        assert (await client.post("/classify", **form(imagegen.png()))).status_code == 200


@pytest.mark.anyio
async def test_departed_clients_are_withdrawn(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(make_settings(max_batch_size=1, max_batch_wait_ms=0))
    async with running(app) as client:
        engine = BlockedEngine(app, monkeypatch)
        batcher = app.state.runtime.batcher
        first = asyncio.create_task(client.post("/classify", **form(imagegen.png())))
        await wait_until(engine.entered.is_set)

        # A client whose task is cancelled while queued (the in-process transport runs the app in its task).
        cancelled = asyncio.create_task(client.post("/classify", **form(imagegen.png())))
        await wait_until(lambda: batcher.depth == 1)
        cancelled.cancel()
        await wait_until(lambda: batcher.depth == 0)

        # A client that closes the connection: the ASGI server reports http.disconnect after the body.
        request = client.build_request("POST", "/classify", **form(imagegen.png()))
        body = request.read()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []
        queued = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await queued.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/classify",
            "raw_path": b"/classify",
            "root_path": "",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }
        departing = asyncio.create_task(app(scope, receive, send))
        await wait_until(lambda: batcher.depth == 1)
        queued.set()
        await departing
        assert sent[0]["status"] == 499
        assert batcher.depth == 0

        engine.release.set()
        assert (await first).status_code == 200
        assert (await client.post("/classify", **form(imagegen.png()))).status_code == 200


# ---- the batcher alone, with a fake engine ------------------------------------------------------------------------


def fake_result() -> ExitResult:
    return ExitResult(
        predictions=(Prediction("a", 1.0),),
        exit_layer=1,
        num_layers=1,
        exit_path="full",
        gate_probability=None,
        flops=1,
        flops_saved=0.0,
        flops_full=1,
    )


@pytest.mark.anyio
async def test_only_requests_with_the_same_key_share_a_batch() -> None:
    calls: list[tuple[Hashable, int]] = []
    gate = threading.Event()

    def run_batch(key: Hashable, images: torch.Tensor, top_k: int) -> list[ExitResult]:
        gate.wait(timeout=10)
        calls.append((key, images.shape[0]))
        return [fake_result() for _ in range(images.shape[0])]

    batcher = MicroBatcher(max_batch_size=8, max_wait_seconds=0.0, capacity=64, threads=1)
    batcher.start(run_batch)
    image = torch.zeros(3, 2, 2)
    blocker = asyncio.create_task(batcher.submit("warm", [image], 1))
    await asyncio.sleep(0.05)  # the worker now holds the "warm" batch
    waiting = [asyncio.create_task(batcher.submit(key, [image], 1)) for key in "ababa"]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(blocker, *waiting)
    await batcher.stop()
    assert calls == [("warm", 1), ("a", 3), ("b", 2)]


@pytest.mark.anyio
async def test_queue_bound_and_shutdown() -> None:
    release = threading.Event()

    def run_batch(key: Hashable, images: torch.Tensor, top_k: int) -> list[ExitResult]:
        release.wait(timeout=10)
        return [fake_result() for _ in range(images.shape[0])]

    batcher = MicroBatcher(max_batch_size=1, max_wait_seconds=0.0, capacity=2, threads=1)
    batcher.start(run_batch)
    image = torch.zeros(3, 2, 2)
    in_flight = asyncio.create_task(batcher.submit("k", [image], 1))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(batcher.submit("k", [image, image], 1))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await batcher.submit("k", [image], 1)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.01)
    release.set()
    await stopping
    assert len(await in_flight) == 1  # the batch in flight still answers
    with pytest.raises(ServiceUnavailable):
        await waiting  # what waited is failed with 503
    with pytest.raises(ServiceUnavailable):
        await batcher.submit("k", [image], 1)


@pytest.mark.anyio
async def test_a_dead_consumer_fails_waiting_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = MicroBatcher(max_batch_size=4, max_wait_seconds=0.0, capacity=8, threads=1)

    async def broken(key: Hashable) -> None:
        raise RuntimeError("a bug in the batcher")

    monkeypatch.setattr(batcher, "_let_group_fill", broken)
    batcher.start(lambda key, images, top_k: [fake_result() for _ in range(images.shape[0])])
    with pytest.raises(ServiceUnavailable, match="worker has stopped"):
        await batcher.submit("k", [torch.zeros(3, 2, 2)], 1)
    assert not batcher.running and batcher.depth == 0
    await batcher.stop()  # still stops cleanly
