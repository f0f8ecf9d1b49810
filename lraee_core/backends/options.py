"""How a backend runs (its own module so backends import it without importing the package that picks them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs; the torch backend needs none of it."""

    threads: int | None = None  # intra-op threads of a backend with its own thread pool; None: torch's count
