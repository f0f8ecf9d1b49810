"""Service-level throughput: the real app under uvicorn on loopback, driven by concurrent httpx clients.

The server is started as its own process (``uvicorn app.main:create_app --factory`` with ``LRAEE_CHECKPOINT``), on
127.0.0.1 and a free port, and always stopped again. Each concurrency level gets one untimed warm-up round and
``repeats`` timed rounds of a bounded number of requests, all posting the same image and label set; any failed
request is counted and makes the benchmark fail. The reference is the same engine in this process at the server's
maximum batch size, measured in the same run.

``python -m bench.service`` runs real traffic instead (:func:`run_varied_service`): 16 clients, each posting its own
label set of 2-20 labels, against plain open_clip FP32 in process at batch 32 on the same backbone, rounds of the two
interleaved; it writes ``bench/results/service-<time>.md`` with the command and what else was using the CPU.

``python -m bench.service --sequential`` compares batch waits instead (:func:`run_sequential_service`): two servers
alive at once, one with the old 5 ms wait for company and one with the default, and in each round, for each server in
turn, one client sending one request at a time (the load's image, 5 labels: the latency a lone user sees, and the
server's queue/decode/inference split) and then the real-traffic load (its requests/s); it writes
``bench/results/service-sequential-<time>.md``.

Every timed phase also records the server's CPU per request by thread group (:func:`cpu_ms_per_request`): the event
loop, image decoding, the text worker and inference, read from ``/proc/<pid>/task`` before and after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
from PIL import Image

from app.local_server import start_server
from app.threads import DECODE_THREADS, INFER_THREADS, TEXT_THREADS
from lraee_core.backends import BackendName
from lraee_core.engine import EarlyExitClassifier
from lraee_core.images import load_image
from lraee_core.paths import REPO_ROOT

from .timing import median, percentile, time_passes, timed_calls

CLASSIFY_PATH = "/classify"
DEFAULT_MAX_BATCH = 32  # the app's default LRAEE_MAX_BATCH_SIZE, used when its settings cannot be read
_ERROR_SAMPLES = 5


class ServiceSkipped(RuntimeError):
    """The service section cannot run here (the app is missing or does not start); the message says why."""


@dataclass
class ServiceLevel:
    """One concurrency level: medians over timed rounds."""

    concurrency: int  # clients sending at once
    requests_per_s: float  # median over rounds of requests / round seconds
    latency_p50_ms: float  # over every request of the timed rounds
    latency_p95_ms: float
    rounds_requests_per_s: list[float]  # each timed round
    requests: int  # requests in the timed rounds
    errors: int  # failed requests in warm-up and timed rounds
    server_cpu_cores: float  # server CPU seconds / wall seconds over the timed rounds (2.0 = both cores busy)
    client_cpu_cores: float  # the same for this process, which runs the clients
    server_timing_ms: dict[str, float]  # medians of the server's own per-request timing (decode, queue, inference)
    ratio_to_in_process: float = 0.0  # requests_per_s / in-process images/s at the server's max batch size
    # server CPU ms per request over the timed rounds by thread group (CPU_GROUPS); None: not measured (no /proc)
    server_cpu_ms_per_request: dict[str, float] | None = None


@dataclass
class ServiceResult:
    """The service section of one backbone."""

    transport: str  # "multipart" or "json"
    labels: int  # labels per request
    max_batch_size: int  # the server's engine batch size
    in_process_images_per_s: float  # the same engine in this process, batch = max_batch_size, median
    in_process_pass_s: list[float]
    levels: list[ServiceLevel]
    errors: int  # total failed requests
    error_samples: list[str] = field(default_factory=list)  # the first few failures, for the reader


def app_import_error() -> str | None:
    """Why ``from app.main import create_app`` fails here, or None when it works."""
    try:
        from app.main import create_app  # noqa: F401
    except Exception as exc:  # any import-time failure of a module another engineer is still writing
        return f"{type(exc).__name__}: {exc}"
    return None


def server_max_batch_size() -> int:
    """The app's ``max_batch_size`` setting as the server will read it from this environment."""
    try:
        from app.settings import Settings

        return int(Settings().max_batch_size)
    except Exception:  # settings module absent or unreadable: the documented default
        return DEFAULT_MAX_BATCH


def sample_image(size: tuple[int, int] = (320, 240)) -> bytes:
    """A deterministic JPEG (smooth colour gradient): decodes like a photo, identical in every run."""
    width, height = size
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height).unsqueeze(1).expand(height, width)
    pixels = torch.stack([x, y, (x + y) / 2], dim=-1).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _Server:
    """A uvicorn process of the app (logging warnings only); a context manager that always stops it."""

    def __init__(
        self, checkpoint: Path, threads: int, labels: int, log_path: Path, settings: Mapping[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        env = {
            **os.environ,
            "LRAEE_CHECKPOINT": str(checkpoint),
            "LRAEE_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "LRAEE_MAX_LABELS": str(max(1000, labels)),
            **(settings or {}),  # more LRAEE_* settings of this server
        }
        self._log = log_path.open("wb")
        self._server = start_server(env, options=("--log-level", "warning", "--no-access-log"), output=self._log)
        self.process = self._server.process
        self.base_url = self._server.base_url

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the server wrote."""
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
        self._log.close()


@dataclass(frozen=True)
class _Request:
    transport: str
    image: bytes
    labels: tuple[str, ...]

    async def send(self, client: httpx.AsyncClient) -> httpx.Response:
        if self.transport == "multipart":
            return await client.post(
                CLASSIFY_PATH, files={"image": ("bench.jpg", self.image, "image/jpeg")}, data={"labels": self.labels}
            )
        payload = {"image": base64.b64encode(self.image).decode("ascii"), "labels": list(self.labels)}
        return await client.post(CLASSIFY_PATH, json=payload)


async def _wait_ready(server: _Server, request: _Request, deadline: float) -> str:
    """Send classify requests until one succeeds; returns the transport that works. Raises ServiceSkipped."""
    transports = [request.transport, "json" if request.transport == "multipart" else "multipart"]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise ServiceSkipped(f"the server exited with code {server.process.returncode}:\n{server.log_tail()}")
            try:
                response = await request.send(client)
            except httpx.TransportError:
                await asyncio.sleep(0.5)
                continue
            if response.status_code == 200:
                return request.transport
            if response.status_code in (400, 415, 422) and len(transports) > 1:
                transports.pop(0)
                request = _Request(transports[0], request.image, request.labels)
                continue
            if response.status_code >= 500 or response.status_code in (429, 503):
                await asyncio.sleep(0.5)
                continue
            raise ServiceSkipped(f"POST {CLASSIFY_PATH} answers {response.status_code}: {response.text[:300]}")
    raise ServiceSkipped(f"the server did not answer a classify request in time:\n{server.log_tail()}")


def _stat_cpu_ticks(stat: str) -> int:
    """User + system CPU clock ticks from a ``/proc/.../stat`` line. Its second field, the name in parentheses, may
    hold spaces and parentheses itself: the fields are counted from the last ``)``."""
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is the state (field 3 of proc(5)): utime is 14, stime 15
    return int(fields[11]) + int(fields[12])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads, ended ones included) so far."""
    return _stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / os.sysconf("SC_CLK_TCK")


# ---- the server's CPU per request outside inference: its threads' CPU time, grouped by the OS thread name -------

PROC = Path("/proc")
EVENT_LOOP, DECODE, TEXT, INFERENCE, TOTAL = "event loop", "decode", "text", "inference", "total"
CPU_GROUPS = (EVENT_LOOP, DECODE, TEXT, INFERENCE, TOTAL)  # the columns of the CPU tables, in order
ThreadTicks = dict[int, tuple[str, int]]  # thread id -> (OS thread name, user + system clock ticks so far)


def thread_cpu_ticks(pid: int, proc: Path = PROC) -> ThreadTicks | None:
    """Every thread of process ``pid`` now, from ``<proc>/<pid>/task/<tid>/{comm,stat}``; None without /proc (not
    Linux): the split is then not measured."""
    tasks = proc / str(pid) / "task"
    if not tasks.is_dir():
        return None
    sample: ThreadTicks = {}
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().removesuffix("\n")
            ticks = _stat_cpu_ticks((task / "stat").read_text())
        except OSError:  # the thread ended between the listing and the reads
            continue
        sample[int(task.name)] = (name, ticks)
    return sample


def thread_group(pid: int, tid: int, name: str) -> str:
    """Which column a thread of the server's counts in: the main thread runs the event loop (HTTP parsing,
    multipart, validation, responses); the app names its pools (:mod:`app.threads`); every other thread is the
    inference worker or a runtime's pool it drives (ONNX Runtime's intra-op threads, torch's OpenMP team), so it
    counts as inference."""
    if tid == pid:
        return EVENT_LOOP
    if name.startswith(DECODE_THREADS):
        return DECODE
    if name.startswith(TEXT_THREADS):
        return TEXT
    return INFERENCE  # INFER_THREADS and the unnamed rest


def cpu_ms_per_request(
    pid: int, before: ThreadTicks | None, after: ThreadTicks | None, requests: int, ticks_per_s: float | None = None
) -> dict[str, float] | None:
    """CPU milliseconds per request of each group of :data:`CPU_GROUPS` (and their total) between two samples of
    process ``pid``; None when either sample is missing or no request ran. A thread in ``after`` only (started in
    between, or a new thread under a reused id: fewer ticks than before) counts from 0; one in ``before`` only
    (ended in between) counts nothing, as /proc no longer shows it."""
    if before is None or after is None or requests <= 0:
        return None
    ticks_per_s = ticks_per_s or os.sysconf("SC_CLK_TCK")
    ticks = dict.fromkeys(CPU_GROUPS, 0)
    for tid, (name, now) in after.items():
        earlier = before.get(tid, (name, 0))[1]
        ticks[thread_group(pid, tid, name)] += now - earlier if now >= earlier else now
    ticks[TOTAL] = sum(ticks.values())
    return {group: 1e3 * count / ticks_per_s / requests for group, count in ticks.items()}


def _append_split(rounds: list[dict[str, float]], pid: int, before: ThreadTicks | None, requests: int) -> None:
    """Append the CPU split of ``requests`` requests since ``before`` to ``rounds``, if it could be measured."""
    split = cpu_ms_per_request(pid, before, thread_cpu_ticks(pid), requests)
    if split is not None:
        rounds.append(split)


@dataclass
class _RoundLog:
    """What the requests of a level's timed rounds saw."""

    latencies: list[float] = field(default_factory=list)  # seconds per request
    server_timing: dict[str, list[float]] = field(default_factory=dict)  # the response's timing_ms, per field


async def _round(
    client: httpx.AsyncClient, requests: Sequence[_Request], count: int, errors: list[str], log: _RoundLog
) -> float:
    """``count`` requests shared among ``len(requests)`` concurrent clients, client i sending ``requests[i]`` over
    and over; returns the round's seconds."""
    remaining = count

    async def worker(request: _Request) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                response = await request.send(client)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            log.latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            for name, value in (response.json().get("timing_ms") or {}).items():
                log.server_timing.setdefault(name, []).append(float(value))

    started = time.perf_counter()
    await asyncio.gather(*(worker(request) for request in requests))
    return time.perf_counter() - started


async def _drive(
    server: _Server,
    request: _Request,
    concurrency_levels: Sequence[int],
    requests_per_round: int,
    repeats: int,
    deadline: float,
) -> tuple[str, list[ServiceLevel], list[str]]:
    transport = await _wait_ready(server, request, deadline)
    request = _Request(transport, request.image, request.labels)
    levels = []
    errors: list[str] = []
    for concurrency in concurrency_levels:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120.0, limits=limits) as client:
            before = len(errors)
            await _round(client, [request] * concurrency, concurrency, errors, _RoundLog())  # warm-up, untimed
            rates, log, wall = [], _RoundLog(), 0.0
            server_cpu, client_cpu = _cpu_seconds(server.process.pid), time.process_time()
            threads_before = thread_cpu_ticks(server.process.pid)
            for _ in range(repeats):
                if time.monotonic() > deadline:
                    errors.append(f"concurrency {concurrency}: section time limit reached before all rounds ran")
                    break
                seconds = await _round(client, [request] * concurrency, requests_per_round, errors, log)
                rates.append(requests_per_round / seconds)
                wall += seconds
            if not rates or not log.latencies:
                continue
            threads_after = thread_cpu_ticks(server.process.pid)
            levels.append(
                ServiceLevel(
                    concurrency=concurrency,
                    requests_per_s=median(rates),
                    latency_p50_ms=percentile(log.latencies, 50) * 1e3,
                    latency_p95_ms=percentile(log.latencies, 95) * 1e3,
                    rounds_requests_per_s=rates,
                    requests=len(log.latencies),
                    errors=len(errors) - before,
                    server_cpu_cores=(_cpu_seconds(server.process.pid) - server_cpu) / wall,
                    client_cpu_cores=(time.process_time() - client_cpu) / wall,
                    server_timing_ms={name: median(values) for name, values in log.server_timing.items()},
                    server_cpu_ms_per_request=cpu_ms_per_request(
                        server.process.pid, threads_before, threads_after, len(rates) * requests_per_round
                    ),
                )
            )
    return transport, levels, errors


def in_process_throughput(
    engine: EarlyExitClassifier, image: bytes, labels: Sequence[str], batch: int, *, warmup: int, repeats: int
) -> tuple[float, list[float]]:
    """Images/s of ``engine.classify`` on ``batch`` copies of ``image`` at the default operating point."""
    tensor = engine.backbone.preprocess(load_image(image))
    images = tensor.unsqueeze(0).repeat(batch, 1, 1, 1)
    times = time_passes(lambda: timed_calls([lambda: engine.classify(images, labels)]), warmup=warmup, repeats=repeats)
    return batch / times.median_pass, times.passes


def run_service(
    checkpoint: Path,
    engine: EarlyExitClassifier,
    labels: Sequence[str],
    *,
    threads: int,
    concurrency_levels: Sequence[int],
    requests_per_round: int,
    warmup: int,
    repeats: int,
    time_limit_s: float,
    log_path: Path,
    transport: str = "multipart",
) -> ServiceResult:
    """Start the app on ``checkpoint``, measure every concurrency level, stop it; raises ServiceSkipped.

    ``transport`` is tried first ("multipart" or "json"); the other is used if the server refuses it.
    """
    reason = app_import_error()
    if reason is not None:
        raise ServiceSkipped(f"`from app.main import create_app` fails ({reason})")
    image = sample_image()
    max_batch = server_max_batch_size()
    in_process, in_process_passes = in_process_throughput(
        engine, image, labels, max_batch, warmup=warmup, repeats=repeats
    )
    deadline = time.monotonic() + time_limit_s
    with _Server(checkpoint, threads, len(labels), log_path) as server:
        transport, levels, errors = asyncio.run(
            _drive(
                server,
                _Request(transport, image, tuple(labels)),
                concurrency_levels,
                requests_per_round,
                repeats,
                deadline,
            )
        )
    for level in levels:
        level.ratio_to_in_process = level.requests_per_s / in_process
    return ServiceResult(
        transport=transport,
        labels=len(labels),
        max_batch_size=max_batch,
        in_process_images_per_s=in_process,
        in_process_pass_s=in_process_passes,
        levels=levels,
        errors=len(errors),
        error_samples=errors[:_ERROR_SAMPLES],
    )


# ---- real traffic: every client its own label set, against plain open_clip FP32 in process ----------------------

# Label vocabulary of the varied-traffic rows: 8 x 12 = 96 two-word labels.
VOCABULARY = tuple(
    f"{adjective} {noun}"
    for adjective in ("red", "small", "old", "striped", "wooden", "shiny", "wet", "tiny")
    for noun in ("cat", "dog", "car", "tree", "boat", "house", "cup", "bird", "chair", "lamp", "shoe", "clock")
)
BASELINE_BATCH = 32  # plain open_clip's batch in the reference
BASELINE_LABELS = 10  # labels of the reference's zero-shot head


@dataclass
class VariedServiceResult:
    """The service under real traffic (each client its own labels) beside plain open_clip FP32 in process."""

    checkpoint: str
    clients: int
    labels_per_client: list[int]  # each client's label-set size (drawn from 2-20)
    server_threads: int  # LRAEE_THREADS of the server; the in-process reference uses as many torch threads
    requests_per_round: int
    service_requests_per_s: list[float]  # each timed round (one image per request)
    baseline_images_per_s: list[float]  # each timed round, measured just before the service round
    ratios: list[float]  # service / baseline of the same round
    engine_images_per_s: list[float]  # the service's own engine in process, batch 32, each timed round
    engine_ratios: list[float]  # service / engine of the same round (issue 41's target: >= 0.6 on the default)
    latency_p50_ms: float
    latency_p95_ms: float
    server_timing_ms: dict[str, float]  # medians of the responses' timing_ms
    mean_engine_batch: float  # images per engine batch over the timed rounds (from /metrics)
    server_cpu_cores: float  # server CPU seconds / wall seconds over the timed service rounds
    client_cpu_cores: float  # this process (the clients) over the same rounds
    model: dict[str, object]  # GET /model: quant mode, backbone
    backend: str  # what runs the server's blocks (LRAEE_BACKEND, "auto" resolved as the server resolves it)
    errors: int
    error_samples: list[str] = field(default_factory=list)
    server_cpu_ms: list[dict[str, float]] = field(default_factory=list)  # each timed round, CPU_GROUPS; [] not measured


def server_backend(checkpoint: Path) -> BackendName:
    """The backend the server will pick from this environment's ``LRAEE_BACKEND`` (default ``auto``), as its loader
    picks it."""
    from lraee_core.backends import resolve_backend
    from lraee_core.checkpoint import read_manifest

    return resolve_backend(os.environ.get("LRAEE_BACKEND", "auto"), read_manifest(checkpoint).quant_mode)


def client_label_sets(clients: int, low: int = 2, high: int = 20, seed: int = 0) -> list[tuple[str, ...]]:
    """One label set per client, ``low``-``high`` labels drawn from :data:`VOCABULARY` (seeded: the same each run)."""
    draw = random.Random(seed)
    return [tuple(draw.sample(VOCABULARY, draw.randint(low, high))) for _ in range(clients)]


def plain_open_clip_rate(checkpoint: Path, image: bytes, threads: int) -> Callable[[int], float]:
    """A pass of plain open_clip FP32 (``visual`` forward, cosine logits, softmax, top-5) at batch 32 on the
    checkpoint's own backbone: returns a function running ``batches`` batches and giving images/s."""
    from lraee_core.checkpoint import load_classifier

    from .baselines import tower_classifier

    torch.set_num_threads(threads)
    fp32 = load_classifier(checkpoint, quant_mode="none")
    text = fp32.text_embeddings(VOCABULARY[:BASELINE_LABELS])
    classify = tower_classifier(fp32.backbone.visual, text, fp32.backbone.logit_scale)
    tensor = fp32.backbone.preprocess(load_image(image))
    images = tensor.unsqueeze(0).repeat(BASELINE_BATCH, 1, 1, 1)  # [32, 3, H, W]
    return _batch_rate(lambda: classify(images))


def _batch_rate(run_batch: Callable[[], object]) -> Callable[[int], float]:
    """A function running ``batches`` calls of ``run_batch`` (one batch of :data:`BASELINE_BATCH` images each) and
    giving images/s."""

    def rate(batches: int) -> float:
        started = time.perf_counter()
        for _ in range(batches):
            run_batch()
        return batches * BASELINE_BATCH / (time.perf_counter() - started)

    return rate


def engine_rate(
    checkpoint: Path, image: bytes, label_sets: Sequence[tuple[str, ...]], threads: int
) -> Callable[[int], float]:
    """The service's own engine in process, as the server loads it (the checkpoint's quant mode on
    ``LRAEE_BACKEND``, ``threads`` intra-op threads), at batch 32 with each row asking the clients' label sets in
    turn at the default operating point (one ``classify_rows`` call, as the server's batches are): returns a function
    running ``batches`` batches and giving images/s. What issue 41 judges the service against."""
    from lraee_core.backends import BackendOptions
    from lraee_core.checkpoint import load_classifier

    torch.set_num_threads(threads)
    engine = load_classifier(
        checkpoint, backend=server_backend(checkpoint), backend_options=BackendOptions(threads=threads)
    )
    tensor = engine.backbone.preprocess(load_image(image))
    images = tensor.unsqueeze(0).repeat(BASELINE_BATCH, 1, 1, 1)  # [32, 3, H, W]
    queries = [engine.query(labels) for labels in label_sets]
    rows = [queries[row % len(queries)] for row in range(BASELINE_BATCH)]
    engine.classify_rows(images, rows)  # warm: the text cache and the sessions
    return _batch_rate(lambda: engine.classify_rows(images, rows))


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    """The value of a /metrics series ``name``, summed over its labels (one per served model, say)."""
    text = (await client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def run_varied_service(
    checkpoint: Path,
    *,
    clients: int = 16,
    threads: int = 2,
    requests_per_round: int = 320,
    baseline_batches: int = 8,
    warmup: int = 1,
    repeats: int = 5,
    time_limit_s: float = 900.0,
    log_path: Path,
) -> VariedServiceResult:
    """Start the app on ``checkpoint``; in each round, time plain open_clip FP32 in process at batch 32, then the
    service under ``clients`` concurrent clients each posting its own 2-20 labels (interleaved, so load drifting on
    a shared machine hits both alike). Raises ServiceSkipped."""
    reason = app_import_error()
    if reason is not None:
        raise ServiceSkipped(f"`from app.main import create_app` fails ({reason})")
    image = sample_image()
    label_sets = client_label_sets(clients)
    requests = [_Request("multipart", image, labels) for labels in label_sets]  # client i posts its own labels
    baseline = plain_open_clip_rate(checkpoint, image, threads)
    own_engine = engine_rate(checkpoint, image, label_sets, threads)
    deadline = time.monotonic() + time_limit_s
    errors: list[str] = []
    log = _RoundLog()
    service_rates: list[float] = []
    baseline_rates: list[float] = []
    engine_rates: list[float] = []
    server_cpu_ms: list[dict[str, float]] = []

    async def drive(server: _Server) -> tuple[dict[str, object], float, float, float]:
        await _wait_ready(server, _Request("multipart", image, label_sets[0]), deadline)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120.0, limits=limits) as client:
            model = (await client.get("/model")).json()
            await _round(client, requests, clients, errors, _RoundLog())  # every label set cached
            batches_before = await _metric(client, "lraee_batch_size_count")
            images_before = await _metric(client, "lraee_batch_size_sum")
            server_cpu, client_cpu, wall = 0.0, 0.0, 0.0
            for round_index in range(warmup + repeats):
                if time.monotonic() > deadline:
                    errors.append("time limit reached before all rounds ran")
                    break
                baseline_rate = baseline(baseline_batches)
                own_engine_rate = own_engine(baseline_batches)
                cpu_before, own_before = _cpu_seconds(server.process.pid), time.process_time()
                threads_before = thread_cpu_ticks(server.process.pid)
                round_log = log if round_index >= warmup else _RoundLog()
                seconds = await _round(client, requests, requests_per_round, errors, round_log)
                if round_index < warmup:
                    batches_before = await _metric(client, "lraee_batch_size_count")
                    images_before = await _metric(client, "lraee_batch_size_sum")
                    continue
                _append_split(server_cpu_ms, server.process.pid, threads_before, requests_per_round)
                server_cpu += _cpu_seconds(server.process.pid) - cpu_before
                client_cpu += time.process_time() - own_before
                wall += seconds
                baseline_rates.append(baseline_rate)
                engine_rates.append(own_engine_rate)
                service_rates.append(requests_per_round / seconds)
            batches = await _metric(client, "lraee_batch_size_count") - batches_before
            images = await _metric(client, "lraee_batch_size_sum") - images_before
        summary = {key: model.get(key) for key in ("model", "backbone", "quant_mode", "quantized_modules")}
        return summary, images / max(batches, 1.0), server_cpu / max(wall, 1e-9), client_cpu / max(wall, 1e-9)

    with _Server(checkpoint, threads, 20, log_path) as server:
        model, mean_batch, server_cores, client_cores = asyncio.run(drive(server))
    if not service_rates:
        raise ServiceSkipped(f"no timed round finished; errors: {errors[:_ERROR_SAMPLES]}")
    return VariedServiceResult(
        checkpoint=str(checkpoint),
        clients=clients,
        labels_per_client=[len(labels) for labels in label_sets],
        server_threads=threads,
        requests_per_round=requests_per_round,
        service_requests_per_s=service_rates,
        baseline_images_per_s=baseline_rates,
        ratios=[s / b for s, b in zip(service_rates, baseline_rates, strict=True)],
        engine_images_per_s=engine_rates,
        engine_ratios=[s / e for s, e in zip(service_rates, engine_rates, strict=True)],
        latency_p50_ms=percentile(log.latencies, 50) * 1e3,
        latency_p95_ms=percentile(log.latencies, 95) * 1e3,
        server_timing_ms={name: median(values) for name, values in log.server_timing.items()},
        mean_engine_batch=mean_batch,
        server_cpu_cores=server_cores,
        client_cpu_cores=client_cores,
        model=model,
        backend=server_backend(checkpoint),
        errors=len(errors),
        error_samples=errors[:_ERROR_SAMPLES],
        server_cpu_ms=server_cpu_ms,
    )


# ---- one request at a time: what a lone client waits, under the old batch wait and the default -----------------

OLD_BATCH_WAIT_MS = 5.0  # LRAEE_MAX_BATCH_WAIT_MS before issue 41: every batch, a lone request's too, waited this long
SEQUENTIAL_LABELS = VOCABULARY[:5]  # the one-at-a-time client's label set
SEQUENTIAL_WARMUP = 20  # untimed one-at-a-time requests per server before the first round


def default_batch_wait_ms() -> float:
    """The app's default ``max_batch_wait_ms`` (what a server started without the variable waits)."""
    from app.settings import Settings

    return float(Settings.model_fields["max_batch_wait_ms"].default)


@dataclass
class WaitSide:
    """One server of the comparison, started with one batch wait: what it gave over the timed rounds."""

    batch_wait_ms: float  # its LRAEE_MAX_BATCH_WAIT_MS
    sequential_ms: list[float] = field(default_factory=list)  # every timed one-at-a-time request, client side
    round_p50_ms: list[float] = field(default_factory=list)  # each round's client p50 of those
    server_timing_ms: dict[str, list[float]] = field(default_factory=dict)  # their answers' timing_ms, per field
    load_requests_per_s: list[float] = field(default_factory=list)  # each round's throughput under the load
    load_batches: float = 0.0  # engine batches of the timed load rounds (from /metrics)
    load_images: float = 0.0  # images in those batches
    # server CPU ms per request by thread group (CPU_GROUPS), each timed round; [] where not measured (no /proc)
    sequential_cpu_ms: list[dict[str, float]] = field(default_factory=list)  # of the one-at-a-time requests
    load_cpu_ms: list[dict[str, float]] = field(default_factory=list)  # of the load


@dataclass
class SequentialResult:
    """Before vs after from one run: one server per batch wait, alive at once, rounds interleaved."""

    checkpoint: str
    server_threads: int
    labels: int  # of the one-at-a-time requests
    requests_per_round: int  # one-at-a-time requests per server per round
    load_clients: int
    load_requests_per_round: int  # 0: no load rounds
    sides: list[WaitSide]  # the first is the reference the others are compared with
    model: dict[str, object]  # GET /model: quant mode, backbone
    backend: str
    errors: int
    error_samples: list[str] = field(default_factory=list)


async def _settle(pids: Sequence[int], window_s: float = 0.3, busy_s: float = 0.02, timeout_s: float = 15.0) -> None:
    """Wait until the processes ``pids`` are quiet (none used over ``busy_s`` CPU seconds in ``window_s``), at most
    ``timeout_s``: one server's leftover background work (shadow checks) must not run during another's turn."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = [_cpu_seconds(pid) for pid in pids]
        await asyncio.sleep(window_s)
        if all(_cpu_seconds(pid) - used <= busy_s for pid, used in zip(pids, before, strict=True)):
            return


def run_sequential_service(
    checkpoint: Path,
    *,
    waits_ms: Sequence[float] | None = None,
    requests_per_round: int = 200,
    clients: int = 16,
    load_requests_per_round: int = 320,
    threads: int = 2,
    repeats: int = 5,
    time_limit_s: float = 1800.0,
    log_dir: Path,
) -> SequentialResult:
    """Start one server per batch wait in ``waits_ms`` (default: the old 5 ms, then the app's default), all alive at
    once. In each of ``repeats`` rounds, each server in turn (the order alternating between rounds, the servers let
    settle before each turn) gets ``requests_per_round`` requests from one client, one at a time (the load's image,
    :data:`SEQUENTIAL_LABELS`), then ``load_requests_per_round`` from ``clients`` concurrent clients each posting its
    own label set (0: no load). Raises ServiceSkipped."""
    reason = app_import_error()
    if reason is not None:
        raise ServiceSkipped(f"`from app.main import create_app` fails ({reason})")
    waits = list(waits_ms) if waits_ms is not None else [OLD_BATCH_WAIT_MS, default_batch_wait_ms()]
    image = sample_image()
    lone = _Request("multipart", image, SEQUENTIAL_LABELS)
    load = [_Request("multipart", image, labels) for labels in client_label_sets(clients)]
    sides = [WaitSide(wait) for wait in waits]
    errors: list[str] = []
    deadline = time.monotonic() + time_limit_s

    async def turn(client: httpx.AsyncClient, side: WaitSide, pid: int) -> None:
        log = _RoundLog()
        threads_before = thread_cpu_ticks(pid)
        await _round(client, [lone], requests_per_round, errors, log)
        _append_split(side.sequential_cpu_ms, pid, threads_before, requests_per_round)
        side.sequential_ms += [seconds * 1e3 for seconds in log.latencies]
        side.round_p50_ms.append(percentile(log.latencies, 50) * 1e3)
        for name, values in log.server_timing.items():
            side.server_timing_ms.setdefault(name, []).extend(values)
        if load_requests_per_round:
            batches = await _metric(client, "lraee_batch_size_count")
            images = await _metric(client, "lraee_batch_size_sum")
            threads_before = thread_cpu_ticks(pid)
            seconds = await _round(client, load, load_requests_per_round, errors, _RoundLog())
            _append_split(side.load_cpu_ms, pid, threads_before, load_requests_per_round)
            side.load_requests_per_s.append(load_requests_per_round / seconds)
            side.load_batches += await _metric(client, "lraee_batch_size_count") - batches
            side.load_images += await _metric(client, "lraee_batch_size_sum") - images

    async def drive(servers: list[_Server]) -> dict[str, object]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with contextlib.AsyncExitStack() as stack:
            http = []
            for server in servers:
                await _wait_ready(server, lone, deadline)
                client = httpx.AsyncClient(base_url=server.base_url, timeout=120.0, limits=limits)
                http.append(await stack.enter_async_context(client))
                await _round(client, [lone], SEQUENTIAL_WARMUP, errors, _RoundLog())  # untimed warm-up
                await _round(client, load, clients, errors, _RoundLog())  # every label set cached
            model = (await http[0].get("/model")).json()
            pids = [server.process.pid for server in servers]
            order = list(range(len(servers)))
            for round_index in range(repeats):
                if time.monotonic() > deadline:
                    errors.append("time limit reached before all rounds ran")
                    break
                for index in order if round_index % 2 == 0 else order[::-1]:
                    await _settle(pids)
                    await turn(http[index], sides[index], pids[index])
        return {key: model.get(key) for key in ("model", "backbone", "quant_mode", "quantized_modules")}

    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                _Server(
                    checkpoint,
                    threads,
                    len(VOCABULARY),
                    log_dir / f"server-wait-{wait:g}ms.log",
                    {"LRAEE_MAX_BATCH_WAIT_MS": f"{wait:g}"},
                )
            )
            for wait in waits
        ]
        model = asyncio.run(drive(servers))
    if not all(side.sequential_ms for side in sides):
        raise ServiceSkipped(f"no timed round finished; errors: {errors[:_ERROR_SAMPLES]}")
    return SequentialResult(
        checkpoint=str(checkpoint),
        server_threads=threads,
        labels=len(SEQUENTIAL_LABELS),
        requests_per_round=requests_per_round,
        load_clients=clients,
        load_requests_per_round=load_requests_per_round,
        sides=sides,
        model=model,
        backend=server_backend(checkpoint),
        errors=len(errors),
        error_samples=errors[:_ERROR_SAMPLES],
    )


def cpu_split_table(first_column: str, rows: Sequence[tuple[str, Sequence[dict[str, float]]]]) -> list[str]:
    """Markdown table of server CPU ms per request, one row per ``(label, rounds)``: each group's median [min-max]
    over the rounds, "not measured" for a row without rounds (:func:`cpu_split_note` says what the columns mean)."""
    lines = [f"| {first_column} | " + " | ".join(CPU_GROUPS) + " |", "|---|" + "---:|" * len(CPU_GROUPS)]
    for label, rounds in rows:
        cells = [_spread([split[group] for split in rounds], 2) if rounds else "not measured" for group in CPU_GROUPS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def cpu_split_note() -> str:
    """What the columns of :func:`cpu_split_table` mean, for the record."""
    resolution = 1e3 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 10.0
    return (
        "Server CPU ms per request (user + system, from `/proc/<pid>/task/<tid>/stat`, sampled just before and after "
        "each round's requests), median [min-max] over rounds: *event loop* = the main thread (HTTP and multipart "
        f"parsing, validation, responses); *decode* = `{DECODE_THREADS}*`; *text* = `{TEXT_THREADS}*` (new labels' "
        f"encoding); *inference* = `{INFER_THREADS}*` and every other thread, which are the runtimes' pools (ONNX "
        "Runtime's intra-op threads, torch's OpenMP team); *total* = all of them. The kernel counts in "
        f"{resolution:g} ms ticks, so a round of few requests is coarse; a thread that ended within a round is "
        "missing from it."
    )


def _spread(values: Sequence[float], digits: int = 1) -> str:
    """``median [min-max]`` of per-round figures."""
    return f"{median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def sequential_report(result: SequentialResult, command: str, load_before: list[str], load_after: list[str]) -> str:
    """Markdown record of one batch-wait comparison."""
    reference = result.sides[0]
    lines = [
        f"# One request at a time, by batch wait: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint `{result.checkpoint}` ({result.model}); server backend `{result.backend}`, "
        f"`LRAEE_THREADS={result.server_threads}`; {os.cpu_count()} CPUs on the machine. One server per "
        "`LRAEE_MAX_BATCH_WAIT_MS`, alive at once; each round, each server in turn (order alternating, servers "
        f"quiet before each turn): {result.requests_per_round} multipart `/classify` requests of one 320x240 JPEG "
        f"with {result.labels} labels, one at a time from one client"
        + (
            f", then {result.load_requests_per_round} requests from {result.load_clients} concurrent clients, each "
            "its own label set of 2-20 labels (the real-traffic load)."
            if result.load_requests_per_round
            else "."
        )
        + f" {len(reference.round_p50_ms)} timed rounds after an untimed warm-up; `[min-max]` is the spread over "
        "rounds.",
        "",
        "| batch wait | one at a time: p50 ms [rounds] | p95 ms | server medians ms: queue / decode / inference | "
        "load requests/s [rounds] | load: mean engine batch |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for side in result.sides:
        timing = " / ".join(
            f"{median(side.server_timing_ms[name]):.2f}" if side.server_timing_ms.get(name) else "-"
            for name in ("queue", "decode", "inference")
        )
        load = _spread(side.load_requests_per_s) if side.load_requests_per_s else "-"
        batch = f"{side.load_images / side.load_batches:.1f}" if side.load_batches else "-"
        lines.append(
            f"| {side.batch_wait_ms:g} ms | {percentile(side.sequential_ms, 50):.2f} "
            f"[{min(side.round_p50_ms):.2f}-{max(side.round_p50_ms):.2f}] | "
            f"{percentile(side.sequential_ms, 95):.2f} | {timing} | {load} | {batch} |"
        )
    lines.append("")
    for side in result.sides[1:]:
        lower = [1 - new / old for new, old in zip(side.round_p50_ms, reference.round_p50_ms, strict=False)]
        line = (
            f"{side.batch_wait_ms:g} ms vs {reference.batch_wait_ms:g} ms, the same round's p50: "
            f"{100 * median(lower):.1f}% lower (rounds: " + ", ".join(f"{100 * v:.1f}%" for v in lower) + ")"
        )
        if side.load_requests_per_s and reference.load_requests_per_s:
            ratios = [
                new / old for new, old in zip(side.load_requests_per_s, reference.load_requests_per_s, strict=False)
            ]
            line += f"; load requests/s {median(ratios):.3f}x (rounds: " + ", ".join(f"{v:.3f}" for v in ratios) + ")"
        lines.append(line + ".")
    phases = [("one request at a time", [side.sequential_cpu_ms for side in result.sides])]
    if result.load_requests_per_round:
        phases.append(("the load", [side.load_cpu_ms for side in result.sides]))
    for phase, splits in phases:
        lines += ["", f"Server CPU per request, {phase} (ms):", ""]
        lines += cpu_split_table(
            "batch wait",
            [(f"{side.batch_wait_ms:g} ms", split) for side, split in zip(result.sides, splits, strict=True)],
        )
    lines += [
        "",
        cpu_split_note(),
        "",
        f"Errors {result.errors}" + (f" ({result.error_samples})" if result.error_samples else "") + ".",
        "",
        "What else was using the CPU, before the run:",
        "",
        *(f"    {line}" for line in load_before),
        "",
        "and after it:",
        "",
        *(f"    {line}" for line in load_after),
    ]
    return "\n".join(lines) + "\n"


def machine_load() -> list[str]:
    """What else is using the CPU: the load average and the busiest other processes (``ps``), for the record."""
    lines = [f"load average: {Path('/proc/loadavg').read_text().strip()}"]
    try:
        ps = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return [*lines, f"ps failed: {exc}"]
    own = os.getpid()
    busy = [line.strip() for line in ps[1:] if line.split() and line.split()[0] != str(own)]
    return lines + [line[:160] for line in busy[:6]]


def _rounds_row(name: str, rounds: Sequence[float], *, ratio: bool = False) -> str:
    """A ``| name | median | rounds |`` row: figures with one decimal, or a ratio with two, its median in bold."""
    if ratio:
        return f"| {name} | **{median(rounds):.2f}x** | " + ", ".join(f"{v:.2f}" for v in rounds) + " |"
    return f"| {name} | {median(rounds):.1f} | " + ", ".join(f"{v:.1f}" for v in rounds) + " |"


def varied_report(result: VariedServiceResult, command: str, load_before: list[str], load_after: list[str]) -> str:
    """Markdown record of one varied-traffic run."""
    lines = [
        f"# Service under real traffic vs its engine and open_clip FP32: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint `{result.checkpoint}` ({result.model}); server backend `{result.backend}`, "
        f"`LRAEE_THREADS={result.server_threads}`, "
        f"the in-process reference with {result.server_threads} torch threads; {os.cpu_count()} CPUs on the machine.",
        f"{result.clients} clients, each its own label set of {min(result.labels_per_client)}-"
        f"{max(result.labels_per_client)} labels (sizes {result.labels_per_client}), multipart `/classify` of one "
        f"320x240 JPEG, {result.requests_per_round} requests per round; every label set cached after the untimed "
        f"first round. Reference: plain open_clip FP32 `visual` + cosine logits + softmax + top-5 at batch "
        f"{BASELINE_BATCH}, in process, on the same backbone; and the service's own engine in process (as the server "
        f"loads it, {result.server_threads} threads) at batch {BASELINE_BATCH}, its rows asking the clients' label "
        "sets in turn at the default operating point; both timed just before each service round (the clients run in "
        "this process, the server in its own).",
        "",
        "| | median | rounds |",
        "|---|---:|---|",
        _rounds_row("service requests/s (= images/s)", result.service_requests_per_s),
        _rounds_row(f"plain open_clip FP32 images/s (batch {BASELINE_BATCH})", result.baseline_images_per_s),
        _rounds_row("service / open_clip (same round)", result.ratios, ratio=True),
        _rounds_row(f"the service's engine in process, images/s (batch {BASELINE_BATCH})", result.engine_images_per_s),
        _rounds_row("service / its own engine (same round)", result.engine_ratios, ratio=True),
        "",
        f"Latency p50 {result.latency_p50_ms:.1f} ms, p95 {result.latency_p95_ms:.1f} ms; server timing medians (ms) "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.server_timing_ms.items())
        + f"; mean engine batch {result.mean_engine_batch:.1f} images; server CPU {result.server_cpu_cores:.2f} "
        f"cores, clients (this process) {result.client_cpu_cores:.2f} cores; errors {result.errors}"
        + (f" ({result.error_samples})" if result.error_samples else "")
        + ".",
        "",
        "Server CPU per request under the load (ms):",
        "",
        *cpu_split_table("phase", [("service rounds", result.server_cpu_ms)]),
        "",
        cpu_split_note(),
        "",
        "What else was using the CPU, before the run:",
        "",
        *(f"    {line}" for line in load_before),
        "",
        "and after it:",
        "",
        *(f"    {line}" for line in load_after),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.service``: the varied-traffic run, printed and written to bench/results/service-<time>.md;
    ``--sequential``: the batch-wait comparison instead (service-sequential-<time>.md)."""
    import argparse

    from lraee_core.assets import resolve_checkpoint

    parser = argparse.ArgumentParser(prog="python -m bench.service", description=main.__doc__)
    parser.add_argument("--checkpoint", default="everyday", help="checkpoint directory or embedded name")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="server LRAEE_THREADS and the reference's threads")
    parser.add_argument("--requests", type=int, default=320, help="requests per timed round of the load")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one request at a time (and the load) against a server with the old 5 ms batch wait and one with the "
        "default, rounds interleaved",
    )
    parser.add_argument(
        "--sequential-requests", type=int, default=200, help="one-at-a-time requests per server per round"
    )
    parser.add_argument(
        "--waits-ms",
        default=None,
        help=f"batch waits to compare, comma-separated, the first the reference (default {OLD_BATCH_WAIT_MS:g},"
        "<the app's default>)",
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown record (default bench/results/service-*.md)")
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    command = "python -m bench.service " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = machine_load()
    if args.sequential:
        out = args.out or REPO_ROOT / "bench" / "results" / f"service-sequential-{stamp}.md"
        sequential = run_sequential_service(
            resolve_checkpoint(args.checkpoint),
            waits_ms=None if args.waits_ms is None else [float(wait) for wait in args.waits_ms.split(",")],
            requests_per_round=args.sequential_requests,
            clients=args.clients,
            load_requests_per_round=args.requests,
            threads=args.threads,
            repeats=args.repeats,
            log_dir=Path(f"/tmp/lraee-bench-sequential-{stamp}"),
        )
        record = sequential_report(sequential, command.strip(), load_before, machine_load())
    else:
        out = args.out or REPO_ROOT / "bench" / "results" / f"service-{stamp}.md"
        result = run_varied_service(
            resolve_checkpoint(args.checkpoint),
            clients=args.clients,
            threads=args.threads,
            requests_per_round=args.requests,
            repeats=args.repeats,
            log_path=Path(f"/tmp/lraee-bench-service-{stamp}.log"),
        )
        record = varied_report(result, command.strip(), load_before, machine_load())
    print(record)
    out.write_text(record)


if __name__ == "__main__":
    main()
