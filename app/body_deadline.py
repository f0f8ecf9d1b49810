"""A deadline on reading a request body: a minimum data rate after a grace period, counting only time spent waiting
for the client.

Why: from its headers on, a request holds an in-flight slot and its declared body bytes (app/limits.py). A client that
sent its headers and then trickled its body at a byte every two seconds held them for as long as it liked: 64 such
sockets took every slot of the service (issue 38). The rule follows ASP.NET Core's Kestrel (240 bytes/s after a 5 s
grace period), kept as an allowance of seconds rather than an average since the start, so that a burst early on buys
a bounded pause later, not an unbounded one:

- a body starts with ``grace`` seconds of allowance;
- every second spent waiting for the client (inside ``receive``) costs one second of it;
- every byte received earns ``1 / min_rate`` seconds, up to ``max_pause`` seconds in hand;
- when the allowance runs out: 408 and the connection closed (:class:`BodyTimeout`).

So a body arriving at ``min_rate`` or faster is never cut off; a slower one is cut off once it has fallen ``grace``
seconds behind; a body that kept pace may pause at most ``max_pause`` seconds; and no body takes longer than
``grace + length / min_rate`` seconds of waiting in all (the deadline scales with its length). Time the request
spends inside the service (parsing a chunk, waiting for a worker) costs nothing: the clock only runs while
``receive`` waits for the client.

A body that has used up half its grace is *behind*: admission may cut it off early to give its place to a newcomer
(:meth:`BodyPace.preempt`), so a full house of trickles cannot keep out requests that make progress.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from starlette.types import Message, Receive

from .errors import ServiceError

TimeoutReason = Literal["too_slow", "preempted"]
TIMEOUT_REASONS: tuple[TimeoutReason, ...] = ("too_slow", "preempted")


@dataclass(frozen=True)
class BodyRate:
    """The pace every request body must keep (``LRAEE_BODY_*``)."""

    min_rate: float  # bytes/s a body must average once its grace is spent
    grace: float  # seconds of waiting a body gets before it must keep pace
    max_pause: float  # the most seconds of allowance a body banks by sending ahead of pace (at least ``grace``)

    def __post_init__(self) -> None:
        if self.min_rate <= 0 or self.grace <= 0 or self.max_pause < self.grace:
            raise ValueError(f"a body rate needs min_rate > 0, grace > 0 and max_pause >= grace: {self}")


class BodyTimeout(ServiceError):
    """The request body arrived too slowly, or fell behind and lost its place; the connection is closed after it."""

    status = 408
    code = "request_timeout"

    def __init__(self, reason: TimeoutReason, rate: BodyRate) -> None:
        if reason == "preempted":
            message = f"the request body fell behind {rate.min_rate:g} bytes/s and its place went to another request"
        else:
            message = (
                f"the request body arrived slower than {rate.min_rate:g} bytes/s (after a {rate.grace:g} s grace); "
                "the server stopped waiting for it"
            )
        # Connection: close: the rest of the body is never read, so the connection cannot carry another request.
        super().__init__(message, headers={"Connection": "close"})
        self.reason = reason


class BodyPace:
    """How far one request body is ahead of the minimum rate, in seconds of waiting it may still do."""

    def __init__(self, rate: BodyRate) -> None:
        self.rate = rate
        self.allowance = rate.grace  # seconds the body may still wait for its client without another byte
        self.done = False  # the body is complete (or the client gone): nothing more is timed
        self.preempted = False
        self._timeout: asyncio.Timeout | None = None  # the wait in progress, if any
        self._waiting_since: float | None = None  # loop time the wait in progress began

    def left(self) -> float:
        """Seconds of allowance left now, the wait in progress counted."""
        if self._waiting_since is None:
            return self.allowance
        return self.allowance - (asyncio.get_running_loop().time() - self._waiting_since)

    @property
    def behind(self) -> bool:
        """Whether the body is still arriving and has used up more than half its grace: it may lose its place."""
        return not self.done and self.left() < self.rate.grace / 2

    def waited(self, seconds: float) -> None:
        """``seconds`` spent waiting for the client."""
        self.allowance -= seconds

    def received(self, count: int) -> None:
        """``count`` more body bytes arrived."""
        self.allowance = min(self.allowance + count / self.rate.min_rate, self.rate.max_pause)

    def preempt(self) -> None:
        """Cut the body off now (its place went to another request): the pending or next :meth:`receive` raises."""
        self.preempted = True
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def receive(self, receive: Receive) -> Message:
        """The next message of ``receive`` within the allowance; :class:`BodyTimeout` when it runs out or the body is
        preempted. Once the body is complete the clock stops: later calls (waiting for a disconnect) pass through."""
        if self.done:
            return await receive()
        if self.preempted:
            raise BodyTimeout("preempted", self.rate)
        loop = asyncio.get_running_loop()
        start = self._waiting_since = loop.time()
        try:
            async with asyncio.timeout_at(start + self.allowance) as self._timeout:
                message = await receive()
        except TimeoutError:
            raise BodyTimeout("preempted" if self.preempted else "too_slow", self.rate) from None
        finally:
            self._timeout = self._waiting_since = None
            self.waited(loop.time() - start)
        if self.preempted:  # preempted in the moment the message arrived: the place is gone all the same
            raise BodyTimeout("preempted", self.rate)
        if message["type"] == "http.request":
            self.received(len(message.get("body", b"")))
            self.done = not message.get("more_body", False)
        else:  # http.disconnect: the client is gone, nothing more to wait for
            self.done = True
        return message
