"""Micro-batching: concurrent requests become one engine batch, run on one worker thread.

Every queued image can share an engine call whatever its request's labels, templates or operating point: the key a
request is submitted under travels with each of its images, and the engine answers each row against its own key
(:meth:`lraee_core.engine.EarlyExitClassifier.classify_rows`). The queue is one line, oldest image first: a batch
takes up to ``max_batch_size`` of the oldest images, so nothing starves. An idle worker starts a batch at once with
what waits: a lone request pays no wait for company. Batches form where they pay, while the worker is busy: images
pile up behind the running batch and leave together, as the next batch, the moment it is free. ``max_wait_seconds``
(``LRAEE_MAX_BATCH_WAIT_MS``, default 0) is extra time an idle worker gives a batch to gather company: such a batch
runs when ``max_batch_size`` images wait or its oldest has waited that long; images that arrived while the worker was
busy never wait for it.

One worker thread runs every batch: torch already spreads one batch over the intra-op threads, and two batches at
once on two cores would only fight over them. Text encoding of new labels happens before a request is submitted,
elsewhere (app/text_worker.py), so the worker never waits for it. The queue is bounded in images; a request that
does not fit is refused whole (429) rather than partly admitted. Requests take their places with
:meth:`MicroBatcher.admit` before their images are decoded, so a full queue costs a refused request no decoding.

When no live image waits, the worker may run one small piece of background work (shadow checks, app/shadow.py);
live images that arrive meanwhile wait at most for that one piece. Under sustained load (images always waiting) it
still runs background work within a budget: each live batch earns ``background_budget`` times its engine time, and
one piece runs between two live batches while the earned time is positive (what it took is spent; at most
``BACKGROUND_CREDIT_CAP`` seconds are banked), so background work takes at most that share of engine time under load
and a live image waits at most for one piece. :meth:`MicroBatcher.stalled_seconds` tells
readiness how long the worker has been stuck on one call while images wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from .errors import QueueFull, ServiceUnavailable
from .threads import INFER_THREADS, worker_pool

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a request's images are submitted under (the engine's question for them: app.service.WorkKey in the service),
# and what the batch function answers for each image (app.service.RowResult).
KeyT = TypeVar("KeyT")
ResultT = TypeVar("ResultT")
KeyT_contra = TypeVar("KeyT_contra", contravariant=True)
ResultT_contra = TypeVar("ResultT_contra", contravariant=True)

# (each row's key, images [B, 3, H, W]) -> one result per image; blocking, on the worker thread.
RunBatch = Callable[[Sequence[KeyT], torch.Tensor], list[ResultT]]
# (each row's key, engine seconds, results) after each batch, for metrics.
BatchObserver = Callable[[Sequence[KeyT], float, Sequence[ResultT]], None]
DepthObserver = Callable[[int], None]
BACKGROUND_CREDIT_CAP = 1.0  # seconds of background work under load earned and not yet spent, at most


class BackgroundWork(Protocol[KeyT_contra, ResultT_contra]):
    """Work the worker does only when no live image waits (the shadow sampler)."""

    def offer(
        self, keys: Sequence[KeyT_contra], images: Sequence[torch.Tensor], results: Sequence[ResultT_contra]
    ) -> None:
        """See each finished live batch, with each row's key (on the event loop; must not block)."""

    def next_job(self) -> Callable[[], None] | None:
        """One short blocking job for the worker thread, or None when there is nothing to do."""


class Admission:
    """Places in the queue held for a request while its images are decoded; :meth:`MicroBatcher.submit` takes them
    over, :meth:`release` gives back what was not taken (idempotent)."""

    def __init__(self, batcher: MicroBatcher[Any, Any], count: int) -> None:
        self._batcher = batcher
        self.count = count  # places still held

    def release(self) -> None:
        """Give the places back (a failed decode, or the images have entered the queue)."""
        if self.count:
            self._batcher._reserved -= self.count
            self.count = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


@dataclass(frozen=True)
class BatchOutcome(Generic[ResultT]):
    """What one image got from the engine, with where its time went."""

    result: ResultT
    queue_seconds: float  # from admission to the start of its engine batch
    inference_seconds: float  # the whole engine batch it was part of
    batch_size: int  # images in that batch


@dataclass
class _Job(Generic[KeyT, ResultT]):
    key: KeyT  # the request's key, handed to the engine with the image
    image: torch.Tensor  # [3, H, W]
    future: asyncio.Future[BatchOutcome[ResultT]]
    admitted_at: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[KeyT, ResultT]):
    """Bounded queue of images, oldest first, drained by one consumer task onto one worker thread; each image
    travels with its request's key (``KeyT``), which the batch function receives row by row."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_seconds: float,
        capacity: int,
        threads: int,
    ) -> None:
        self._run_batch: RunBatch[KeyT, ResultT] | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.capacity = capacity
        self._on_batch: BatchObserver[KeyT, ResultT] | None = None
        self._on_depth: DepthObserver | None = None
        self._queue: deque[_Job[KeyT, ResultT]] = deque()
        self._depth = 0
        self._reserved = 0  # places held by admitted requests whose images are still being decoded
        self._background: BackgroundWork[KeyT, ResultT] | None = None
        self._background_budget = 0.0  # share of live engine time background work may take while images wait
        self._background_credit = 0.0  # seconds of background work earned under load and not yet spent
        self._loaded = False  # images were waiting when the last live batch finished (sustained load)
        self._busy_since: float | None = None  # perf_counter at the start of the worker call in progress
        # perf_counter at the end of the worker's last call: an image admitted before it came while the worker was busy
        self._free_since = -math.inf
        self._wakeup = asyncio.Event()
        self._closed = False
        self._consumer: asyncio.Task[None] | None = None
        self._batch_seconds = 0.05  # moving average of a batch's engine time, for Retry-After
        # torch's thread count is per thread under OpenMP, so the worker sets its own.
        self._executor = worker_pool(INFER_THREADS, workers=1, torch_threads=threads)

    @property
    def running(self) -> bool:
        """True while the consumer task drains the queue."""
        return not self._closed and self._consumer is not None and not self._consumer.done()

    @property
    def depth(self) -> int:
        """Images admitted and not yet handed to the engine."""
        return self._depth

    def stalled_seconds(self) -> float:
        """How long the worker has been on its current call while images wait (0 when idle or nothing waits)."""
        if self._busy_since is None or self._depth == 0:
            return 0.0
        return time.perf_counter() - self._busy_since

    async def run_in_worker(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on the inference worker thread (loading and warm-up use the serving thread)."""
        self._busy_since = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        finally:
            self._worker_free()

    def _worker_free(self) -> None:
        """The worker's call has ended (a batch, a background piece, loading or warm-up)."""
        self._busy_since = None
        self._free_since = time.perf_counter()

    def start(
        self,
        run_batch: RunBatch[KeyT, ResultT],
        background: BackgroundWork[KeyT, ResultT] | None = None,
        *,
        on_batch: BatchObserver[KeyT, ResultT] | None = None,
        on_depth: DepthObserver | None = None,
        background_budget: float = 0.0,
    ) -> None:
        """Start draining the queue into ``run_batch`` (a consumer task on the running loop); ``background`` gets
        the worker's idle time and ``background_budget`` of its engine time under load, ``on_batch`` sees each
        finished batch and ``on_depth`` each change of the depth."""
        self._on_batch, self._on_depth = on_batch, on_depth
        self._run_batch = run_batch
        self._background = background
        self._background_budget = background_budget
        if self._consumer is None:
            self._consumer = asyncio.get_running_loop().create_task(self._consume(), name="lraee-batcher")
            self._consumer.add_done_callback(self._consumer_done)

    def _consumer_done(self, task: asyncio.Task[None]) -> None:
        # Only a bug ends the consumer early; then nobody would answer the waiting requests, so fail them now
        # (readiness turns 503 at the same moment, since ``running`` is False).
        if not task.cancelled() and task.exception() is not None:
            log.error("the batch consumer died", exc_info=task.exception())
        self._fail_waiting("the inference worker has stopped")

    def _fail_waiting(self, reason: str) -> None:
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(ServiceUnavailable(reason))
        self._queue.clear()
        self._set_depth(0)

    async def stop(self) -> None:
        """Refuse new work, fail what waits with 503, let the running batch finish, stop the worker."""
        self._closed = True
        self._fail_waiting("the service is shutting down")
        self._wakeup.set()
        if self._consumer is not None:
            # Returns once the batch in flight, if any, has answered its requests (a crash was logged already).
            await asyncio.gather(self._consumer, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def retry_after(self) -> int:
        """Seconds until the current queue has probably drained (at least 1)."""
        batches = self._depth / self.max_batch_size + 1
        return max(1, min(60, math.ceil(batches * self._batch_seconds)))

    def admit(self, count: int) -> Admission:
        """Hold ``count`` places in the queue (all or none) for a request about to decode its images.

        Raises :class:`QueueFull` when they do not fit and :class:`ServiceUnavailable` when stopping.
        """
        if not self.running:
            raise ServiceUnavailable("the inference worker is not running")
        if self._depth + self._reserved + count > self.capacity:
            raise QueueFull(self.retry_after())
        self._reserved += count
        return Admission(self, count)

    async def submit(
        self, key: KeyT, images: Sequence[torch.Tensor], admission: Admission | None = None
    ) -> list[BatchOutcome[ResultT]]:
        """Queue ``images`` (all or none) under ``key`` (the engine's question for them) and wait for their
        results, in order.

        With ``admission`` (from :meth:`admit`, for these images) the places are already held; without, they are
        taken here. Raises :class:`QueueFull` when they do not fit and :class:`ServiceUnavailable` when stopping.
        If the caller is cancelled (client gone), images not yet running are withdrawn; a running batch finishes
        regardless.
        """
        if admission is None:
            admission = self.admit(len(images))
        elif not self.running:
            admission.release()
            raise ServiceUnavailable("the inference worker is not running")
        admission.release()  # the places pass from the reservation to the queue in the same step
        loop = asyncio.get_running_loop()
        jobs: list[_Job[KeyT, ResultT]] = [_Job(key=key, image=image, future=loop.create_future()) for image in images]
        self._queue.extend(jobs)
        self._set_depth(self._depth + len(jobs))
        self._wakeup.set()
        try:
            outcomes = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        except asyncio.CancelledError:
            self._withdraw(jobs)
            raise
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [outcome for outcome in outcomes if isinstance(outcome, BatchOutcome)]

    def _withdraw(self, jobs: list[_Job[KeyT, ResultT]]) -> None:
        leaving = {id(job) for job in jobs}
        kept = deque(job for job in self._queue if id(job) not in leaving)
        self._set_depth(self._depth - (len(self._queue) - len(kept)))
        self._queue = kept

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._on_depth is not None:
            self._on_depth(depth)

    async def _consume(self) -> None:
        while not self._closed:
            if not self._queue:
                self._loaded = False
                if await self._run_background() is not None:
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._loaded and self._background_credit > 0.0:  # sustained load: background work within its budget
                spent = await self._run_background()
                self._loaded = False  # at most one piece between two live batches
                if spent is not None:
                    self._background_credit -= spent
                    continue
            await self._let_batch_fill()
            jobs = self._take()
            if jobs:
                await self._execute(jobs)
                self._loaded = bool(self._queue)

    async def _run_background(self) -> float | None:
        """Run one background job on the worker if there is one: the seconds it took, None when there was none."""
        if self._background is None:
            return None
        try:
            job = self._background.next_job()
        except Exception:
            log.exception("background work failed to provide a job")
            return None
        if job is None:
            return None
        started = self._busy_since = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, job)
        except Exception:  # background work must never disturb the live queue
            log.exception("background job failed")
        finally:
            self._worker_free()
        return time.perf_counter() - started

    async def _let_batch_fill(self) -> None:
        """Give a batch that an idle worker starts ``max_wait_seconds`` to gather company: wait until a full batch
        waits or the oldest image has waited that long. Images that arrived while the worker was busy go at once."""
        if self._queue and self._queue[0].admitted_at < self._free_since:
            return
        while self._queue and len(self._queue) < self.max_batch_size:
            remaining = self._queue[0].admitted_at + self.max_wait_seconds - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Job[KeyT, ResultT]]:
        """The oldest images, up to a batch."""
        jobs = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        self._set_depth(self._depth - len(jobs))
        # Futures cancelled by a departed client are skipped here rather than computed for nobody.
        return [job for job in jobs if not job.future.done()]

    async def _execute(self, jobs: list[_Job[KeyT, ResultT]]) -> None:
        loop = asyncio.get_running_loop()
        keys = [job.key for job in jobs]
        images = [job.image for job in jobs]
        self._busy_since = time.perf_counter()
        try:
            started, seconds, results = await loop.run_in_executor(self._executor, self._timed_run, keys, images)
        except Exception as exc:
            log.exception("engine batch of %d images failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._worker_free()
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        if self._background_budget > 0.0:
            self._background_credit = min(
                BACKGROUND_CREDIT_CAP, self._background_credit + self._background_budget * seconds
            )
        if self._on_batch is not None:
            try:
                self._on_batch(keys, seconds, results)
            except Exception:  # observability must never cost a request its answer
                log.exception("batch observer failed")
        if self._background is not None:
            try:
                self._background.offer(keys, images, results)
            except Exception:
                log.exception("background work failed to take a batch")
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(
                    BatchOutcome(
                        result=result,
                        queue_seconds=max(0.0, started - job.admitted_at),
                        inference_seconds=seconds,
                        batch_size=len(jobs),
                    )
                )

    def _timed_run(self, keys: list[KeyT], images: list[torch.Tensor]) -> tuple[float, float, list[ResultT]]:
        assert self._run_batch is not None, "start() sets it before the first batch"
        started = time.perf_counter()
        results = self._run_batch(keys, torch.stack(images))  # [B, 3, H, W]
        if len(results) != len(images):
            raise RuntimeError(f"the engine returned {len(results)} results for {len(images)} images")
        return started, time.perf_counter() - started, results
