"""Admission of request bodies: bounded while they are read, and bounded all together in memory.

A pure ASGI middleware wraps ``receive`` of every request that may carry a body. It decides up front from the
headers (refuse a declared Content-Length over the route's limit; refuse when too many requests or too many bytes are
in flight) and then counts the bytes actually received, since a client may lie about or omit its Content-Length.
A refusal is raised from ``receive``, i.e. on the route's first read of the body: the app's error handlers answer it
in the one error shape and the request metrics attribute it to its route. Nothing is buffered before the decision:
uvicorn stops reading the socket while nobody calls ``receive``.

Refusals for load are 429 with ``Retry-After`` (the client may retry; the service is healthy), for size 413.

Slots and bytes are held only by requests that make progress (issue 38): each body must keep a minimum pace
(app/body_deadline.py) or is cut off with 408, its slot and bytes given back at once; and when a newcomer finds no
room, bodies that have fallen behind that pace give theirs up to it. An optional cap per client address bounds what one
machine may hold however fast it sends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .body_deadline import BodyPace, BodyRate, BodyTimeout, TimeoutReason
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


class Holder:
    """What one admitted request holds: a slot, its reserved body bytes; and how its body keeps pace."""

    __slots__ = ("client", "pace", "reserved")

    def __init__(self, reserved: int, pace: BodyPace | None, client: str | None) -> None:
        self.reserved = reserved  # body bytes reserved: the declared length, more if more arrived
        self.pace = pace  # None: no deadline on this body
        self.client = client  # the client's address when a per-client cap is on


class InFlight:
    """What request bodies hold right now: requests admitted and body bytes reserved (all on the event loop).

    ``enter``/``reserve`` and their inverses count; ``admit``/``grow``/``discharge`` do the same for one request's
    :class:`Holder` and may preempt bodies that fell behind their pace to make room.
    """

    def __init__(
        self,
        *,
        max_requests: int,
        max_bytes: int,
        max_per_client: int = 0,
        on_requests: Observer | None = None,
        on_bytes: Observer | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_per_client = max_per_client  # 0: no cap per client address
        self.requests = 0
        self.bytes = 0
        self._holders: set[Holder] = set()
        self._per_client: Counter[str] = Counter()
        self._on_requests = on_requests
        self._on_bytes = on_bytes

    def admit(self, declared: int, pace: BodyPace | None = None, client: str | None = None) -> Holder | Overloaded:
        """Admit a request declaring ``declared`` body bytes, preempting bodies that fell behind if that makes room;
        the refusal when it cannot be admitted."""
        if self.max_per_client and client is not None and self._per_client[client] >= self.max_per_client:
            return Overloaded(f"this client has {self.max_per_client} requests in flight; retry shortly")
        slots_short = self.requests + 1 - self.max_requests
        bytes_short = self.bytes + declared - self.max_bytes
        if not self._make_room(slots_short, bytes_short):
            if slots_short > 0:
                return Overloaded(f"{self.max_requests} requests are in flight; retry shortly")
            return Overloaded("too many request bytes in flight; retry shortly")
        self.enter()
        self.reserve(declared)
        holder = Holder(declared, pace, client if self.max_per_client else None)
        self._holders.add(holder)
        if holder.client is not None:
            self._per_client[holder.client] += 1
        return holder

    def grow(self, holder: Holder, count: int) -> bool:
        """Reserve ``count`` more bytes for an admitted request (its body outgrew its declared length)."""
        if holder not in self._holders or not self._make_room(0, self.bytes + count - self.max_bytes, sparing=holder):
            return False
        self.reserve(count)
        holder.reserved += count
        return True

    def discharge(self, holder: Holder) -> None:
        """Give back what ``holder`` holds (nothing if it was already given back, e.g. preempted)."""
        if holder not in self._holders:
            return
        self._holders.remove(holder)
        if holder.client is not None:
            self._per_client[holder.client] -= 1
            if not self._per_client[holder.client]:
                del self._per_client[holder.client]
        self.release(holder.reserved)
        self.leave()

    def _make_room(self, slots: int, count: int, *, sparing: Holder | None = None) -> bool:
        """Free ``slots`` slots and ``count`` bytes by preempting bodies that fell behind, the furthest behind first;
        preempt none unless that frees enough."""
        if slots <= 0 and count <= 0:
            return True
        laggards = sorted(
            (h for h in self._holders if h is not sparing and h.pace is not None and h.pace.behind),
            key=lambda h: h.pace.left() if h.pace is not None else 0.0,
        )
        chosen: list[Holder] = []
        for holder in laggards:
            if len(chosen) >= slots and sum(h.reserved for h in chosen) >= count:
                break
            chosen.append(holder)
        if len(chosen) < slots or sum(h.reserved for h in chosen) < count:
            return False
        for holder in chosen:
            self.discharge(holder)
            assert holder.pace is not None
            holder.pace.preempt()
        return True

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
    """Per-route body limits while reading, the in-flight caps of :class:`InFlight`, and the pace of each body."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: Mapping[str, int],
        default_limit: int,
        in_flight: InFlight,
        body_rate: BodyRate | None = None,
        on_timeout: Callable[[TimeoutReason], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = dict(limits)  # path -> largest body in bytes
        self.default_limit = default_limit  # any other path that reads a body
        self.in_flight = in_flight
        self.body_rate = body_rate  # None: no deadline on reading a body
        self.on_timeout = on_timeout  # told each body cut off, and why

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        pace = BodyPace(self.body_rate) if self.body_rate is not None else None
        client = scope.get("client")
        admission = self._decide(Headers(scope=scope), limit, pace, client[0] if client else None)
        holder = admission if isinstance(admission, Holder) else None
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if holder is None:
                assert isinstance(admission, ServiceError)
                raise admission
            try:
                message = await (pace.receive(receive) if pace is not None else receive())
            except BodyTimeout as timeout:
                self.in_flight.discharge(holder)  # at once, not when the 408 has been sent
                if self.on_timeout is not None:
                    self.on_timeout(timeout.reason)
                raise
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
                # No or a too small Content-Length: reserve as the bytes arrive.
                if received > holder.reserved and not self.in_flight.grow(holder, received - holder.reserved):
                    raise Overloaded("too many request bytes in flight; retry shortly")
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if holder is not None:
                self.in_flight.discharge(holder)

    def _decide(self, headers: Headers, limit: int, pace: BodyPace | None, client: str | None) -> Holder | ServiceError:
        """From the headers alone: the request's :class:`Holder` (admitted, counted, its declared bytes reserved), or
        the refusal due."""
        declared_header = headers.get("content-length")
        declared = 0
        if declared_header is not None:
            try:
                declared = int(declared_header)
            except ValueError:
                declared = -1
            if declared < 0:
                return BadRequest(f"invalid Content-Length {declared_header!r}")
            if declared > limit:
                return PayloadTooLarge(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
        return self.in_flight.admit(declared, pace, client)
