"""``POST /v1/embeddings`` and ``GET /v1/models`` through the real ``openai`` SDK (its async client on this app's
ASGI transport), and the raw shapes and limits."""

from __future__ import annotations

import base64
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi import FastAPI

from app.main import create_app
from lraee_core.images import load_image

from . import imagegen
from .conftest import running

CAPTIONS = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


@pytest.fixture
async def served(make_settings: Any, tiny_checkpoint: Path, second_checkpoint: Path) -> AsyncIterator[FastAPI]:
    app = create_app(make_settings(checkpoint=(tiny_checkpoint, second_checkpoint), max_embedding_inputs=4))
    async with app.router.lifespan_context(app):
        yield app


def sdk(app: FastAPI, api_key: str = "unused") -> openai.AsyncOpenAI:
    """The OpenAI SDK pointed at this app, in-process: its own HTTP client class on an ASGI transport of the HTTP
    library that class comes from (httpx for openai 1.x and 2.x, httpx2 for 3.x)."""
    library: Any = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key=api_key,
        http_client=openai.DefaultAsyncHttpxClient(transport=library.ASGITransport(app=app)),
        max_retries=0,
    )


@pytest.mark.anyio
async def test_the_openai_sdk_lists_models_and_embeds_texts_and_images(served: FastAPI) -> None:
    client = sdk(served)
    models = await client.models.list()
    assert [model.id for model in models.data] == ["untrained", "untrained-b"]
    assert (await client.models.retrieve("untrained-b")).id == "untrained-b"
    classifier = served.state.runtime.models.default.service.classifier
    width = classifier.backbone.shape.embed_dim

    texts = await client.embeddings.create(model="untrained", input=CAPTIONS)  # the SDK asks for base64
    vectors = np.array([item.embedding for item in texts.data], dtype=np.float32)
    assert (
        texts.model == "untrained" and vectors.shape == (3, width) and [item.index for item in texts.data] == [0, 1, 2]
    )
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = classifier.embed_texts(CAPTIONS).numpy()
    assert np.array_equal(vectors, expected)  # FP32 on the wire, bit for bit
    assert texts.usage.prompt_tokens == texts.usage.total_tokens > 3 * 2  # start and end token at least

    as_floats = await client.embeddings.create(model="untrained", input="a photo of a cat.", encoding_format="float")
    assert np.array_equal(np.array(as_floats.data[0].embedding, dtype=np.float32), expected[0])

    images = [imagegen.noise_png(seed) for seed in range(2)]
    by_modality = await client.embeddings.create(
        model="untrained-b", input=[data_uri(image) for image in images], extra_body={"modality": "image"}
    )
    by_data_uris = await client.embeddings.create(model="untrained-b", input=[data_uri(image) for image in images])
    assert by_modality.model == "untrained-b" and by_modality.usage.total_tokens == 0
    pixels = torch.stack([classifier.backbone.preprocess(load_image(image)) for image in images])
    reference = served.state.runtime.models.get("untrained-b").service.classifier.embed_images(pixels).numpy()
    for response in (by_modality, by_data_uris):
        got = np.array([item.embedding for item in response.data], dtype=np.float32)
        assert got.shape == (2, width) and np.allclose(got, reference, atol=1e-5)

    # The same space as /classify: the image ranks the captions as /classify at `full` ranks their labels.
    async with running_client(served) as http:
        answer = await http.post(
            "/classify",
            json={
                "image": base64.b64encode(images[0]).decode(),
                "labels": ["cat", "dog", "car"],
                "templates": ["a photo of a {}."],
                "operating_point": "full",
                "top_k": 3,
                "model": "untrained-b",
            },
        )
    order = [prediction["label"] for prediction in answer.json()["predictions"]]
    scores = reference[0] @ expected.T
    assert [["cat", "dog", "car"][index] for index in np.argsort(-scores)] == order


class running_client:
    """An httpx client on an app whose lifespan already runs."""

    def __init__(self, app: FastAPI) -> None:
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")

    async def __aenter__(self) -> httpx.AsyncClient:
        return self.client

    async def __aexit__(self, *_: object) -> None:
        await self.client.aclose()


@pytest.mark.anyio
async def test_the_sdk_sees_clear_errors(served: FastAPI) -> None:
    client = sdk(served)
    with pytest.raises(openai.NotFoundError, match="untrained-b"):
        await client.embeddings.create(model="gpt-4", input="a cat")
    with pytest.raises(openai.UnprocessableEntityError, match="cannot shorten"):
        await client.embeddings.create(model="untrained", input="a cat", dimensions=8)
    with pytest.raises(openai.UnprocessableEntityError, match="too many inputs"):
        await client.embeddings.create(model="untrained", input=["a cat"] * 5)
    with pytest.raises(openai.UnprocessableEntityError, match="token-id"):
        await client.embeddings.create(model="untrained", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="image_urls_disabled|LRAEE_IMAGE_URLS"):
        await client.embeddings.create(
            model="untrained", input=["http://127.0.0.1:9/cat.png"], extra_body={"modality": "image"}
        )


@pytest.mark.anyio
async def test_raw_requests_and_limits(make_settings: Any) -> None:
    app = create_app(make_settings(max_embedding_input_chars=20, queue_capacity=2, max_batch_images=2))
    async with running(app) as client:
        plain = await client.post("/v1/embeddings", json={"input": "a cat"})
        body = plain.json()
        assert plain.status_code == 200 and body["object"] == "list" and body["model"] == "untrained"
        assert body["data"][0]["object"] == "embedding" and isinstance(body["data"][0]["embedding"], list)
        width = dimensions = len(body["data"][0]["embedding"])
        same_width = await client.post("/v1/embeddings", json={"input": "a cat", "dimensions": dimensions})
        assert same_width.status_code == 200
        packed = await client.post("/v1/embeddings", json={"input": ["a cat"], "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), dtype="<f4")
        assert vector.shape == (width,) and np.allclose(vector, body["data"][0]["embedding"])
        mixed = [data_uri(imagegen.png()), "a cat"]  # not every input is an image: all are texts
        assert (await client.post("/v1/embeddings", json={"input": mixed[1:]})).status_code == 200
        for request, status, code in [
            ({"input": "x" * 21}, 422, "invalid_input"),
            ({"input": ""}, 422, "invalid_input"),
            ({"input": []}, 422, "invalid_input"),
            ({"input": "a", "encoding_format": "int8"}, 422, "validation_error"),
            ({"input": "a", "temperature": 1}, 422, "validation_error"),
            ({"input": [data_uri(imagegen.png())] * 3}, 422, "too_many_inputs"),  # images: at most the queue's 2
            ({"input": ["not base64!!"], "modality": "image"}, 400, "invalid_base64"),
            ({"input": [data_uri(b"not an image")], "modality": "image"}, 415, "invalid_image"),
        ]:
            response = await client.post("/v1/embeddings", json=request)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (request, response.text)
        metrics = (await client.get("/metrics")).text
        assert 'lraee_embedded_inputs_total{modality="text",model="untrained"} 4.0' in metrics
