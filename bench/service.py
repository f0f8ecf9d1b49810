"""Service-level throughput: the real app under uvicorn on loopback, driven by concurrent httpx clients.

The server is started as its own process (``uvicorn app.main:create_app --factory`` with ``LRAEE_CHECKPOINT``), on
127.0.0.1 and a free port, and always stopped again. Each concurrency level gets one untimed warm-up round and
``repeats`` timed rounds of a bounded number of requests, all posting the same image and label set; any failed
request is counted and makes the benchmark fail. The reference is the same engine in this process at the server's
maximum batch size, measured in the same run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from PIL import Image

from lraee_core.engine import EarlyExitClassifier
from lraee_core.images import load_image

from .timing import median, percentile, time_passes, timed_calls

REPO_ROOT = Path(__file__).resolve().parent.parent
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Server:
    """A uvicorn process of the app; a context manager that always stops it."""

    def __init__(self, checkpoint: Path, threads: int, labels: int, log_path: Path) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            "LRAEE_CHECKPOINT": str(checkpoint),
            "LRAEE_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "LRAEE_MAX_LABELS": str(max(1000, labels)),
        }
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the server wrote."""
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class _RoundLog:
    """What the requests of a level's timed rounds saw."""

    latencies: list[float] = field(default_factory=list)  # seconds per request
    server_timing: dict[str, list[float]] = field(default_factory=dict)  # the response's timing_ms, per field


async def _round(
    client: httpx.AsyncClient, request: _Request, concurrency: int, count: int, errors: list[str], log: _RoundLog
) -> float:
    """``count`` requests from ``concurrency`` clients; returns the round's seconds."""
    remaining = count

    async def worker() -> None:
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
            timing = response.json().get("timing_ms") or {}
            for name, value in timing.items():
                log.server_timing.setdefault(name, []).append(float(value))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
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
            await _round(client, request, concurrency, concurrency, errors, _RoundLog())  # warm-up, untimed
            rates, log, wall = [], _RoundLog(), 0.0
            server_cpu, client_cpu = _cpu_seconds(server.process.pid), time.process_time()
            for _ in range(repeats):
                if time.monotonic() > deadline:
                    errors.append(f"concurrency {concurrency}: section time limit reached before all rounds ran")
                    break
                seconds = await _round(client, request, concurrency, requests_per_round, errors, log)
                rates.append(requests_per_round / seconds)
                wall += seconds
            if not rates or not log.latencies:
                continue
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
