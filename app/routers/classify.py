"""``POST /classify`` and ``POST /classify/batch``: JSON (base64 images) or multipart (files)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from ..batching import MicroBatcher
from ..deps import BatcherDep, DecoderDep, ServiceDep, SettingsDep
from ..errors import ClientClosedRequest
from ..images import ImageDecoder
from ..payloads import ParsedRequest, parse_classify_request
from ..schemas import (
    BatchJsonRequest,
    BatchResponse,
    ClassifyJsonRequest,
    ClassifyOptions,
    ClassifyResponse,
    Timing,
    error_responses,
)
from ..service import ModelService

router = APIRouter(tags=["classify"])

T = TypeVar("T")


def _request_body_doc(batch: bool) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (two content types on one route)."""
    options = ClassifyOptions.model_json_schema()["properties"]
    file = {"type": "string", "format": "binary"}
    form_properties = {
        **({"images": {"type": "array", "items": file}} if batch else {"image": file}),
        "labels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "repeat the field per label, or send one field holding a JSON list",
        },
        "templates": {
            "type": "array",
            "items": {"type": "string"},
            "description": "repeat the field per template, or one field holding a JSON list",
        },
        "top_k": options["top_k"],
        "operating_point": {"type": "string", "description": options["operating_point"]["description"]},
    }
    json_model = BatchJsonRequest if batch else ClassifyJsonRequest
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["images" if batch else "image", "labels"],
                        "properties": form_properties,
                    }
                },
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


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


async def run_classification(
    request: Request,
    parsed: ParsedRequest,
    service: ModelService,
    batcher: MicroBatcher,
    decoder: ImageDecoder,
    *,
    batch: bool,
) -> list[ClassifyResponse]:
    """The one path from a parsed request to its results: validation, decoding, the engine queue, the response.

    Every route that classifies (``/classify``, ``/classify/batch``, the compatibility formats) comes through here,
    so limits, errors and metrics cannot differ between them.
    """
    query = service.prepare(parsed.options)  # text-side errors before any pixel is decoded
    # Text embeddings before the inference queue: new labels are encoded on the text worker, never on the engine's.
    cached = service.with_cached_text(query)
    if cached is None:
        await decoder.check(parsed.images, batch=batch)  # a non-image is refused before its labels are encoded
    query = cached if cached is not None else await until_disconnected(request, service.resolve_text(query))
    # Places in the queue before decoding: a full queue refuses the request (429) without spending a decode on it.
    with batcher.admit(len(parsed.images)) as admission:
        decoded = await decoder.decode(parsed.images, batch=batch)
        outcomes = await until_disconnected(
            request, batcher.submit(query.key, [image.tensor for image in decoded], query.top_k, admission)
        )
    return [
        service.response(
            outcome.result,
            top_k=query.top_k,
            operating_point=query.key.operating_point,
            timing=Timing(
                decode=image.seconds * 1000.0,
                queue=outcome.queue_seconds * 1000.0,
                inference=outcome.inference_seconds * 1000.0,
            ),
        )
        for image, outcome in zip(decoded, outcomes, strict=True)
    ]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=_request_body_doc(batch=False),
    summary="Classify one image against a label set",
)
async def classify(
    request: Request, settings: SettingsDep, service: ServiceDep, batcher: BatcherDep, decoder: DecoderDep
) -> ClassifyResponse:
    """Zero-shot classification of one image with early exit.

    Send ``multipart/form-data`` (``image`` file, ``labels`` fields) or ``application/json`` (``image`` base64).
    """
    parsed = await parse_classify_request(request, settings, batch=False)
    results = await run_classification(request, parsed, service, batcher, decoder, batch=False)
    return results[0]


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra=_request_body_doc(batch=True),
    summary="Classify several images against one label set",
)
async def classify_batch(
    request: Request, settings: SettingsDep, service: ServiceDep, batcher: BatcherDep, decoder: DecoderDep
) -> BatchResponse:
    """Up to ``LRAEE_MAX_BATCH_IMAGES`` images sharing one label set; one result per image, in order.

    A bad image fails the whole request (4xx naming its index in ``error.details.index``) and nothing is run.
    """
    parsed = await parse_classify_request(request, settings, batch=True)
    return BatchResponse(results=await run_classification(request, parsed, service, batcher, decoder, batch=True))
