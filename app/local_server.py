"""The service in a child process on a free loopback port, started the way ``make serve`` and the Dockerfile start it.

One way to start it for everyone who drives a real uvicorn: the tests, the benchmarks, the deploy check and the
docs' examples. It lives in ``app`` because ``app`` owns how the service is started (the factory's name, the uvicorn
command line), and every one of those callers may import ``app`` while none of them may import another
(nothing imports ``bench``, ``docs``, ``deploy`` or ``tests``).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import httpx

from lraee_core.paths import REPO_ROOT

APP_FACTORY = "app.main:create_app"  # what `make serve` and the Dockerfile's CMD serve (with --factory)
HOST = "127.0.0.1"  # loopback only: these servers are for the machine that starts them
Output = int | IO[bytes] | None  # where the server's stdout and stderr go (subprocess.DEVNULL, PIPE, a file)


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer ``/readyz`` with 200 in time."""


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def uvicorn_command(port: int, *options: str) -> list[str]:
    """The service's uvicorn command line on loopback ``port``, followed by more uvicorn ``options``."""
    return [sys.executable, "-m", "uvicorn", APP_FACTORY, "--factory", "--host", HOST, "--port", str(port), *options]


def wait_until_ready(process: subprocess.Popen[bytes], base_url: str, timeout: float, poll: float = 0.2) -> None:
    """Poll ``base_url/readyz`` until it answers 200; :class:`ServerNotReady` when ``process`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerNotReady(f"uvicorn exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServerNotReady(f"uvicorn was not ready within {timeout:g} s")
        time.sleep(poll)


def stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM (uvicorn's graceful shutdown), then SIGKILL when it takes longer than ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LocalServer:
    """A started service process and where it listens."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def wait_until_ready(self, timeout: float) -> None:
        """See :func:`wait_until_ready`."""
        wait_until_ready(self.process, self.base_url, timeout)

    def stop(self, grace: float = 20.0) -> None:
        """See :func:`stop`."""
        stop(self.process, grace)


def start_server(
    env: Mapping[str, str], *, options: Sequence[str] = (), output: Output = subprocess.DEVNULL, port: int | None = None
) -> LocalServer:
    """Start the service from the project's root with exactly ``env`` as its environment (``LRAEE_*`` settings
    included), on ``port`` or a free one; stdout and stderr go to ``output``. It is not ready yet."""
    port = free_port() if port is None else port
    process = subprocess.Popen(
        uvicorn_command(port, *options), cwd=REPO_ROOT, env=dict(env), stdout=output, stderr=subprocess.STDOUT
    )
    return LocalServer(process, port)


@contextmanager
def serving(
    env: Mapping[str, str],
    *,
    options: Sequence[str] = (),
    output: Output = subprocess.DEVNULL,
    ready_within: float = 300.0,
    grace: float = 20.0,
) -> Iterator[LocalServer]:
    """:func:`start_server`, wait for ``/readyz``, yield the server, and always stop it."""
    server = start_server(env, options=options, output=output)
    try:
        server.wait_until_ready(ready_within)
        yield server
    finally:
        server.stop(grace)
