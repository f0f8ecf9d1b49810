"""Load and soak: the service under uvicorn on loopback, many varied requests, then a handful of huge bodies.

``python -m bench.load`` (``make load``) runs the long version and writes ``bench/results/load-<time>.json`` and
``.md``: 2,000 requests at concurrency 16 (single and batch, multipart and JSON, label sets drawn at random from a
vocabulary, so most are new to the text cache), then six concurrent 40 MB JSON batch bodies (three ~10 MB photos-
sized noise PNGs each), retried after ``Retry-After`` when refused. Reported: status counts (any 5xx fails the run),
requests/s, and the server's resident memory (``/proc/<pid>/status`` VmRSS, sampled every 50 ms): before, after and
peak of each phase. ``tests/app/test_soak.py`` runs a short version with hostile bodies mixed in.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.local_server import serving
from lraee_core.paths import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results"
MIB = 1024 * 1024
SERVER_MALLOC_ARENA_MAX = "2"  # as deploy/k8s/deployment.yaml and docker-compose.yml set it
# Label vocabulary: requests draw 2..12 of these, so label sets vary and the text cache sees new ones all the time.
VOCABULARY = tuple(
    f"{adjective} {noun}"
    for adjective in ("red", "small", "old", "striped", "wooden", "shiny", "wet", "broken", "tiny", "green")
    for noun in ("cat", "dog", "car", "tree", "boat", "house", "cup", "bird", "chair", "lamp", "shoe", "clock")
)


@dataclass
class PhaseResult:
    """What one phase of traffic got."""

    name: str
    requests: int  # sent (retries not counted)
    seconds: float
    statuses: dict[str, int]  # final status -> count
    first_statuses: dict[str, int] = field(default_factory=dict)  # status of each first attempt (big bodies)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_peak_mib: float = 0.0

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status."""
        return sum(count for status, count in self.statuses.items() if status.startswith("5"))


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every ``period`` seconds in a thread; ``peak`` since the last :meth:`reset`."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid = pid
        self.period = period
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, RuntimeError):
                return

    def reset(self) -> float:
        """Start a new peak from the current RSS; returns it."""
        now = rss_mib(self.pid)
        self.peak = now
        return now

    def stop(self) -> None:
        """End sampling."""
        self._stop.set()
        self._thread.join(timeout=2)


@contextmanager
def serve(env: dict[str, str], timeout: float = 900.0) -> Iterator[tuple[str, int]]:
    """A uvicorn process running the app on a free loopback port; yields (base URL, pid) once /readyz is 200.

    The server gets ``MALLOC_ARENA_MAX=2`` unless the environment says otherwise, as the deploy files run it: with
    glibc's default of one malloc arena per thread, the buffers of big bodies parsed and decoded on worker threads
    stay resident after they are freed (measured: a 40 MB body left ~50 MiB behind per parsing thread).
    """
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("LRAEE_")}
    full_env.setdefault("MALLOC_ARENA_MAX", SERVER_MALLOC_ARENA_MAX)
    full_env.update(env)
    full_env.setdefault("PYTHONPATH", str(REPO_ROOT))
    options = ("--log-level", "warning", "--timeout-graceful-shutdown", "10")
    with serving(full_env, options=options, ready_within=timeout, grace=30.0) as server:  # the log is not a result
        yield server.base_url, server.process.pid


def noise_png(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A PNG of uniform noise (incompressible: its bytes are about width x height x 3)."""
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def good_request(client: httpx.Client, rng: random.Random, images: list[bytes]) -> int:
    """One valid request: single or batch, multipart or JSON, a random label set from the vocabulary."""
    labels = rng.sample(VOCABULARY, rng.randint(2, 12))
    kind = rng.randrange(4)
    if kind == 0:
        response = client.post(
            "/classify", files={"image": ("i.png", rng.choice(images), "image/png")}, data={"labels": labels}
        )
    elif kind == 1:
        body = {"image": base64.b64encode(rng.choice(images)).decode(), "labels": labels, "top_k": 3}
        response = client.post("/classify", json=body)
    elif kind == 2:
        files = [("images", (f"{i}.png", rng.choice(images), "image/png")) for i in range(rng.randint(2, 4))]
        response = client.post("/classify/batch", files=files, data={"labels": labels})
    else:
        chosen = [base64.b64encode(rng.choice(images)).decode() for _ in range(rng.randint(2, 4))]
        response = client.post("/classify/batch", json={"images": chosen, "labels": labels})
    return response.status_code


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    """``total`` bytes of JSON-ish filler as a chunked body (no Content-Length)."""
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def declared_too_big(base: str, declared: int = 10**10) -> int:
    """Status of a request that declares ``declared`` body bytes and sends a few (httpx refuses to send such a
    request, so it goes over a raw socket); the server must answer without waiting for the rest."""
    url = httpx.URL(base)
    with socket.create_connection((url.host, url.port or 80), timeout=30) as sock:
        head = (
            f"POST /classify HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\nConnection: close\r\n\r\n{{"
        )
        sock.sendall(head.encode())
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def hostile_request(client: httpx.Client, rng: random.Random, images: list[bytes]) -> int:
    """One deliberately bad request; every kind must get a 4xx."""
    image = base64.b64encode(images[0]).decode()
    kind = rng.randrange(9)
    json_type = {"content-type": "application/json"}
    if kind == 0:  # a declared body far over the limit: refused before a byte of it is read
        return declared_too_big(str(client.base_url))
    elif kind == 1:  # a streamed body over the limit (no Content-Length)
        response = client.post("/classify", content=_chunks(20 * MIB), headers=json_type)
    elif kind == 2:
        response = client.post("/classify", content=b'{"labels": [', headers=json_type)
    elif kind == 3:
        response = client.post("/classify", json={"image": "%%% not base64", "labels": ["a", "b"]})
    elif kind == 4:
        response = client.post(
            "/classify", files={"image": ("x.png", b"not an image", "image/png")}, data={"labels": "a"}
        )
    elif kind == 5:
        response = client.post("/classify", json={"image": image, "labels": [f"l{i}" for i in range(20_000)]})
    elif kind == 6:
        response = client.post("/classify", json={"image": image, "labels": ["x" * 5000]})
    elif kind == 7:
        garbage = b"--xyz\r\nContent-Disposition: form-data; name=image; filename=a\r\n\r\n" + os.urandom(4096)
        response = client.post(
            "/classify", content=garbage, headers={"content-type": "multipart/form-data; boundary=xyz"}
        )
    else:
        response = client.post("/classify", content=b"[" * 200_000, headers=json_type)
    return response.status_code


def run_phase(
    name: str,
    base: str,
    sampler: RssSampler,
    jobs: list[Callable[[httpx.Client], int]],
    concurrency: int,
) -> PhaseResult:
    """Run ``jobs`` on ``concurrency`` client threads; statuses and the server's RSS around them."""
    before = sampler.reset()
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=base, timeout=120, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(lambda job: job(client), jobs))
    seconds = time.perf_counter() - started
    time.sleep(1.0)  # let the worker finish shadow checks and the allocator settle before the "after" reading
    return PhaseResult(
        name=name,
        requests=len(jobs),
        seconds=seconds,
        statuses={str(status): count for status, count in sorted(Counter(statuses).items())},
        rss_before_mib=before,
        rss_after_mib=rss_mib(sampler.pid),
        rss_peak_mib=sampler.peak,
    )


def mixed_traffic(
    base: str,
    sampler: RssSampler,
    *,
    requests: int,
    concurrency: int,
    hostile_share: float,
    seed: int,
    name: str = "mixed",
) -> PhaseResult:
    """``requests`` valid requests with varied labels at ``concurrency``, a share of hostile ones mixed in."""
    rng = random.Random(seed)
    images = [noise_png(rng, (rng.randint(32, 320), rng.randint(32, 320))) for _ in range(16)]
    jobs: list[Callable[[httpx.Client], int]] = []
    for index in range(requests):
        job_rng = random.Random(seed * 1_000_003 + index)
        kind = hostile_request if job_rng.random() < hostile_share else good_request
        jobs.append(partial(kind, rng=job_rng, images=images))
    return run_phase(name, base, sampler, jobs, concurrency)


def big_bodies(base: str, sampler: RssSampler, *, count: int, seed: int, patience: float = 120.0) -> PhaseResult:
    """``count`` concurrent ~40 MB JSON batch bodies (three ~10 MB noise PNGs each), each retried after
    ``Retry-After`` while refused with 429, for up to ``patience`` seconds."""
    rng = random.Random(seed)
    image = noise_png(rng, (1840, 1840))  # 10.2 MB: just under the 10 MiB upload limit
    body = json.dumps({"images": [base64.b64encode(image).decode()] * 3, "labels": list(VOCABULARY[:5])}).encode()
    first: list[int] = []  # each client's first answer (list.append is atomic across threads)

    def send(client: httpx.Client) -> int:
        deadline = time.monotonic() + patience
        attempt = 0
        while True:
            response = client.post("/classify/batch", content=body, headers={"content-type": "application/json"})
            if attempt == 0:
                first.append(response.status_code)
            attempt += 1
            if response.status_code != 429 or time.monotonic() > deadline:
                return response.status_code
            time.sleep(float(response.headers.get("retry-after", "1")))

    jobs: list[Callable[[httpx.Client], int]] = [send] * count
    result = run_phase(f"{count} x {len(body) / 1e6:.1f} MB bodies", base, sampler, jobs, count)
    result.first_statuses = {str(status): n for status, n in sorted(Counter(first).items())}
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: run both phases against a fresh server and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--big-bodies", type=int, default=6)
    parser.add_argument("--hostile-share", type=float, default=0.0, help="share of hostile requests in phase one")
    parser.add_argument("--checkpoint", default=None, help="LRAEE_CHECKPOINT (default: the embedded default)")
    parser.add_argument("--shadow-rate", type=float, default=0.05, help="LRAEE_SHADOW_RATE of the server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load_average = os.getloadavg()
    env = {"LRAEE_THREADS": os.environ.get("LRAEE_THREADS", "2"), "LRAEE_SHADOW_RATE": str(args.shadow_rate)}
    if args.checkpoint:
        env["LRAEE_CHECKPOINT"] = args.checkpoint
    with serve(env) as (base, pid):
        sampler = RssSampler(pid)
        try:
            warm = mixed_traffic(
                base, sampler, requests=64, concurrency=4, hostile_share=0.0, seed=args.seed + 1, name="warm-up"
            )
            mixed = mixed_traffic(
                base,
                sampler,
                requests=args.requests,
                concurrency=args.concurrency,
                hostile_share=args.hostile_share,
                seed=args.seed,
            )
            big = big_bodies(base, sampler, count=args.big_bodies, seed=args.seed)
        finally:
            sampler.stop()
        shadow = [line for line in httpx.get(f"{base}/metrics").text.splitlines() if line.startswith("lraee_shadow")]
    report = write_results([warm, mixed, big], args, shadow, load_average, env)
    print(report)
    return 1 if any(phase.server_errors for phase in (warm, mixed, big)) else 0


def write_results(
    phases: list[PhaseResult],
    args: argparse.Namespace,
    shadow: list[str],
    load_average: tuple[float, float, float],
    env: dict[str, str],
) -> str:
    """``bench/results/load-<UTC time>.json`` and ``.md``; returns the markdown."""
    warm, mixed, big = phases
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    growth = mixed.rss_after_mib / mixed.rss_before_mib - 1
    peak_added = big.rss_peak_mib - big.rss_before_mib
    figures = {
        "when": stamp,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_average},
        "server_environment": {
            "LRAEE_THREADS": env["LRAEE_THREADS"],
            "LRAEE_SHADOW_RATE": env["LRAEE_SHADOW_RATE"],
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", SERVER_MALLOC_ARENA_MAX),
        },
        "settings": vars(args),
        "phases": [{**asdict(phase), "server_errors": phase.server_errors} for phase in phases],
        "mixed": {
            "requests_per_second": mixed.requests / mixed.seconds,
            "rss_growth_ratio": growth,
        },
        "big_bodies": {"peak_added_mib": peak_added},
        "shadow_metrics": [line for line in shadow if not line.startswith("#")],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"load-{stamp}.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        f"# make load, {stamp}",
        "",
        f"Server: uvicorn, one process, LRAEE_THREADS={env['LRAEE_THREADS']}, LRAEE_SHADOW_RATE={args.shadow_rate}, "
        f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', SERVER_MALLOC_ARENA_MAX)}; {os.cpu_count()} CPUs, "
        f"load average at start {load_average[0]:.2f} (other jobs share the CPUs: throughput is this machine's, "
        "not the service's). RSS from /proc (VmRSS), sampled every 50 ms.",
        "",
        "| phase | requests | concurrency | seconds | req/s | statuses | 5xx | RSS before | after | peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, concurrency in ((warm, 4), (mixed, args.concurrency), (big, args.big_bodies)):
        statuses = ", ".join(f"{status}: {count}" for status, count in phase.statuses.items())
        lines.append(
            f"| {phase.name} | {phase.requests} | {concurrency} | {phase.seconds:.1f} | "
            f"{phase.requests / phase.seconds:.1f} | {statuses} | {phase.server_errors} | "
            f"{phase.rss_before_mib:.0f} MiB | {phase.rss_after_mib:.0f} MiB | {phase.rss_peak_mib:.0f} MiB |"
        )
    lines += [
        "",
        f"- RSS growth over the {mixed.requests} mixed requests: {100 * growth:.1f}% (target < 10%)",
        f"- the big bodies added {peak_added:.0f} MiB at peak (target < 200 MiB); "
        f"first attempts: {big.first_statuses} (429: refused at once, retried after Retry-After)",
        "",
    ]
    markdown = "\n".join(lines)
    (RESULTS / f"load-{stamp}.md").write_text(markdown)
    return markdown


if __name__ == "__main__":
    raise SystemExit(main())
