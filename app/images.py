"""Image decoding off the event loop: untrusted bytes -> ``lraee_core.images`` (the one decoder) -> the model's
input tensor, on a small thread pool. The decoder's refusals become the service's errors here (status by code)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image

from lraee_core.errors import ImageError
from lraee_core.images import check_image, load_image

from .errors import first_failure_or_results, image_error
from .threads import DECODE_THREADS, worker_pool


@dataclass(frozen=True)
class DecodedImage:
    """One image ready for the engine."""

    tensor: torch.Tensor  # [3, H, W], preprocessed for the backbone
    seconds: float  # decode + preprocess time


Preprocess = Callable[[Image.Image], Any]
T = TypeVar("T")


class ImageDecoder:
    """Decodes and preprocesses images on a small thread pool so the event loop never touches pixels."""

    def __init__(
        self, preprocess: Preprocess, *, max_pixels: int, workers: int = 2, pool: ThreadPoolExecutor | None = None
    ) -> None:
        self._preprocess = preprocess
        self._max_pixels = max_pixels
        self._owns_pool = pool is None
        # One torch thread per decode worker: the inference workers own the cores' intra-op parallelism.
        self._executor = pool or worker_pool(DECODE_THREADS, workers=workers, torch_threads=1)

    def with_preprocess(self, preprocess: Preprocess) -> ImageDecoder:
        """A decoder for another model's preprocessing on this one's pool (closing it leaves the pool to this one)."""
        return ImageDecoder(preprocess, max_pixels=self._max_pixels, pool=self._executor)

    def decode_one(self, data: bytes) -> DecodedImage:
        """Bytes -> preprocessed tensor (blocking; runs on the pool)."""
        start = time.perf_counter()
        try:
            image = load_image(data, max_pixels=self._max_pixels)
        except ImageError as exc:
            raise image_error(exc) from exc
        tensor = self._preprocess(image)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise TypeError(f"the backbone's preprocess returned {type(tensor).__name__}, expected a [3, H, W] tensor")
        return DecodedImage(tensor=tensor, seconds=time.perf_counter() - start)

    def check_one(self, data: bytes) -> None:
        """The decoder's header checks alone (format, pixel count; no pixel decoded; blocking, runs on the pool)."""
        try:
            check_image(data, max_pixels=self._max_pixels).close()
        except ImageError as exc:
            raise image_error(exc) from exc

    async def check(self, images: Sequence[bytes], *, batch: bool) -> None:
        """Refuse a request whose images are not images (or too large) before costlier work is spent on it, with the
        error :meth:`decode` would give; damaged pixels are only found by :meth:`decode`."""
        await self._each(self.check_one, images, batch=batch)

    async def decode(self, images: Sequence[bytes], *, batch: bool) -> list[DecodedImage]:
        """Decode all ``images`` concurrently; the first bad one (lowest index) fails the whole request.

        With ``batch`` the error names the image's index.
        """
        return await self._each(self.decode_one, images, batch=batch)

    async def _each(self, work: Callable[[bytes], T], images: Sequence[bytes], *, batch: bool) -> list[T]:
        """``work`` on every image concurrently on the pool; the first failure (lowest index) is raised."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, work, data) for data in images]
        return first_failure_or_results(await asyncio.gather(*futures, return_exceptions=True), batch=batch)

    def close(self) -> None:
        """Stop the pool if this decoder made it; queued decodes are dropped."""
        if self._owns_pool:
            self._executor.shutdown(wait=False, cancel_futures=True)
