"""The request flow: every route that classifies hands its parsed request to :func:`classify`, which owns the steps
in order: validate -> text -> admit -> decode -> batch -> respond.

Routes only parse (their content types and envelopes, app/payloads.py and the compatibility formats); limits, errors
and metrics cannot differ between them because the rest happens here, once:

1. **validate**: the text side and options against the limits and the checkpoint (:meth:`ModelService.question`),
   before any pixel is decoded; nothing later checks them again;
2. **text**: each label's embedding, from the cache at once or encoded on the text worker, never on the inference
   worker; a request whose labels must be encoded has its images' headers checked first, so a non-image does not
   cost an encoding;
3. **admit**: places in the inference queue before decoding, so a full queue refuses a request (429) without
   spending a decode on it;
4. **decode**: the images, off the event loop;
5. **batch**: the inference queue, which shares engine batches between requests whatever their label sets;
6. **respond**: one response per image.

A client that disconnects while its text is encoded or its images wait is dropped: its queued images are withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from .batching import MicroBatcher
from .errors import ClientClosedRequest
from .images import ImageDecoder
from .payloads import ParsedRequest
from .schemas import ClassifyResponse, Timing
from .service import BatchKey, ModelService

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client leaves first; then cancel it (its queued images are withdrawn)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task in done:
        return task.result()
    raise ClientClosedRequest("the client disconnected before its result was ready")


async def classify(
    request: Request,
    parsed: ParsedRequest,
    service: ModelService,
    batcher: MicroBatcher[BatchKey],
    decoder: ImageDecoder,
    *,
    batch: bool,
) -> list[ClassifyResponse]:
    """A parsed classify request's results, one per image in order (see the module docstring for the steps).

    ``batch``: the request is a batch, so an image's error names its index.
    """
    question = service.question(parsed.options)
    key = service.cached_key(question)
    if key is None:
        await decoder.check(parsed.images, batch=batch)
        key = await until_disconnected(request, service.encoded_key(question))
    with batcher.admit(len(parsed.images)) as admission:
        decoded = await decoder.decode(parsed.images, batch=batch)
        outcomes = await until_disconnected(
            request, batcher.submit(key, [image.tensor for image in decoded], admission)
        )
    return [
        service.response(
            outcome.result,
            question,
            Timing(
                decode=image.seconds * 1000.0,
                queue=outcome.queue_seconds * 1000.0,
                inference=outcome.inference_seconds * 1000.0,
            ),
        )
        for image, outcome in zip(decoded, outcomes, strict=True)
    ]
