"""``POST /v1/embeddings`` and ``GET /v1/models``, in OpenAI's shapes, for the clients people already have (the
``openai`` SDK, LangChain, LlamaIndex, litellm) pointed at ``<this service>/v1``.

Embeddings are the served backend's full-depth image and text embeddings (what ``/classify`` scores at ``full``),
L2-normalized, FP32 on the wire, in one space: an image's embedding ranks captions of it as ``/classify`` ranks
labels. Texts are embedded as given, no template (OpenAI semantics). Inputs are images when ``"modality": "image"``
is set (the SDK sends it through ``extra_body``) or when every input is a ``data:image/...`` URI.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from fastapi import APIRouter, Request

from ..deps import FetcherDep, ModelsDep, SettingsDep
from ..flow import embed
from ..payloads import JSON, parse_embeddings_request
from ..schemas import (
    EmbeddingOut,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    OpenAIModel,
    OpenAIModelList,
    error_responses,
    inline_schema,
)

router = APIRouter(tags=["embeddings"])


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """One embedding on the wire: FP32 numbers, or their little-endian bytes in base64 (what the SDK decodes)."""
    values = vector.detach().float().numpy().astype("<f4", copy=False)
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")
    return [float(value) for value in values]


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503),
    openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": inline_schema(EmbeddingsRequest)}}}},
    summary="Image and text embeddings (OpenAI's shape)",
)
async def embeddings(
    request: Request, settings: SettingsDep, models: ModelsDep, fetcher: FetcherDep
) -> EmbeddingsResponse:
    """``client.embeddings.create(model=..., input=[...])``; images with ``extra_body={"modality": "image"}`` (data:
    URIs, base64, or http(s) URLs when LRAEE_IMAGE_URLS is on), or data:image URIs alone.

    At most ``LRAEE_MAX_EMBEDDING_INPUTS`` inputs (images: also at most ``LRAEE_QUEUE_CAPACITY``), texts of at most
    ``LRAEE_MAX_EMBEDDING_INPUT_CHARS`` characters (CLIP reads the first 77 tokens). ``dimensions`` must equal the
    model's width when given.
    """
    parsed = await parse_embeddings_request(request, settings)
    embedded = await embed(request, parsed, models, fetcher)
    data = [
        EmbeddingOut(index=index, embedding=encode_vector(vector, parsed.encoding_format))
        for index, vector in enumerate(embedded.vectors.unbind(0))
    ]
    usage = EmbeddingsUsage(prompt_tokens=embedded.tokens, total_tokens=embedded.tokens)
    return EmbeddingsResponse(data=data, model=embedded.model.name, usage=usage)


@router.get("/v1/models", response_model=OpenAIModelList, responses=error_responses(401, 503), summary="Models")
async def openai_models(models: ModelsDep) -> OpenAIModelList:
    """The served models in OpenAI's list shape (``client.models.list()``), the default first."""
    return OpenAIModelList(data=[OpenAIModel(id=model.name, created=model.loaded_at) for model in models])


@router.get(
    "/v1/models/{model}", response_model=OpenAIModel, responses=error_responses(401, 404, 503), summary="One model"
)
async def openai_model(model: str, models: ModelsDep) -> OpenAIModel:
    """One served model (``client.models.retrieve(name)``); 404 listing the served ones for another name."""
    served = models.get(model)
    return OpenAIModel(id=served.name, created=served.loaded_at)
