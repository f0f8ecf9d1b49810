"""The real thing: a uvicorn process on loopback, started the way `make serve` starts it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from app import local_server
from app.local_server import free_port, start_server
from lraee_core.paths import REPO_ROOT

from . import imagegen

REPO = REPO_ROOT


def start(checkpoint: Path | str, port: int, **settings: str) -> subprocess.Popen[bytes]:
    """``make serve``'s command on ``port``; ``settings`` are more ``LRAEE_*`` variables (``LRAEE_API_KEY="k"``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRAEE_")}
    env.update(LRAEE_CHECKPOINT=str(checkpoint), LRAEE_THREADS="1", PYTHONPATH=str(REPO), **settings)
    return start_server(env, port=port, output=subprocess.PIPE).process


def stop(process: subprocess.Popen[bytes]) -> str:
    """Stop the server; what it wrote."""
    local_server.stop(process)
    assert process.stdout is not None
    return process.stdout.read().decode(errors="replace")


def wait_until_ready(process: subprocess.Popen[bytes], base: str, seconds: float = 90) -> None:
    """Poll ``/readyz`` until 200; fails with the server's output if it exits or takes longer than ``seconds``."""
    try:
        local_server.wait_until_ready(process, base, seconds)
    except local_server.ServerNotReady as exc:
        pytest.fail(f"{exc}\n{stop(process)}")


@pytest.mark.slow
def test_uvicorn_serves_a_real_png(tiny_checkpoint: Path) -> None:
    port = free_port()
    process = start(tiny_checkpoint, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, base)
        response = httpx.post(
            f"{base}/classify",
            files={"image": ("cat.png", imagegen.noise_png(5), "image/png")},
            data={"labels": ["cat", "dog"]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] in {"cat", "dog"}
        assert "lraee_requests_total" in httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        output = stop(process)
    # Graceful shutdown on SIGTERM (recent uvicorn re-raises the signal after it, hence -SIGTERM).
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output


@pytest.mark.slow
def test_uvicorn_refuses_to_start_without_a_checkpoint(tmp_path: Path) -> None:
    process = start(tmp_path / "no-checkpoint", free_port())
    try:
        process.wait(timeout=90)
    finally:
        output = stop(process)
    assert process.returncode != 0
    assert "LRAEE_CHECKPOINT" in output and "Application startup failed" in output
