"""Micro-batching under load: batches form, results equal sequential ones, an idle worker starts a lone image at
once while images arriving during a batch leave together as the next one, a full queue answers 429, departed clients
are withdrawn from the queue, requests with different label sets share engine batches (oldest first), and new labels
are encoded off the inference worker: a request whose labels are cached never waits for them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from app.batching import MicroBatcher
from app.errors import QueueFull, ServiceUnavailable
from app.main import create_app
from app.settings import Settings
from lraee_core.engine import ExitResult, Prediction

from ..decisions import same_ranking
from ..lraee_core.thresholds import assert_exits_clear_of_ties
from . import imagegen
from .conftest import LABELS, ranking, running

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
        original = classifier.classify_rows
        self.entered = threading.Event()
        self.release = threading.Event()

        def classify(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.release.wait(timeout=30), "test never released the engine"
            return original(*args, **kwargs)

        monkeypatch.setattr(classifier, "classify_rows", classify)


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

    app = create_app(make_settings())
    async with running(app) as client:

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
        # Batched rows run other GEMM shapes than single ones: exits compare exactly where no image lies on a
        # threshold, and rankings where no two scores tie (tests/decisions.py).
        classifier = app.state.runtime.service.classifier
        assert_exits_clear_of_ties(classifier, images, label_sets, classifier.policy.point(None))
        for i, response in answers:
            assert response.status_code == 200, response.text
            got, want = response.json(), sequential[request_of(i)]
            assert got["exit_layer"] == want["exit_layer"]
            same_ranking(ranking(got), ranking(want), atol=1e-5)

        text = (await client.get("/metrics")).text
        buckets = metric_samples(text, "lraee_batch_size_bucket")
        single = buckets[(("le", "1.0"), ("model", "untrained"))]
        total = metric_samples(text, "lraee_batch_size_count")[(("model", "untrained"),)]
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
        sent: list[MutableMapping[str, Any]] = []
        queued = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await queued.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:  # the ASGI send callable's type
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
async def test_requests_with_different_keys_share_batches_oldest_first() -> None:
    calls: list[list[str]] = []
    entered, gate = threading.Event(), threading.Event()

    def run_batch(keys: Sequence[str], images: torch.Tensor) -> list[ExitResult]:
        entered.set()
        gate.wait(timeout=10)
        calls.append(list(keys))
        return [fake_result() for _ in range(images.shape[0])]

    batcher = MicroBatcher[str, ExitResult](max_batch_size=4, max_wait_seconds=0.0, capacity=64, threads=1)
    batcher.start(run_batch)
    image = torch.zeros(3, 2, 2)
    blocker = asyncio.create_task(batcher.submit("warm", [image]))
    assert await asyncio.to_thread(entered.wait, 10)  # the worker now holds the "warm" batch
    waiting = [asyncio.create_task(batcher.submit(key, [image])) for key in "ababa"]
    await wait_until(lambda: batcher.depth == 5)
    late = asyncio.create_task(batcher.submit("c", [image] * 2))  # two images of one request, queued last
    await wait_until(lambda: batcher.depth == 7)
    gate.set()
    await asyncio.gather(blocker, late, *waiting)
    await batcher.stop()
    # Different keys ride together; a batch is the oldest images whatever their keys, so none waits for a group.
    assert calls == [["warm"], ["a", "b", "a", "b"], ["a", "c", "c"]]


async def let_the_loop_run(turns: int = 20) -> None:
    """Give the event loop ``turns`` rounds of ready callbacks, never time: a batcher that waits on a timer (for
    company) has not moved when this returns, one that needs no timer has."""
    for _ in range(turns):
        await asyncio.sleep(0)


class HeldBatches:
    """A fake engine whose first batch is held until released; records each batch's keys."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, keys: Sequence[str], images: torch.Tensor) -> list[ExitResult]:
        self.entered.set()
        assert self.release.wait(timeout=30), "test never released the engine"
        self.calls.append(list(keys))
        return [fake_result() for _ in range(images.shape[0])]


@pytest.mark.anyio
async def test_an_idle_batcher_starts_a_lone_image_at_once() -> None:
    # The service's default wait for company: a lone image on an idle worker is taken before the loop ever sleeps.
    wait = Settings.model_fields["max_batch_wait_ms"].default / 1000.0
    depths: list[int] = []
    engine = HeldBatches()
    engine.release.set()
    batcher = MicroBatcher[str, ExitResult](max_batch_size=4, max_wait_seconds=wait, capacity=8, threads=1)
    batcher.start(engine, on_depth=depths.append)
    lone = asyncio.create_task(batcher.submit("k", [torch.zeros(3, 2, 2)]))
    await let_the_loop_run()
    assert depths == [1, 0], "the lone image was not taken at once: it waits for company"
    outcome = await asyncio.wait_for(lone, 30)
    await batcher.stop()
    assert engine.calls == [["k"]] and outcome[0].batch_size == 1


@pytest.mark.anyio
async def test_images_arriving_while_a_batch_runs_are_the_next_batch_at_once() -> None:
    # An hour's wait for company, configured: it holds only a batch an idle worker would start.
    engine = HeldBatches()
    batcher = MicroBatcher[str, ExitResult](max_batch_size=3, max_wait_seconds=3600.0, capacity=16, threads=1)
    batcher.start(engine)
    image = torch.zeros(3, 2, 2)
    first = asyncio.create_task(batcher.submit("a", [image]))
    await let_the_loop_run()
    assert batcher.depth == 1, "with a wait configured, an idle worker gives the lone image time to gather company"
    company = asyncio.create_task(batcher.submit("b", [image, image]))  # a full batch leaves at once
    assert await asyncio.to_thread(engine.entered.wait, 30)
    # While the full batch runs, two requests arrive: they leave together the moment the worker is free.
    later = [asyncio.create_task(batcher.submit(key, [image])) for key in "cd"]
    await wait_until(lambda: batcher.depth == 2)
    engine.release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(first, company, *later), 30)
    await batcher.stop()
    assert engine.calls == [["a", "b", "b"], ["c", "d"]]
    assert [outcome[0].batch_size for outcome in outcomes] == [3, 3, 2, 2]


@pytest.mark.anyio
async def test_an_image_arriving_during_background_work_waits_only_for_that_piece() -> None:
    piece_entered, piece_release = threading.Event(), threading.Event()

    class OnePiece:
        pieces = 1

        def offer(self, keys: Sequence[str], images: Sequence[torch.Tensor], results: Sequence[ExitResult]) -> None:
            pass

        def next_job(self) -> Callable[[], None] | None:
            if not self.pieces:
                return None
            self.pieces -= 1
            return self.hold

        @staticmethod
        def hold() -> None:
            piece_entered.set()
            assert piece_release.wait(timeout=30), "test never released the background piece"

    engine = HeldBatches()
    engine.release.set()
    batcher = MicroBatcher[str, ExitResult](max_batch_size=4, max_wait_seconds=3600.0, capacity=8, threads=1)
    batcher.start(engine, background=OnePiece())
    assert await asyncio.to_thread(piece_entered.wait, 30)  # the idle worker took the background piece
    live = asyncio.create_task(batcher.submit("k", [torch.zeros(3, 2, 2)]))
    await wait_until(lambda: batcher.depth == 1)
    piece_release.set()
    await asyncio.wait_for(live, 30)  # not the hour's wait for company: the worker was busy when it came
    await batcher.stop()
    assert engine.calls == [["k"]]


@pytest.mark.anyio
async def test_queue_bound_and_shutdown() -> None:
    release = threading.Event()

    def run_batch(keys: Sequence[str], images: torch.Tensor) -> list[ExitResult]:
        release.wait(timeout=10)
        return [fake_result() for _ in range(images.shape[0])]

    batcher = MicroBatcher[str, ExitResult](max_batch_size=1, max_wait_seconds=0.0, capacity=2, threads=1)
    batcher.start(run_batch)
    image = torch.zeros(3, 2, 2)
    in_flight = asyncio.create_task(batcher.submit("k", [image]))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(batcher.submit("k", [image, image]))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await batcher.submit("k", [image])
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.01)
    release.set()
    await stopping
    assert len(await in_flight) == 1  # the batch in flight still answers
    with pytest.raises(ServiceUnavailable):
        await waiting  # what waited is failed with 503
    with pytest.raises(ServiceUnavailable):
        await batcher.submit("k", [image])


@pytest.mark.anyio
async def test_a_dead_consumer_fails_waiting_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = MicroBatcher[str, ExitResult](max_batch_size=4, max_wait_seconds=0.0, capacity=8, threads=1)

    async def broken() -> None:
        raise RuntimeError("a bug in the batcher")

    monkeypatch.setattr(batcher, "_let_batch_fill", broken)
    batcher.start(lambda keys, images: [fake_result() for _ in range(images.shape[0])])
    with pytest.raises(ServiceUnavailable, match="worker has stopped"):
        await batcher.submit("k", [torch.zeros(3, 2, 2)])
    assert not batcher.running and batcher.depth == 0
    await batcher.stop()  # still stops cleanly


# ---- label sets of their own, and the text worker ---------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_with_different_label_sets_share_one_engine_batch(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No shadow checks: one could run between the held batch and the next, and it is an engine call of its own.
    app = create_app(make_settings(max_batch_size=8, max_batch_wait_ms=0, shadow_rate=0.0))
    label_sets = [LABELS, OTHER_LABELS, ["sky", "sea"]]
    async with running(app) as client:
        alone = [
            await client.post("/classify", **form(imagegen.noise_png(i), labels)) for i, labels in enumerate(label_sets)
        ]
        engine = BlockedEngine(app, monkeypatch)
        batcher = app.state.runtime.batcher
        classifier = app.state.runtime.service.classifier
        held = classifier.classify_rows
        batches: list[list[tuple[str, ...]]] = []

        def recording(images: torch.Tensor, queries: Any) -> Any:
            batches.append([query.labels for query in queries])
            return held(images, queries)

        monkeypatch.setattr(classifier, "classify_rows", recording)
        first = asyncio.create_task(client.post("/classify", **form(imagegen.png())))
        await wait_until(engine.entered.is_set)
        together = [
            asyncio.create_task(client.post("/classify", **form(imagegen.noise_png(i), labels)))
            for i, labels in enumerate(label_sets)
        ]
        await wait_until(lambda: batcher.depth == 3)
        engine.release.set()
        assert (await first).status_code == 200
        answers = await asyncio.gather(*together)
    # The three requests (in whatever order their decoding finished) share the one batch after the held one.
    assert sorted(batches[1]) == sorted(tuple(labels) for labels in label_sets), "the label sets should share a batch"
    # One batch of three runs other GEMM shapes than each image alone (tests/decisions.py).
    images = [imagegen.noise_png(i) for i in range(len(label_sets))]
    assert_exits_clear_of_ties(classifier, images, label_sets, classifier.policy.point(None))
    for got, want in zip(answers, alone, strict=True):
        assert got.status_code == 200
        assert got.json()["exit_layer"] == want.json()["exit_layer"]
        same_ranking(ranking(got.json()), ranking(want.json()), atol=1e-5)


class SlowEncoder:
    """Holds the text tower's next encodings until released (patched onto one app's text cache)."""

    def __init__(self, app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
        cache = app.state.runtime.service.classifier.text_cache
        original = cache._encode
        self.entered = threading.Event()
        self.release = threading.Event()

        def encode(prompts: list[str]) -> torch.Tensor:
            self.entered.set()
            assert self.release.wait(timeout=30), "test never released the encoder"
            return original(prompts)

        monkeypatch.setattr(cache, "_encode", encode)


@pytest.mark.anyio
async def test_a_cached_label_set_never_waits_for_another_requests_new_labels(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings())
    async with running(app) as client:
        assert (await client.post("/classify", **form(imagegen.png()))).status_code == 200  # LABELS now cached
        encoder = SlowEncoder(app, monkeypatch)
        fresh_labels = [f"never seen label {i}" for i in range(500)]  # 3,500 prompts with the default templates
        fresh = asyncio.create_task(client.post("/classify", **form(imagegen.png(), fresh_labels)))
        assert await asyncio.to_thread(encoder.entered.wait, 30)  # the text worker is busy with the fresh labels
        cached = await client.post("/classify", **form(imagegen.noise_png(1)))
        # The cached request was answered while the fresh one's encoding was still held: it did not wait for it.
        assert cached.status_code == 200, cached.text
        assert not fresh.done() and not encoder.release.is_set()
        encoder.release.set()
        answer = await fresh
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] in fresh_labels


@pytest.mark.anyio
async def test_a_full_text_queue_answers_429_and_cached_requests_still_pass(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(text_queue_capacity=1))
    async with running(app) as client:
        assert (await client.post("/classify", **form(imagegen.png()))).status_code == 200  # LABELS now cached
        encoder = SlowEncoder(app, monkeypatch)
        fresh = asyncio.create_task(client.post("/classify", **form(imagegen.png(), ["new one", "new two"])))
        assert await asyncio.to_thread(encoder.entered.wait, 30)
        refused = await client.post("/classify", **form(imagegen.png(), ["other new", "labels"]))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "text_queue_full"
        assert refused.json()["error"]["status"] == 429
        assert (await client.post("/classify", **form(imagegen.png()))).status_code == 200
        encoder.release.set()
        assert (await fresh).status_code == 200
        # The queue has room again, and what was encoded is cached.
        assert (await client.post("/classify", **form(imagegen.png(), ["other new", "labels"]))).status_code == 200


@pytest.mark.anyio
async def test_the_prompt_budget_counts_labels_times_templates(make_settings: Any) -> None:
    app = create_app(make_settings(max_prompts=10))
    async with running(app) as client:
        # 2 labels x the 7 default templates = 14 prompts
        over = await client.post("/classify", **form(imagegen.png(), ["cat", "dog"]))
        assert over.status_code == 422
        assert over.json()["error"]["code"] == "invalid_labels"
        assert "2 labels x 7 templates = 14 prompts; the limit is 10" in over.json()["error"]["message"]
        templated = {
            **form(imagegen.png(), ["cat", "dog"]),
            "data": {"labels": ["cat", "dog"], "templates": ["a {}"] * 6},
        }
        over_templates = await client.post("/classify", **templated)
        assert over_templates.status_code == 422 and over_templates.json()["error"]["code"] == "invalid_templates"
        templated["data"]["templates"] = ["a {}", "the {}"]
        assert (await client.post("/classify", **templated)).status_code == 200  # 4 prompts
        assert (await client.get("/model")).json()["limits"]["max_prompts"] == 10
