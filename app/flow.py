"""The request flow: every route that classifies hands its parsed request to :func:`classify`, which owns the steps
in order: validate -> fetch -> text -> admit -> decode -> batch -> respond. :func:`embed` is the same flow for
``/v1/embeddings``, with no label text to resolve.

Routes only parse (their content types and envelopes, app/payloads.py and the compatibility formats); limits, errors
and metrics cannot differ between them because the rest happens here, once:

1. **validate**: the model the request names, then the text side and options against the limits and that model's
   checkpoint (:meth:`ModelService.question`), before any image is fetched or decoded; nothing later checks them
   again;
2. **fetch**: images given by URL, when the service fetches URLs at all (app/fetch.py); before the text, so a URL
   that fails costs no encoding, and before admission, so a slow origin holds no place in the queue;
3. **text**: each label's embedding, from the cache at once or encoded on the text worker, never on the inference
   worker; a request whose labels must be encoded has its images' headers checked first, so a non-image does not
   cost an encoding;
4. **admit**: places in the inference queue before decoding, so a full queue refuses a request (429) without
   spending a decode on it;
5. **decode**: the images, off the event loop;
6. **batch**: the inference queue, which shares engine batches between requests whatever their label sets;
7. **respond**: one response per image.

A client that disconnects while its text is encoded or its images wait is dropped: its queued images are withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import torch
from starlette.requests import Request

from lraee_core.engine import ExitResult

from .errors import ClientClosedRequest, InvalidInput
from .fetch import ImageFetcher, ImageUrl
from .models import ServedModel, ServedModels
from .payloads import ParsedEmbeddings, ParsedRequest
from .schemas import ClassifyResponse, Timing
from .service import EmbeddingKey

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


async def _fetched(
    request: Request, fetcher: ImageFetcher, images: list[bytes | ImageUrl], *, batch: bool
) -> list[bytes]:
    """The request's image bytes, its URLs fetched (the common request, with none, costs no task)."""
    if not any(isinstance(image, ImageUrl) for image in images):
        return [image for image in images if isinstance(image, bytes)]
    return await until_disconnected(request, fetcher.fetch_all(images, batch=batch))


async def classify(
    request: Request, parsed: ParsedRequest, models: ServedModels, fetcher: ImageFetcher, *, batch: bool
) -> list[ClassifyResponse]:
    """A parsed classify request's results, one per image in order (see the module docstring for the steps).

    ``batch``: the request is a batch, so an image's error names its index.
    """
    model = models.get(parsed.options.model)
    service, batcher, decoder = model.service, model.batcher, model.decoder
    question = service.question(parsed.options)
    images = await _fetched(request, fetcher, parsed.images, batch=batch)
    key = service.cached_key(question)
    if key is None:
        await decoder.check(images, batch=batch)
        key = await until_disconnected(request, service.encoded_key(question))
    with batcher.admit(len(images)) as admission:
        decoded = await decoder.decode(images, batch=batch)
        tensors = [image.tensor for image in decoded]
        outcomes = await until_disconnected(request, batcher.submit(key, tensors, admission))
    responses = []
    for image, outcome in zip(decoded, outcomes, strict=True):
        result = outcome.result
        assert isinstance(result, ExitResult)  # a BatchKey's rows are classified
        timing = Timing(
            decode=image.seconds * 1000.0,
            queue=outcome.queue_seconds * 1000.0,
            inference=outcome.inference_seconds * 1000.0,
        )
        responses.append(service.response(result, question, timing))
    return responses


@dataclass(frozen=True)
class Embedded:
    """What an embeddings request got: unit vectors [N, E] float32 in input order, from ``model``."""

    model: ServedModel
    vectors: torch.Tensor  # [N, E]
    tokens: int  # text tokens read (start and end tokens included); 0 for images


async def embed(request: Request, parsed: ParsedEmbeddings, models: ServedModels, fetcher: ImageFetcher) -> Embedded:
    """A parsed ``/v1/embeddings`` request's vectors: texts on the model's text worker, images through the same
    steps as a classified image (fetch -> admit -> decode -> batch), sharing its engine batches."""
    model = models.get(parsed.model)
    dimensions = model.service.classifier.backbone.shape.embed_dim
    if parsed.dimensions is not None and parsed.dimensions != dimensions:
        raise InvalidInput(
            f"model {model.name!r} embeds in {dimensions} dimensions; it cannot shorten them to {parsed.dimensions}",
            code="unsupported_dimensions",
        )
    if parsed.texts is not None:
        vectors, counts = await until_disconnected(request, model.service.embed_texts(parsed.texts))
        model.metrics.observe_embedded("text", len(parsed.texts))
        return Embedded(model, vectors, sum(counts))
    assert parsed.images is not None
    images = await _fetched(request, fetcher, parsed.images, batch=True)
    with model.batcher.admit(len(images)) as admission:
        decoded = await model.decoder.decode(images, batch=True)
        outcomes = await until_disconnected(
            request, model.batcher.submit(EmbeddingKey(), [image.tensor for image in decoded], admission)
        )
    rows = []
    for outcome in outcomes:
        assert isinstance(outcome.result, torch.Tensor)  # an EmbeddingKey's rows are embedded
        rows.append(outcome.result)
    model.metrics.observe_embedded("image", len(rows))
    return Embedded(model, torch.stack(rows), 0)
