"""Slow clients against a real uvicorn on loopback (issue 38): trickling bodies must not take the service down.

``python -m bench.slow_clients`` runs the issue's scenario at full size against the defaults of ``make serve`` (2-3
minutes, loading the model included) and writes ``bench/results/slow-clients-<time>.md``. Three phases, one server:

1. Trickles: 70 connections send the headers of a multipart ``/classify`` (``Content-Length: 100000``) and then its
   body at 1 byte every 2 s. From 30 s on, one normal ``/classify`` a second until 75 s. Done when every normal
   request answers 200 within 2 s and every trickling connection has been answered with a 4xx or closed within 75 s.
2. One slow ``/classify/batch`` that declares 60 MiB and trickles; meanwhile, every 0.5 s, a small ``/classify`` and
   one client sends big ones, one at a time (the 9 MiB JPEG of phase 3 at full speed: it needs bytes the batch
   reserved). Done when every request sent after the grace period (``LRAEE_BODY_GRACE_SECONDS``) answers 200.
3. A 9 MiB JPEG uploaded at a steady 1 MiB/s. Done when it answers 200.

No answer may be a 5xx. ``tests/bench/test_slow_clients.py`` runs the same scenario scaled down (a few slots,
tenths of seconds) on the tiny checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.settings import Settings
from bench.load import RESULTS, serve

MIB = 1024 * 1024
BOUNDARY = "slowclientsboundary"
LABELS = ("cat", "dog", "car")


@dataclass(frozen=True)
class Scenario:
    """Sizes and times of the three phases (the defaults: the issue's "Done when" at full size)."""

    tricklers: int = 70
    trickle_every: float = 2.0  # seconds between two bytes of a trickle
    trickle_declared: int = 100_000  # Content-Length of each trickled /classify
    normal_from: float = 30.0  # seconds after the trickles start
    normal_every: float = 1.0
    normal_within: float = 2.0  # each normal request must answer 200 within this many seconds
    answered_within: float = 75.0  # every trickle answered or closed by then; also the length of phase 1
    batch_declared: int = 60 * MIB  # Content-Length of the slow /classify/batch
    batch_phase: float = 10.0  # seconds of phase 2
    batch_requests_every: float = 0.5
    steady_bytes: int = 9 * MIB  # the JPEG of phase 3 (and the big request of phase 2)
    steady_rate: float = MIB  # bytes/s of phase 3
    server_env: dict[str, str] = field(default_factory=dict)  # LRAEE_* of the server; unset: the app's defaults

    @property
    def sample_at(self) -> float:
        """When phase 1 reads the requests in flight: the trickles are in, and nothing may preempt them yet."""
        return min(1.0, self.grace / 4)

    @property
    def grace(self) -> float:
        """The server's LRAEE_BODY_GRACE_SECONDS."""
        default = Settings.model_fields["body_grace_seconds"].default
        return float(self.server_env.get("LRAEE_BODY_GRACE_SECONDS", default))


@dataclass
class Outcome:
    """How one request ended."""

    kind: str  # trickle, normal, batch, big, small, steady
    sent_at: float  # seconds after its phase began
    status: int | None = None  # the answer's status; None: closed without one, or no answer at all
    closed: bool = False  # the server closed the connection (with or without an answer)
    seconds: float | None = None  # from sending to the answer (or the close); None: neither came

    @property
    def answered_at(self) -> float | None:
        """Seconds after its phase began at which it was answered or closed."""
        return None if self.seconds is None else self.sent_at + self.seconds


@dataclass
class Result:
    """Every outcome of a run, and what the server's metrics said after each phase."""

    scenario: Scenario
    trickles: list[Outcome]
    normals: list[Outcome]
    inflight_during_trickles: float  # lraee_inflight_requests at ``scenario.sample_at`` into phase 1
    batch: Outcome
    batch_phase: list[Outcome]  # the small and big requests beside the slow batch
    steady: Outcome
    metrics: dict[str, float]  # the lines of /metrics this scenario is about, at the end

    def checks(self) -> list[tuple[str, bool, str]]:
        """Each "Done when" item: (what, passed, measured)."""
        s = self.scenario
        late = [o for o in self.trickles if o.answered_at is None or o.answered_at > s.answered_within]
        trickle_states = Counter(describe(o) for o in self.trickles)
        slowest = max(o.seconds or float("inf") for o in self.normals) if self.normals else float("nan")
        normals_ok = bool(self.normals) and all(
            o.status == 200 and o.seconds is not None and o.seconds <= s.normal_within for o in self.normals
        )
        after_grace = [o for o in self.batch_phase if o.sent_at >= s.grace]
        first_big_200 = min((o.sent_at for o in self.batch_phase if o.kind == "big" and o.status == 200), default=None)
        everything = [*self.trickles, *self.normals, self.batch, *self.batch_phase, self.steady]
        server_errors = [o for o in everything if o.status is not None and o.status >= 500]
        return [
            (
                f"{len(self.normals)} normal requests from {s.normal_from:g} s on answer 200 within "
                f"{s.normal_within:g} s",
                normals_ok,
                f"statuses {dict(Counter(o.status for o in self.normals))}, slowest {slowest:.2f} s",
            ),
            (
                f"{s.tricklers} trickles answered with a 4xx or closed within {s.answered_within:g} s",
                not late and all(o.status is None or 400 <= o.status < 500 for o in self.trickles),
                f"{dict(trickle_states)}; last at {max((o.answered_at or float('inf')) for o in self.trickles):.1f} s",
            ),
            (
                f"a /classify/batch declaring {s.batch_declared / MIB:.3g} MiB keeps nobody out past the "
                f"{s.grace:g} s grace",
                bool(after_grace) and all(o.status == 200 for o in after_grace),
                f"batch: {describe(self.batch)} at {fmt(self.batch.answered_at)} s; after the grace: "
                f"{dict(Counter(f'{o.kind} {o.status}' for o in after_grace))}; before it: "
                f"{dict(Counter(f'{o.kind} {o.status}' for o in self.batch_phase if o.sent_at < s.grace))}; "
                f"first big 200 sent at {fmt(first_big_200)} s; slowest answer after the grace "
                f"{fmt(max((o.seconds or float('inf') for o in after_grace), default=None))} s",
            ),
            (
                f"a {s.steady_bytes / MIB:.3g} MiB JPEG at a steady {s.steady_rate / MIB:.3g} MiB/s succeeds",
                self.steady.status == 200,
                f"{describe(self.steady)} after {fmt(self.steady.seconds)} s",
            ),
            ("no 5xx", not server_errors, f"{len(server_errors)} answers with a 5xx"),
        ]

    def report(self) -> str:
        """The run as markdown."""
        s = self.scenario
        lines = [
            "| Done when | passed | measured |",
            "|---|---|---|",
            *(f"| {what} | {'yes' if passed else '**NO**'} | {measured} |" for what, passed, measured in self.checks()),
            "",
            f"- server: `uvicorn app.main:create_app --factory`, settings {s.server_env or 'the defaults'}",
            f"- requests in flight {s.sample_at:g} s into the trickles: {self.inflight_during_trickles:g}",
            *(f"- `{name}` {value:g}" for name, value in self.metrics.items()),
        ]
        return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def describe(outcome: Outcome) -> str:
    """``408``, ``429``, ``closed`` or ``open`` (neither answered nor closed)."""
    if outcome.status is not None:
        return str(outcome.status)
    return "closed" if outcome.closed else "open"


def multipart_head(field_name: str, filename: str) -> bytes:
    """A multipart body up to the start of its one file's bytes (the labels first)."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{label}\r\n' for label in LABELS]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    return "".join(parts).encode()


def multipart_body(image: bytes, field_name: str = "image") -> bytes:
    """A whole multipart body with one image."""
    return multipart_head(field_name, "image.jpg") + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def noise_jpeg(at_least: int, seed: int = 0) -> bytes:
    """A JPEG of uniform noise of at least ``at_least`` bytes (noise barely compresses: about 1.4 bytes a pixel)."""
    rng = np.random.default_rng(seed)
    side = max(16, int((at_least / 1.2) ** 0.5))
    while True:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(buffer, "JPEG", quality=95)
        if buffer.tell() >= at_least:
            return buffer.getvalue()
        side = int(side * 1.05) + 1


async def paced_post(
    base: str,
    path: str,
    body: bytes,
    *,
    kind: str,
    sent_at: float = 0.0,
    declared: int,
    chunk: int,
    every: float,
    give_up: float,
) -> Outcome:
    """POST ``path`` declaring ``declared`` bytes and sending them ``chunk`` bytes every ``every`` seconds (``body``,
    then zeros) until an answer comes, for at most ``give_up`` seconds."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    loop = asyncio.get_running_loop()
    start = loop.time()
    outcome = Outcome(kind, sent_at)
    answered = asyncio.Event()  # a status line came, or the connection closed

    async def answer() -> None:
        try:
            line = await reader.readline()
            outcome.seconds = loop.time() - start
            match = re.match(rb"HTTP/1\.[01] (\d{3})", line)
            if match:
                outcome.status = int(match.group(1))
                answered.set()
                while await reader.read(65536):  # the rest of the answer; then the server may close
                    pass
        except (ConnectionError, OSError):
            if outcome.seconds is None:
                outcome.seconds = loop.time() - start
        outcome.closed = True
        answered.set()

    async def until(at: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), max(0.0, min(at, start + give_up) - loop.time()))

    answering = asyncio.ensure_future(answer())
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {declared}\r\n\r\n".encode()
        )
        sent = 0
        while sent < declared and not answered.is_set() and loop.time() - start < give_up:
            piece = body[sent : sent + chunk]
            piece += bytes(min(chunk, declared - sent) - len(piece))
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
            await until(start + (sent // chunk) * every)
    except (ConnectionError, OSError):
        pass  # closed under the sender: an answer sent before the close is still read
    await until(start + give_up)
    await asyncio.wait({answering}, timeout=1.0)  # did the server close after answering?
    answering.cancel()
    writer.close()
    return outcome


async def timed(kind: str, sent_at: float, request: Awaitable[httpx.Response]) -> Outcome:
    """An httpx request's outcome."""
    start = time.monotonic()
    try:
        response = await request
    except httpx.TransportError:
        return Outcome(kind, sent_at, closed=True, seconds=time.monotonic() - start)
    return Outcome(kind, sent_at, status=response.status_code, seconds=time.monotonic() - start)


async def metric(client: httpx.AsyncClient, name: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def scheduled(
    start: float, times: list[float], make: Callable[[float], Awaitable[Outcome]]
) -> asyncio.Future[list[Outcome]]:
    """``make(t)`` started at each of ``times`` seconds after ``start`` (loop time), in the background; the future
    gathers their outcomes."""
    loop = asyncio.get_running_loop()

    async def run() -> list[Outcome]:
        tasks = []
        for at in times:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            tasks.append(asyncio.ensure_future(make(at)))
        return list(await asyncio.gather(*tasks))

    return asyncio.ensure_future(run())


def one_at_a_time(
    start: float, first: float, every: float, until: float, make: Callable[[float], Awaitable[Outcome]]
) -> asyncio.Future[list[Outcome]]:
    """One client: ``make(t)`` from ``first`` seconds after ``start`` on, each ``every`` seconds after the one before
    or as soon as it is answered, whichever is later, until ``until``; in the background."""
    loop = asyncio.get_running_loop()

    async def run() -> list[Outcome]:
        outcomes, at = [], first
        while at < until:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            outcomes.append(await make(loop.time() - start))
            at = max(at + every, loop.time() - start)
        return outcomes

    return asyncio.ensure_future(run())


def schedule(first: float, every: float, until: float) -> list[float]:
    """``first``, ``first + every``, ... below ``until``."""
    return [first + i * every for i in range(int((until - first) / every + 1e-9) + 1) if first + i * every < until]


async def drive(base: str, scenario: Scenario, image: bytes, big_image: bytes) -> Result:
    """All three phases against the server at ``base``."""
    s = scenario
    loop = asyncio.get_running_loop()
    small = multipart_body(image)
    big = multipart_body(big_image)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with httpx.AsyncClient(base_url=base, timeout=max(30.0, s.normal_within * 4)) as client:

        def post(kind: str, body: bytes) -> Callable[[float], Awaitable[Outcome]]:
            return lambda at: timed(kind, at, client.post("/classify", content=body, headers=headers))

        assert (await client.post("/classify", content=small, headers=headers)).status_code == 200  # warm

        def trickle(kind: str, path: str, declared: int, give_up: float) -> Callable[[float], Awaitable[Outcome]]:
            """A multipart body sent a byte every ``trickle_every`` seconds."""
            head = multipart_head("images" if path.endswith("/batch") else "image", "image.jpg")
            return lambda at: paced_post(
                base,
                path,
                head,
                kind=kind,
                sent_at=at,
                declared=declared,
                chunk=1,
                every=s.trickle_every,
                give_up=give_up,
            )

        # Phase 1: trickles, then normal requests.
        start = loop.time()
        trickles = scheduled(
            start, [0.0] * s.tricklers, trickle("trickle", "/classify", s.trickle_declared, s.answered_within + 5.0)
        )
        normals = scheduled(start, schedule(s.normal_from, s.normal_every, s.answered_within), post("normal", small))
        await asyncio.sleep(max(0.0, start + s.sample_at - loop.time()))
        inflight = await metric(client, "lraee_inflight_requests")
        trickled, normal = await trickles, await normals

        # Phase 2: a slow batch holding most of the byte budget; beside it from 0.2 s on, small requests every so often
        # and one client sending big ones (one at a time: together they would fill the byte budget themselves).
        start = loop.time()
        times = schedule(0.2, s.batch_requests_every, s.batch_phase)
        [batch], small_ones, big_ones = await asyncio.gather(
            scheduled(start, [0.0], trickle("batch", "/classify/batch", s.batch_declared, s.batch_phase + 5.0)),
            scheduled(start, times, post("small", small)),
            one_at_a_time(start, 0.2, s.batch_requests_every, s.batch_phase, post("big", big)),
        )

        # Phase 3: one big JPEG at a steady rate.
        chunk = max(1, int(s.steady_rate / 10))
        body = multipart_body(big_image)
        steady = await paced_post(
            base,
            "/classify",
            body,
            kind="steady",
            declared=len(body),
            chunk=chunk,
            every=chunk / s.steady_rate,
            give_up=len(body) / s.steady_rate + 30.0,
        )

        names = [
            'lraee_body_timeouts_total{reason="too_slow"}',
            'lraee_body_timeouts_total{reason="preempted"}',
            "lraee_inflight_requests",
            "lraee_inflight_bytes",
        ]
        text = (await client.get("/metrics")).text
        values = {name: 0.0 for name in names}
        statuses: Counter[str] = Counter()
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name in values:
                values[name] = float(value)
            found = re.match(r'lraee_requests_total\{route="(/classify[^"]*)",status="(\d+)"\}', name)
            if found and float(value):
                statuses[f'lraee_requests_total{{route="{found[1]}",status="{found[2]}"}}'] += int(float(value))
    return Result(
        scenario=s,
        trickles=trickled,
        normals=normal,
        inflight_during_trickles=inflight,
        batch=batch,
        batch_phase=small_ones + big_ones,
        steady=steady,
        metrics={**values, **{name: float(count) for name, count in sorted(statuses.items())}},
    )


def run(scenario: Scenario, checkpoint: Path | str | None = None, threads: int = 2) -> Result:
    """Start a server (the app's defaults, ``scenario.server_env`` over them) and drive the scenario against it."""
    env = {"LRAEE_THREADS": str(threads), **scenario.server_env}
    if checkpoint is not None:
        env["LRAEE_CHECKPOINT"] = str(checkpoint)
    image = noise_jpeg(2_000, seed=1)
    big_image = noise_jpeg(scenario.steady_bytes, seed=2)
    with serve(env) as (base, _):
        return asyncio.run(drive(base, scenario, image, big_image))


def main(argv: list[str] | None = None) -> int:
    """Command line: the full-size scenario; exit status 0 only when every check passed."""
    parser = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="LRAEE_CHECKPOINT (default: the embedded default)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    began = time.monotonic()
    result = run(Scenario(), args.checkpoint)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = (
        f"# python -m bench.slow_clients, {stamp}\n\n{os.cpu_count()} CPUs, load average at start {load[0]:.2f}; "
        f"{time.monotonic() - began:.0f} s in all.\n\n{result.report()}\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"slow-clients-{stamp}.md").write_text(text)
    print(text)
    return 0 if all(passed for _, passed, _ in result.checks()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
