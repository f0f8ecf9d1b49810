"""``POST /classify`` and ``POST /classify/batch``: JSON (base64 images) or multipart (files)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..deps import FetcherDep, ModelsDep, SettingsDep
from ..flow import classify as run_flow
from ..payloads import parse_classify_request
from ..schemas import (
    BatchJsonRequest,
    BatchResponse,
    ClassifyJsonRequest,
    ClassifyOptions,
    ClassifyResponse,
    error_responses,
)

router = APIRouter(tags=["classify"])


def _request_body_doc(batch: bool) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (two content types on one route)."""
    options = ClassifyOptions.model_json_schema()["properties"]
    file = {"type": "string", "format": "binary"}
    form_properties = {
        **(
            {"images": {"type": "array", "items": file}}
            if batch
            else {
                "image": file,
                "image_url": {"type": "string", "description": "instead of 'image': a URL to fetch it from"},
            }
        ),
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
        "model": {"type": "string", "description": options["model"]["description"]},
    }
    json_model = BatchJsonRequest if batch else ClassifyJsonRequest
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["images", "labels"] if batch else ["labels"],
                        "properties": form_properties,
                    }
                },
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503),
    openapi_extra=_request_body_doc(batch=False),
    summary="Classify one image against a label set",
)
async def classify(request: Request, settings: SettingsDep, models: ModelsDep, fetcher: FetcherDep) -> ClassifyResponse:
    """Zero-shot classification of one image with early exit.

    Send ``multipart/form-data`` (``image`` file, ``labels`` fields) or ``application/json`` (``image`` base64).
    """
    parsed = await parse_classify_request(request, settings, batch=False)
    results = await run_flow(request, parsed, models, fetcher, batch=False)
    return results[0]


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503),
    openapi_extra=_request_body_doc(batch=True),
    summary="Classify several images against one label set",
)
async def classify_batch(
    request: Request, settings: SettingsDep, models: ModelsDep, fetcher: FetcherDep
) -> BatchResponse:
    """Up to ``LRAEE_MAX_BATCH_IMAGES`` images sharing one label set; one result per image, in order.

    A bad image fails the whole request (4xx naming its index in ``error.details.index``) and nothing is run.
    """
    parsed = await parse_classify_request(request, settings, batch=True)
    return BatchResponse(results=await run_flow(request, parsed, models, fetcher, batch=True))
