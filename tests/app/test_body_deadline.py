"""Slow bodies (issue 38): the pace a body must keep, and admission that bodies which fell behind cannot starve.

In-process, with timings in tenths of a second; tests/bench/test_slow_clients.py drives a real uvicorn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.types import Message, Receive

from app.body_deadline import BodyPace, BodyRate, BodyTimeout
from app.limits import BodyLimitMiddleware, InFlight
from app.main import create_app

from .test_limits import Reader, ignore, scope

RATE = BodyRate(min_rate=1000.0, grace=0.2, max_pause=0.4)


def stalled() -> Receive:
    """A client that sent its headers and then nothing."""

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


def whole(body: bytes) -> Receive:
    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def middleware(inner: Reader, in_flight: InFlight, timeouts: list[str] | None = None) -> BodyLimitMiddleware:
    return BodyLimitMiddleware(
        inner,
        limits={},
        default_limit=10_000,
        in_flight=in_flight,
        body_rate=RATE,
        on_timeout=None if timeouts is None else timeouts.append,
    )


def test_the_allowance_starts_at_the_grace_and_is_earned_back_by_bytes_up_to_the_pause() -> None:
    pace = BodyPace(RATE)
    assert pace.left() == pytest.approx(0.2) and not pace.behind
    pace.waited(0.15)
    assert pace.behind  # more than half the grace used
    pace.received(100)  # 0.1 s at 1000 bytes/s
    assert pace.left() == pytest.approx(0.15) and not pace.behind
    pace.received(10_000)
    assert pace.left() == pytest.approx(0.4)  # a burst buys at most max_pause
    for _ in range(100):  # exactly the minimum rate, for ever: never behind
        pace.waited(0.1)
        pace.received(100)
    assert pace.left() == pytest.approx(0.4)


def test_a_body_rate_needs_a_pause_that_covers_the_grace(make_settings: Any) -> None:
    with pytest.raises(ValueError, match="max_pause"):
        BodyRate(min_rate=240.0, grace=5.0, max_pause=1.0)
    with pytest.raises(ValidationError, match="LRAEE_BODY_MAX_PAUSE_SECONDS"):
        make_settings(body_grace_seconds=20.0)


@pytest.mark.anyio
async def test_a_stalled_body_times_out_after_its_grace() -> None:
    pace = BodyPace(RATE)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(BodyTimeout) as caught:
        await pace.receive(stalled())
    assert caught.value.status == 408 and caught.value.reason == "too_slow"
    assert caught.value.headers == {"Connection": "close"}
    assert 0.18 < loop.time() - start < 1.0


@pytest.mark.anyio
async def test_only_time_spent_waiting_for_the_client_counts() -> None:
    chunks = [b"x" * 10] * 5

    async def prompt() -> Message:
        return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}

    pace = BodyPace(RATE)
    while not pace.done:
        await pace.receive(prompt)
        await asyncio.sleep(0.1)  # the service busy with the chunk: 0.5 s in all, over twice the grace
    assert pace.left() > 0.15

    async def disconnect_later() -> Message:  # after the body: the route waits for a disconnect, untimed
        await asyncio.sleep(0.3)
        return {"type": "http.disconnect"}

    assert (await pace.receive(disconnect_later))["type"] == "http.disconnect"


@pytest.mark.anyio
async def test_a_stalled_body_is_cut_off_with_its_slot_and_bytes_given_back_at_once() -> None:
    in_flight, inner = InFlight(max_requests=2, max_bytes=1000), Reader()
    timeouts: list[str] = []
    task = asyncio.create_task(
        middleware(inner, in_flight, timeouts)(scope(**{"content-length": "500"}), stalled(), ignore)
    )
    await asyncio.sleep(0.05)
    assert in_flight.requests == 1 and in_flight.bytes == 500
    await task
    assert isinstance(inner.error, BodyTimeout) and inner.error.reason == "too_slow"
    assert timeouts == ["too_slow"] and in_flight.requests == 0 and in_flight.bytes == 0


@pytest.mark.anyio
async def test_a_newcomer_takes_the_place_of_a_body_that_fell_behind() -> None:
    in_flight = InFlight(max_requests=1, max_bytes=1000)
    timeouts: list[str] = []
    slow, fast = Reader(), Reader()
    task = asyncio.create_task(
        middleware(slow, in_flight, timeouts)(scope(**{"content-length": "5"}), stalled(), ignore)
    )
    await asyncio.sleep(0.02)  # the slow body is within the first half of its grace: it keeps its place
    early = Reader()
    await middleware(early, in_flight)(scope(**{"content-length": "5"}), whole(b"x" * 5), ignore)
    assert getattr(early.error, "status", None) == 429 and not task.done()
    await asyncio.sleep(0.12)  # now behind
    await middleware(fast, in_flight, timeouts)(scope(**{"content-length": "5"}), whole(b"x" * 5), ignore)
    assert fast.error is None and fast.read == 5
    await asyncio.wait_for(task, 0.05)  # cut off at once, not at the end of its grace
    assert isinstance(slow.error, BodyTimeout) and slow.error.reason == "preempted"
    assert timeouts == ["preempted"] and in_flight.requests == 0 and in_flight.bytes == 0


@pytest.mark.anyio
async def test_bytes_held_by_a_body_that_fell_behind_go_to_a_newcomer_only_if_that_makes_room() -> None:
    in_flight = InFlight(max_requests=8, max_bytes=1000)
    assert in_flight.reserve(300)  # held by someone who is keeping pace
    slow = Reader()
    task = asyncio.create_task(middleware(slow, in_flight)(scope(**{"content-length": "600"}), stalled(), ignore))
    await asyncio.sleep(0.12)
    too_big = Reader()  # needs 800 bytes: preempting the 600 would not make room, so nobody is preempted
    await middleware(too_big, in_flight)(scope(**{"content-length": "800"}), whole(b"x" * 800), ignore)
    assert getattr(too_big.error, "status", None) == 429 and not task.done() and in_flight.bytes == 900
    fits = Reader()  # needs 500: the 600 go
    await middleware(fits, in_flight)(scope(**{"content-length": "500"}), whole(b"x" * 500), ignore)
    assert fits.error is None and fits.read == 500
    await asyncio.wait_for(task, 0.05)
    assert isinstance(slow.error, BodyTimeout) and slow.error.reason == "preempted"
    assert in_flight.bytes == 300 and in_flight.requests == 0


@pytest.mark.anyio
async def test_a_per_client_cap_is_off_by_default_and_counts_client_addresses() -> None:
    uncapped = InFlight(max_requests=8, max_bytes=1000)
    assert all(not isinstance(uncapped.admit(1, client="10.0.0.1"), Exception) for _ in range(3))
    in_flight = InFlight(max_requests=8, max_bytes=1000, max_per_client=1)
    first = in_flight.admit(1, client="10.0.0.1")
    refused = in_flight.admit(1, client="10.0.0.1")
    assert getattr(refused, "status", None) == 429 and "this client" in str(refused)
    other = in_flight.admit(1, client="10.0.0.2")
    assert not isinstance(other, Exception) and not isinstance(first, Exception)
    in_flight.discharge(first)
    assert not isinstance(in_flight.admit(1, client="10.0.0.1"), Exception)


@pytest.mark.anyio
async def test_settings_wire_the_deadline_into_the_app(make_settings: Any) -> None:
    def body_limit(app: Any) -> BodyLimitMiddleware:
        layer = app.build_middleware_stack()
        while not isinstance(layer, BodyLimitMiddleware):
            layer = layer.app
        return layer

    wired = body_limit(create_app(make_settings(body_min_rate=100, body_grace_seconds=2, max_inflight_per_client=3)))
    assert wired.body_rate == BodyRate(min_rate=100.0, grace=2.0, max_pause=10.0)
    assert wired.in_flight.max_per_client == 3
    assert body_limit(create_app(make_settings(body_min_rate=0))).body_rate is None
    assert body_limit(create_app(make_settings())).body_rate == BodyRate(min_rate=240.0, grace=5.0, max_pause=10.0)
