"""Shadow sampling: early exits re-run at full depth in idle time, counted by layer, operating point and agreement."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.batching import MicroBatcher
from app.main import create_app
from app.service import BatchKey, Question
from app.shadow import ShadowSampler
from lraee_core.engine import ExitResult, Prediction
from lraee_core.exits import ExitRule
from lraee_core.promises import ShadowOutcome

from . import imagegen
from .conftest import multipart, running
from .test_metrics import value

KEY = BatchKey(Question(("cat", "dog"), ("a photo of a {}.",), "fast", ExitRule.full(), top_k=1), text_rows=())


def result(label: str, path: str = "head", layer: int = 9) -> ExitResult:
    return ExitResult(
        predictions=(Prediction(label, 0.9),),
        exit_layer=layer if path == "head" else 12,
        num_layers=12,
        exit_path=path,  # type: ignore[arg-type]
        gate_probability=0.9 if path == "head" else None,
        flops=1,
        flops_saved=0.5,
        flops_full=2,
    )


def test_sampler_keeps_early_exits_only_and_drops_when_full() -> None:
    checks: list[ShadowOutcome] = []
    dropped: list[int] = []
    answers = {0.0: "cat", 1.0: "dog"}  # full depth answers by the image's value

    def full_depth(key: BatchKey, images: torch.Tensor) -> list[ExitResult]:
        assert images.shape == (1, 3, 2, 2) and key is KEY
        return [result(answers[float(images[0, 0, 0, 0])], "full")]

    sampler = ShadowSampler(1.0, full_depth, checks.append, on_drop=lambda: dropped.append(1), capacity=2)
    images = [torch.full((3, 2, 2), float(i % 2)) for i in range(4)]
    sampler.offer([KEY] * 4, images, [result("cat"), result("cat", layer=11), result("cat", "full"), result("dog")])
    assert sampler.pending == 2 and dropped == [1]  # the full-path image is never sampled; the third early exit dropped
    while (job := sampler.next_job()) is not None:
        job()
    # Each outcome carries what the thresholds depend on: the label count, the exit layer and its gate probability.
    assert [(c.exit_layer, c.operating_point, c.agree, c.label_count, c.gate_probability) for c in checks] == [
        (9, "fast", True, 2, 0.9),
        (11, "fast", False, 2, 0.9),
    ]
    assert all(check.rule is KEY.question.rule for check in checks)
    assert sampler.next_job() is None


def test_sampler_rate_is_a_share_and_zero_is_off() -> None:
    image = torch.zeros(3, 2, 2)
    off = ShadowSampler(0.0, lambda *_: [], lambda *_: None)
    off.offer([KEY] * 100, [image] * 100, [result("cat")] * 100)
    assert off.pending == 0
    tenth = ShadowSampler(0.1, lambda *_: [], lambda *_: None, capacity=10_000, seed=1)
    tenth.offer([KEY] * 2000, [image] * 2000, [result("cat")] * 2000)
    assert 140 < tenth.pending < 260  # binomial(2000, 0.1): mean 200, sd 13
    with pytest.raises(ValueError, match="shadow rate"):
        ShadowSampler(1.5, lambda *_: [], lambda *_: None)


class Recorder:
    """Background work that logs when it runs, to see it never goes before live work."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.offered = 0
        self.jobs = 0

    def offer(self, keys: Sequence[str], images: Sequence[torch.Tensor], results: Sequence[ExitResult]) -> None:
        self.offered += len(images)
        self.jobs += len(images)

    def next_job(self) -> Any:
        if not self.jobs:
            return None
        self.jobs -= 1
        return lambda: self.log.append("shadow")


@pytest.mark.anyio
async def test_background_work_runs_only_when_no_live_image_waits() -> None:
    log: list[str] = []

    def run_batch(keys: Sequence[str], images: torch.Tensor) -> list[ExitResult]:
        log.append(f"live {''.join(map(str, keys))}")
        return [result("cat")] * images.shape[0]

    batcher = MicroBatcher[str, ExitResult](max_batch_size=4, max_wait_seconds=0.0, capacity=64, threads=1)
    background = Recorder(log)
    batcher.start(run_batch, background=background)
    image = torch.zeros(3, 2, 2)
    # Eight images of two groups arrive at once: both groups run before any shadow job.
    await asyncio.gather(*(batcher.submit(key, [image] * 4) for key in ("a", "b")))
    for _ in range(100):
        if log.count("shadow") == 8:
            break
        await asyncio.sleep(0.01)
    await batcher.stop()
    assert log[:2] == ["live aaaa", "live bbbb"] and log[2:] == ["shadow"] * 8, log
    assert background.offered == 8


@pytest.mark.anyio
async def test_shadow_checks_are_counted_per_layer_and_operating_point(make_settings: Any) -> None:
    app = create_app(make_settings(shadow_rate=1.0))
    labels = ["red", "green", "blue"]
    async with running(app) as client:
        before = scrape_async(await client.get("/metrics"))
        layers = {labels_["layer"] for labels_, _ in before["lraee_shadow_checks_total"]}
        assert (
            layers == {"9", "11", "12"}
            and value(
                before,
                "lraee_shadow_checks_total",
                model="untrained",
                layer="9",
                operating_point="always",
                agree="true",
            )
            == 0
        )
        early, full = [], []
        for seed in range(4):
            image = imagegen.noise_png(seed)
            early.append((await client.post("/classify", **multipart(image, labels, operating_point="always"))).json())
            full.append((await client.post("/classify", **multipart(image, labels, operating_point="full"))).json())
        for _ in range(200):  # the checks run in idle time, after the answers went out
            samples = scrape_async(await client.get("/metrics"))
            checked = [
                v for labels_, v in samples["lraee_shadow_checks_total"] if labels_["operating_point"] == "always"
            ]
            if sum(checked) == 4:
                break
            await asyncio.sleep(0.02)
    assert all(answer["exit_path"] == "head" and answer["exit_layer"] == 9 for answer in early)
    agree = sum(e["predictions"][0]["label"] == f["predictions"][0]["label"] for e, f in zip(early, full, strict=True))
    assert (
        value(
            samples, "lraee_shadow_checks_total", model="untrained", layer="9", operating_point="always", agree="true"
        )
        == agree
    )
    assert (
        value(
            samples, "lraee_shadow_checks_total", model="untrained", layer="9", operating_point="always", agree="false"
        )
        == 4 - agree
    )
    assert value(samples, "lraee_answers_total", model="untrained", operating_point="always", exit_path="head") == 4
    assert value(samples, "lraee_answers_total", model="untrained", operating_point="full", exit_path="full") == 4
    assert value(samples, "lraee_shadow_dropped_total", model="untrained") == 0


def scrape_async(response: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of a fetched /metrics response (test_metrics.scrape, for the async client)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


class TimedRecorder(Recorder):
    """Background work that always has a job, each taking ``seconds`` of the worker (measured into ``spent``)."""

    def __init__(self, log: list[str], seconds: float) -> None:
        super().__init__(log)
        self.seconds = seconds
        self.spent = 0.0

    def next_job(self) -> Any:
        def job() -> None:
            started = time.perf_counter()
            time.sleep(self.seconds)
            self.log.append("shadow")
            self.spent += time.perf_counter() - started

        return job


@pytest.mark.anyio
async def test_under_sustained_load_background_work_takes_at_most_its_budget() -> None:
    log: list[str] = []
    engine = [0.0]

    def run_batch(keys: Sequence[str], images: torch.Tensor) -> list[ExitResult]:
        started = time.perf_counter()
        time.sleep(0.01)  # every live batch: about 10 ms of engine time
        log.append("live")
        engine[0] += time.perf_counter() - started
        return [result("cat")] * images.shape[0]

    batcher = MicroBatcher[str, ExitResult](max_batch_size=1, max_wait_seconds=0.0, capacity=1024, threads=1)
    background = TimedRecorder(log, 0.002)
    batcher.start(run_batch, background=background, background_budget=0.02)
    image = torch.zeros(3, 2, 2)
    await asyncio.gather(*(batcher.submit("a", [image]) for _ in range(300)))  # 300 images waiting at once: load
    under_load = log[: len(log) - 1 - log[::-1].index("live")]  # up to the last live batch
    await batcher.stop()
    shadow = under_load.count("shadow")
    assert log.count("live") == 300 and shadow >= 10, log  # not blind under load...
    # ... within its budget (2% of engine time, give or take the one job that overdraws it) ...
    assert background.spent * shadow / max(log.count("shadow"), 1) <= 0.02 * engine[0] + 0.01
    # ... and a live image never waits behind two checks.
    assert "shadow, shadow" not in ", ".join(under_load)
