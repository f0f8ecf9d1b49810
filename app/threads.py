"""The service's worker pools: threads named in Python and in the OS, each with its own torch thread count.

The names are how a profiler, ``top -H`` or ``python -m bench.service`` tells the pools apart: they read the OS
name (``/proc/<pid>/task/<tid>/comm``, 15 bytes), which Python before 3.14 leaves as the process's. A thread
inherits its creator's OS name, so a runtime pool started from a worker (torch's OpenMP team) carries the worker's.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

DECODE_THREADS = "lraee-decode"  # image decoding and preprocessing (app.images)
INFER_THREADS = "lraee-infer"  # the inference worker (app.batching)
TEXT_THREADS = "lraee-text"  # the text worker encoding new labels (app.text_worker)
_PR_SET_NAME = 15  # prctl option from <linux/prctl.h>: name the calling thread
_OS_NAME_BYTES = 15  # the kernel's limit, without the terminating NUL


def name_os_thread() -> None:
    """Give the calling thread's Python name to its OS thread (cut to 15 bytes); nothing outside Linux."""
    if sys.platform != "linux":
        return
    name = threading.current_thread().name.encode("utf-8", "replace")[:_OS_NAME_BYTES]
    ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _start_worker(torch_threads: int) -> None:
    name_os_thread()
    # torch's thread count is per thread under OpenMP, so each worker sets its own.
    torch.set_num_threads(torch_threads)


def worker_pool(name_prefix: str, *, workers: int, torch_threads: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads named ``<name_prefix>_<i>`` in Python and the OS, each using ``torch_threads``
    torch threads."""
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix=name_prefix, initializer=_start_worker, initargs=(torch_threads,)
    )
