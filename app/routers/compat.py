"""``POST /compat/huggingface``: the Hugging Face zero-shot-image-classification task format, for the clients people
already have (``huggingface_hub.InferenceClient``, ``@huggingface/inference``) pointed at this service's URL.

Only the envelope differs from ``/classify``: the body becomes the same :class:`ParsedRequest` and runs through
:func:`app.flow.classify`, so limits, errors (the one JSON error shape) and metrics are those of ``/classify``. The
answer is the task's list of ``{label, score}``, every label, highest first; the early-exit facts, which that list has
no room for, travel in ``X-LRAEE-*`` response headers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response

from ..deps import FetcherDep, ModelsDep, SettingsDep
from ..errors import InvalidInput, UnsupportedMediaType
from ..flow import classify as run_flow
from ..payloads import JSON, ParsedRequest, image_or_url, is_json, json_object, media_type, read_body, validate_model
from ..schemas import (
    ClassifyOptions,
    HuggingFaceInputs,
    HuggingFaceRequest,
    PredictionOut,
    error_responses,
    inline_schema,
)
from ..settings import Settings

router = APIRouter(tags=["compatibility"])

EXIT_LAYER_HEADER = "X-LRAEE-Exit-Layer"  # 1-based block that answered (num_layers: the full-depth path)
FLOPS_SAVED_HEADER = "X-LRAEE-FLOPs-Saved"  # fraction of full-depth FLOPs not spent, as in /classify's flops_saved
OPERATING_POINT_HEADER = "X-LRAEE-Operating-Point"  # the threshold set actually used


def _labels(value: list[str] | str) -> list[str]:
    """A label list; one string is the comma-separated form (blank items dropped, the rest validated as usual)."""
    if isinstance(value, str):
        return [item for item in value.split(",") if item.strip()]
    return value


def huggingface_options(body: HuggingFaceRequest, model: str | None = None) -> tuple[str, ClassifyOptions]:
    """The image (base64 or a URL) and the ``/classify`` options a Hugging Face task body asks for; ``model``:
    the one the URL's query names, if any.

    ``hypothesis_template`` becomes the request's single template; none means the checkpoint's default templates
    (the ones its operating points were calibrated with), exactly as on ``/classify``.
    """
    if body.inputs is None and body.image is None:
        raise InvalidInput("inputs (the image, base64) is required", code="validation_error")
    if body.inputs is not None and body.image is not None:
        raise InvalidInput("the image is given twice ('inputs' and 'image'); send it once", code="validation_error")
    inputs = body.inputs if body.inputs is not None else body.image
    assert inputs is not None
    parameters = body.parameters
    in_inputs = inputs.candidate_labels if isinstance(inputs, HuggingFaceInputs) else None
    if in_inputs is not None and parameters.candidate_labels is not None:
        raise InvalidInput(
            "candidate_labels given twice (in 'inputs' and in 'parameters'); send them once", code="validation_error"
        )
    candidate_labels = in_inputs if in_inputs is not None else parameters.candidate_labels
    if candidate_labels is None:
        raise InvalidInput("parameters.candidate_labels is required", code="invalid_labels")
    labels = _labels(candidate_labels)
    template = parameters.hypothesis_template
    # Validated as /classify's own options, so every bound on them applies here too (a 422, never a 500).
    options = validate_model(
        ClassifyOptions,
        {
            "labels": labels,
            "templates": [template] if template is not None else None,
            "top_k": max(len(labels), 1),  # the task answers every label; an empty set fails label validation
            "operating_point": parameters.operating_point,
            "model": _one_model(parameters.model, model),
        },
    )
    return (inputs.image if isinstance(inputs, HuggingFaceInputs) else inputs), options


def _one_model(in_body: str | None, in_query: str | None) -> str | None:
    if in_body is not None and in_query is not None and in_body != in_query:
        raise InvalidInput(
            f"two models named: {in_body!r} in parameters.model and {in_query!r} in ?model=; name one",
            code="validation_error",
        )
    return in_body if in_body is not None else in_query


def _parse_body(body: bytes | bytearray, settings: Settings, model: str | None) -> ParsedRequest:
    image, options = huggingface_options(validate_model(HuggingFaceRequest, json_object(body)), model)
    return ParsedRequest([image_or_url(image, settings.max_upload_bytes)], options)


async def parse_huggingface_request(request: Request, settings: Settings) -> ParsedRequest:
    """Read a Hugging Face task body (JSON, the size limit of a one-image ``/classify``) into a parsed request;
    ``?model=`` on the URL chooses the model (a client pointed at ``.../compat/huggingface?model=photos``)."""
    kind = media_type(request)
    if not is_json(kind):
        raise UnsupportedMediaType(
            f"content type {kind or '(none)'!r} is not supported; send {JSON} "
            '({"inputs": <base64 image>, "parameters": {"candidate_labels": [...]}})'
        )
    body = await read_body(request, settings.body_limit(1))
    # Parsed off the event loop, like /classify's JSON: megabytes of base64 must not hold up other requests.
    return await asyncio.to_thread(_parse_body, body, settings, request.query_params.get("model"))


_REQUEST_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": inline_schema(HuggingFaceRequest)}},
    }
}


@router.post(
    "/compat/huggingface",
    response_model=list[PredictionOut],
    responses={
        200: {
            "description": "Every label with its score, highest first; the exit facts in X-LRAEE-* headers",
            "headers": {
                EXIT_LAYER_HEADER: {"description": "1-based layer the answer came from", "schema": {"type": "integer"}},
                FLOPS_SAVED_HEADER: {"description": "fraction of full-depth FLOPs saved", "schema": {"type": "number"}},
                OPERATING_POINT_HEADER: {"description": "the operating point used", "schema": {"type": "string"}},
            },
        },
        **error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503),
    },
    openapi_extra=_REQUEST_BODY_DOC,
    summary="Zero-shot image classification in the Hugging Face inference task format",
)
async def huggingface(
    request: Request,
    response: Response,
    settings: SettingsDep,
    models: ModelsDep,
    fetcher: FetcherDep,
) -> list[PredictionOut]:
    """What ``InferenceClient(model="<this URL>").zero_shot_image_classification(image, candidate_labels=[...])``
    sends: ``{"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}``.

    Also accepted: ``inputs`` as ``{"image", "candidate_labels"}``, a top-level ``image``, labels as one
    comma-separated string, ``parameters.operating_point``, the model as ``parameters.model`` or ``?model=``, and
    the image as an http(s) URL (when LRAEE_IMAGE_URLS is on).
    """
    parsed = await parse_huggingface_request(request, settings)
    (result,) = await run_flow(request, parsed, models, fetcher, batch=False)
    response.headers[EXIT_LAYER_HEADER] = str(result.exit_layer)
    response.headers[FLOPS_SAVED_HEADER] = repr(result.flops_saved)
    response.headers[OPERATING_POINT_HEADER] = result.operating_point
    return result.predictions
