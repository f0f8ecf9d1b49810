"""Admission of request bodies: bounded while they are read, and bounded all together in memory.

A pure ASGI middleware wraps ``receive`` of every request that may carry a body. It decides up front from the
headers (refuse a declared Content-Length over the route's limit; refuse when too many requests or too many bytes are
in flight) and then counts the bytes actually received, since a client may lie about or omit its Content-Length.
A refusal is raised from ``receive``, i.e. on the route's first read of the body: the app's error handlers answer it
in the one error shape and the request metrics attribute it to its route. Nothing is buffered before the decision:
uvicorn stops reading the socket while nobody calls ``receive``.

Refusals for load are 429 with ``Retry-After`` (the client may retry; the service is healthy), for size 413.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BadRequest, PayloadTooLarge, ServiceError

# Methods whose requests carry no body here: never counted, never refused (health probes must always answer).
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
RETRY_AFTER_SECONDS = 1  # bodies in flight are parsed in milliseconds and answered within a batch or two


class Overloaded(ServiceError):
    """Too many requests or body bytes in flight; retry after ``Retry-After`` seconds."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


Observer = Callable[[int], None]


class InFlight:
    """What request bodies hold right now: requests admitted and body bytes reserved (all on the event loop)."""

    def __init__(
        self,
        *,
        max_requests: int,
        max_bytes: int,
        on_requests: Observer | None = None,
        on_bytes: Observer | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._on_requests = on_requests
        self._on_bytes = on_bytes

    def enter(self) -> bool:
        """Admit one more request if there is room."""
        if self.requests >= self.max_requests:
            return False
        self._set_requests(self.requests + 1)
        return True

    def leave(self) -> None:
        """One admitted request is finished."""
        self._set_requests(self.requests - 1)

    def reserve(self, count: int) -> bool:
        """Reserve ``count`` body bytes if they fit."""
        if self.bytes + count > self.max_bytes:
            return False
        self._set_bytes(self.bytes + count)
        return True

    def release(self, count: int) -> None:
        """Give back ``count`` reserved bytes."""
        self._set_bytes(self.bytes - count)

    def _set_requests(self, value: int) -> None:
        self.requests = value
        if self._on_requests is not None:
            self._on_requests(value)

    def _set_bytes(self, value: int) -> None:
        self.bytes = value
        if self._on_bytes is not None:
            self._on_bytes(value)


class BodyLimitMiddleware:
    """Per-route body limits while reading, and the in-flight caps of :class:`InFlight`."""

    def __init__(self, app: ASGIApp, *, limits: Mapping[str, int], default_limit: int, in_flight: InFlight) -> None:
        self.app = app
        self.limits = dict(limits)  # path -> largest body in bytes
        self.default_limit = default_limit  # any other path that reads a body
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        refusal, declared = self._decide(Headers(scope=scope), limit)
        admitted = refusal is None
        reserved = declared if admitted else 0
        received = 0

        async def limited_receive() -> Message:
            nonlocal received, reserved
            if refusal is not None:
                raise refusal
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
                if received > reserved:  # no or a too small Content-Length: reserve as the bytes arrive
                    if not self.in_flight.reserve(received - reserved):
                        raise Overloaded("too many request bytes in flight; retry shortly")
                    reserved = received
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if admitted:
                self.in_flight.release(reserved)
                self.in_flight.leave()

    def _decide(self, headers: Headers, limit: int) -> tuple[ServiceError | None, int]:
        """The refusal due from the headers alone (None: admitted, counted and its declared bytes reserved)."""
        declared_header = headers.get("content-length")
        declared = 0
        if declared_header is not None:
            try:
                declared = int(declared_header)
            except ValueError:
                declared = -1
            if declared < 0:
                return BadRequest(f"invalid Content-Length {declared_header!r}"), 0
            if declared > limit:
                return PayloadTooLarge(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes"), 0
        if not self.in_flight.enter():
            return Overloaded(f"{self.in_flight.max_requests} requests are in flight; retry shortly"), 0
        if not self.in_flight.reserve(declared):
            self.in_flight.leave()
            return Overloaded("too many request bytes in flight; retry shortly"), 0
        return None, declared
