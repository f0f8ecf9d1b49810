"""Bounded memory: bodies limited while they are read, requests and bytes in flight capped, admission before decode,
JSON off the event loop, hard bounds on every request field."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from app import payloads
from app.limits import BodyLimitMiddleware, InFlight
from app.main import create_app
from app.settings import MIB

from . import imagegen
from .conftest import LABELS, multipart, running

PNG = imagegen.png()


def scope(method: str = "POST", path: str = "/classify", **headers: str) -> Scope:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return {"type": "http", "method": method, "path": path, "headers": raw}


class Reader:
    """An inner ASGI app that reads its whole body, records what happened, then answers 200."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while True:
                message = await receive()
                self.read += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except Exception as exc:  # what the app's error handlers would turn into a response
            self.error = exc
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def body_of(*chunks: bytes) -> tuple[Receive, list[int]]:
    """An ASGI receive handing over ``chunks``; the list counts the calls that reached it."""
    calls: list[int] = []
    pending = list(chunks)

    async def receive() -> Message:
        calls.append(1)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    return receive, calls


async def ignore(_: Message) -> None:
    return None


def middleware(inner: Reader, *, limit: int = 100, max_requests: int = 4, max_bytes: int = 1000) -> Any:
    in_flight = InFlight(max_requests=max_requests, max_bytes=max_bytes)
    return BodyLimitMiddleware(inner, limits={"/classify": limit}, default_limit=10, in_flight=in_flight), in_flight


@pytest.mark.anyio
async def test_declared_length_over_the_limit_is_refused_before_any_byte_is_read() -> None:
    inner = Reader()
    app, in_flight = middleware(inner)
    receive, calls = body_of(b"x" * 200)
    await app(scope(**{"content-length": "200"}), receive, ignore)
    assert inner.error is not None and getattr(inner.error, "status", None) == 413
    assert calls == [] and in_flight.requests == 0 and in_flight.bytes == 0


@pytest.mark.anyio
async def test_streamed_bytes_are_counted_against_the_route_limit() -> None:
    inner = Reader()
    app, in_flight = middleware(inner)
    receive, calls = body_of(*[b"x" * 40] * 5)  # no Content-Length: 200 bytes in 40-byte chunks
    await app(scope(), receive, ignore)
    assert getattr(inner.error, "status", None) == 413
    assert len(calls) == 3 and inner.read == 80  # refused at the chunk that crossed 100 bytes
    assert in_flight.requests == 0 and in_flight.bytes == 0
    other = Reader()
    app, _ = middleware(other)
    await app(scope(path="/elsewhere"), body_of(b"x" * 11)[0], ignore)  # the default limit for other paths
    assert getattr(other.error, "status", None) == 413


@pytest.mark.anyio
async def test_requests_and_bytes_in_flight_are_capped_and_given_back() -> None:
    inner = Reader()
    app, in_flight = middleware(inner, max_requests=1, max_bytes=100)
    assert in_flight.enter()  # one request is in flight already
    await app(scope(**{"content-length": "5"}), body_of(b"x" * 5)[0], ignore)
    assert getattr(inner.error, "status", None) == 429 and inner.error.headers == {"Retry-After": "1"}  # type: ignore[union-attr]
    in_flight.leave()
    assert in_flight.reserve(90)  # 90 of 100 bytes are held by others
    for headers, chunks in (({"content-length": "20"}, [b"x" * 20]), ({}, [b"x" * 8, b"x" * 8])):
        inner = Reader()
        app, _ = BodyLimitMiddleware(inner, limits={}, default_limit=100, in_flight=in_flight), None
        await app(scope(**headers), body_of(*chunks)[0], ignore)
        assert getattr(inner.error, "status", None) == 429, headers
        assert in_flight.requests == 0 and in_flight.bytes == 90
    inner = Reader()
    await BodyLimitMiddleware(inner, limits={}, default_limit=100, in_flight=in_flight)(
        scope(**{"content-length": "10"}), body_of(b"x" * 10)[0], ignore
    )
    assert inner.error is None and inner.read == 10 and in_flight.bytes == 90


@pytest.mark.anyio
async def test_bodyless_requests_are_never_counted_or_refused() -> None:
    inner = Reader()
    app, in_flight = middleware(inner, max_requests=1)
    assert in_flight.enter()
    await app(scope(method="GET", path="/readyz"), body_of(b"")[0], ignore)
    assert inner.error is None and in_flight.requests == 1


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["abc", "-5"])
async def test_an_invalid_content_length_is_a_400(value: str) -> None:
    inner = Reader()
    app, in_flight = middleware(inner)
    await app(scope(**{"content-length": value}), body_of(b"x")[0], ignore)
    assert getattr(inner.error, "status", None) == 400 and in_flight.requests == 0


def test_the_in_flight_budget_must_hold_one_image(make_settings: Any) -> None:
    with pytest.raises(ValidationError, match="LRAEE_MAX_INFLIGHT_BYTES"):
        make_settings(max_inflight_bytes=2 * MIB)
    settings = make_settings(max_inflight_bytes=20 * MIB)
    assert settings.body_limit(32) == 20 * MIB  # a bigger body could never be admitted: 413, not 429 forever
    assert settings.body_limit(1) < 20 * MIB


@pytest.mark.anyio
async def test_app_refuses_over_budget_with_429_in_the_error_shape(make_settings: Any) -> None:
    app = create_app(make_settings(max_inflight_requests=1))
    async with running(app) as client:
        entered, release = threading.Event(), threading.Event()
        classifier = app.state.runtime.service.classifier
        classify = classifier.classify_rows

        def held(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            assert release.wait(timeout=60)
            return classify(*args, **kwargs)

        classifier.classify_rows = held
        try:
            first = asyncio.create_task(client.post("/classify", **multipart(PNG)))
            assert await asyncio.to_thread(entered.wait, 30)
            refused = await client.post("/classify", json={"image": base64.b64encode(PNG).decode(), "labels": LABELS})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            assert (await client.get("/readyz")).status_code == 200  # probes carry no body: never refused
            release.set()
            assert (await first).status_code == 200
        finally:
            release.set()
            del classifier.classify_rows
        metrics = (await client.get("/metrics")).text
        assert 'lraee_requests_total{route="/classify",status="429"} 1.0' in metrics
        assert "lraee_inflight_requests 0.0" in metrics and "lraee_inflight_bytes 0.0" in metrics


@pytest.mark.anyio
async def test_a_full_queue_refuses_before_decoding(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(make_settings(queue_capacity=2, max_batch_images=2))
    async with running(app) as client:
        runtime = app.state.runtime
        decoded: list[int] = []
        decode_one = runtime.decoder.decode_one

        def counting(data: bytes) -> Any:
            decoded.append(1)
            return decode_one(data)

        monkeypatch.setattr(runtime.decoder, "decode_one", counting)
        held = runtime.batcher.admit(2)  # another request holds every place while it decodes
        try:
            response = await client.post("/classify", **multipart(PNG))
        finally:
            held.release()
        assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        assert decoded == [] and runtime.batcher.depth == 0
        assert (await client.post("/classify", **multipart(PNG))).status_code == 200 and decoded == [1]


@pytest.mark.anyio
async def test_json_is_parsed_off_the_event_loop(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    parse = payloads._parse_json

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return parse(*args, **kwargs)

    monkeypatch.setattr(payloads, "_parse_json", recording)
    async with running(create_app(make_settings())) as client:
        loop_thread = threading.current_thread().name
        body = {"image": base64.b64encode(PNG).decode(), "labels": LABELS}
        assert (await client.post("/classify", json=body)).status_code == 200
    assert threads and threads[0] != loop_thread


@pytest.mark.anyio
async def test_multipart_is_streamed_not_read_whole(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_whole_body(*_: Any) -> bytearray:
        raise AssertionError("a multipart body must not be read into memory whole")

    monkeypatch.setattr(payloads, "read_body", no_whole_body)
    image = imagegen.noise_png(1, (700, 700))  # over starlette's 1 MiB spool: the file goes to disk and back
    assert len(image) > MIB
    async with running(create_app(make_settings())) as client:
        assert (await client.post("/classify", **multipart(image))).status_code == 200


def test_every_request_field_has_a_hard_bound(client: Any) -> None:
    image = base64.b64encode(PNG).decode()
    cases: dict[str, dict[str, Any]] = {
        "labels": {"labels": [f"l{i}" for i in range(10_001)]},
        "labels.0": {"labels": ["x" * 1001]},
        "templates": {"labels": LABELS, "templates": ["{}"] * 10_001},
        "operating_point": {"labels": LABELS, "operating_point": "x" * 101},
    }
    for field, body in cases.items():
        response = client.post("/classify", json={"image": image, **body})
        assert response.status_code == 422, field
        assert response.json()["error"]["code"] == "validation_error"
        assert response.json()["error"]["message"].startswith(field), response.json()["error"]["message"]
