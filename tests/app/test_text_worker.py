"""The text worker alone: one job at a time on its own thread, a bounded queue, abandoned jobs, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.errors import ServiceUnavailable, TextQueueFull
from app.text_worker import TextWorker


@pytest.mark.anyio
async def test_jobs_run_in_order_on_one_thread_of_their_own() -> None:
    worker = TextWorker(capacity=4)
    ran: list[tuple[int, str]] = []

    def job(number: int) -> int:
        ran.append((number, threading.current_thread().name))
        return number * 10

    assert await asyncio.gather(*(worker.run(job, n) for n in range(3))) == [0, 10, 20]
    assert [number for number, _ in ran] == [0, 1, 2]
    assert {name.split("_")[0] for _, name in ran} == {"lraee-text"} and worker.pending == 0
    worker.close()


@pytest.mark.anyio
async def test_the_queue_is_bounded_and_abandoned_jobs_give_their_place_back() -> None:
    worker = TextWorker(capacity=2)
    entered, release = threading.Event(), threading.Event()

    def held() -> str:
        entered.set()
        assert release.wait(timeout=30)
        return "held"

    running = asyncio.create_task(worker.run(held))
    assert await asyncio.to_thread(entered.wait, 10)
    queued = asyncio.create_task(worker.run(lambda: "queued"))
    await asyncio.sleep(0)  # let it take its place
    assert worker.pending == 2
    with pytest.raises(TextQueueFull) as refused:
        await worker.run(lambda: "refused")
    assert refused.value.status == 429 and refused.value.headers is not None and "Retry-After" in refused.value.headers
    queued.cancel()  # its client left before the job started: the job is dropped and its place freed
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert worker.pending == 1
    assert not running.done()
    release.set()
    assert await running == "held"
    assert worker.pending == 0
    worker.close()
    with pytest.raises(ServiceUnavailable):
        await worker.run(lambda: "late")
