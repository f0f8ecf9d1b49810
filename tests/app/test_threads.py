"""app.threads: worker pools whose OS thread names (what /proc, top -H and bench.service read) match Python's."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from app.threads import DECODE_THREADS, name_os_thread, worker_pool


def _os_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().rstrip("\n")


@pytest.mark.skipif(sys.platform != "linux", reason="OS thread names are read from /proc")
def test_a_pool_worker_carries_its_python_name_in_the_os_and_its_own_torch_threads() -> None:
    pool = worker_pool(DECODE_THREADS, workers=1, torch_threads=1)
    try:
        python_name, os_name, torch_threads = pool.submit(
            lambda: (threading.current_thread().name, _os_name(), torch.get_num_threads())
        ).result()
    finally:
        pool.shutdown()
    assert python_name == os_name == f"{DECODE_THREADS}_0" and torch_threads == 1


@pytest.mark.skipif(sys.platform != "linux", reason="OS thread names are read from /proc")
def test_a_long_name_is_cut_to_the_kernels_15_bytes() -> None:
    seen: list[str] = []

    def run() -> None:
        name_os_thread()
        seen.append(_os_name())

    thread = threading.Thread(target=run, name="a-thread-name-longer-than-fifteen")
    thread.start()
    thread.join()
    assert seen == ["a-thread-name-l"]
