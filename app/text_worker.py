"""The text worker: one thread that encodes new label prompts, so the inference worker never waits for them.

A request whose labels are all in the text cache never comes here: its embeddings are looked up on the event loop
and it joins the inference queue at once. A request with new labels waits here for its own encoding (one job at a
time, in arrival order), then joins the inference queue like any other. The queue is bounded in requests (a job can
be up to ``LRAEE_MAX_PROMPTS`` prompts); one that does not fit is refused with 429 and a Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .errors import ServiceUnavailable, TextQueueFull
from .threads import TEXT_THREADS, worker_pool

T = TypeVar("T")


class TextWorker:
    """A bounded queue of blocking text-encoding jobs in front of one thread of its own."""

    def __init__(self, *, capacity: int, threads: int = 1) -> None:
        self.capacity = capacity  # jobs queued or running before 429
        self._pending = 0  # jobs submitted and not finished (a job keeps its place while it runs, even if abandoned)
        self._lock = threading.Lock()  # the counter is released from the worker thread
        self._closed = False
        self._job_seconds = 1.0  # moving average of a job, for Retry-After
        # torch's thread count is per thread under OpenMP: the encoder keeps to its own few.
        self._executor = worker_pool(TEXT_THREADS, workers=1, torch_threads=threads)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def retry_after(self) -> int:
        """Seconds until the current queue has probably drained (1..60)."""
        return max(1, min(60, math.ceil(self._pending * self._job_seconds)))

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on the text thread and return its result.

        Raises :class:`TextQueueFull` (429) when ``capacity`` jobs are already queued or running and
        :class:`ServiceUnavailable` once closed. A caller that is cancelled leaves its job to finish if it has
        started (the embeddings land in the cache for the next request); a job not started yet is dropped.
        """
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the text encoder is shutting down")
            if self._pending >= self.capacity:
                raise TextQueueFull(self.retry_after())
            self._pending += 1
        try:
            future = self._executor.submit(self._timed, function, *args)
        except RuntimeError:  # shut down between the check and the submit
            self._release(None)
            raise ServiceUnavailable("the text encoder is shutting down") from None
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _timed(self, function: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - started)

    def _release(self, _: Future[Any] | None) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Refuse new jobs, drop queued ones, let the running one finish in the background."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
