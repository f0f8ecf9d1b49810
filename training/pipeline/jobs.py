"""The jobs of a build: what one run is (:class:`Job`), the step records that make steps resumable, the hashes
that name a step's inputs, and the portable form of the paths a run records.

Each step hashes only the parts of the :class:`~training.pipeline.config.BuildConfig` that change its output, chained
with the hashes of the steps it reads from, and writes a ``step.json`` record next to its output; a later run whose
hash matches skips the step. Within one process a step runs at most once per job (:func:`step`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from lraee_core.manifest import portable_paths as portable_paths  # the one rewrite, shared with the service
from lraee_core.paths import REPO_ROOT, data_root

from .config import BuildConfig, to_jsonable

log = logging.getLogger("training")


# ---- portable paths ----------------------------------------------------------------------------------------------


# ---- hashing and step records -----------------------------------------------------------------------------------
def config_hash(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (dataclasses allowed); the identity of a step's output."""
    text = json.dumps([to_jsonable(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: str | None) -> dict[str, Any] | None:
    """Cheap identity of a local file (size + mtime) so a replaced weights file invalidates cached steps."""
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def backbone_identity(config: BuildConfig) -> dict[str, Any]:
    """What about the backbone changes cached outputs: its config, local files' fingerprints, the quant mode."""
    backbone = config.backbone
    return {
        "backbone": to_jsonable(backbone),
        "weights": file_fingerprint(backbone.pretrained),
        "model_config": file_fingerprint(backbone.model_config_file),
        "quant_mode": config.quant_mode,
    }


STEP_RECORD = "step.json"


@dataclass(frozen=True)
class StepRecord:
    """What a finished step wrote next to its output."""

    step: str  # step name
    config_hash: str  # identity of the inputs it ran on
    finished_at: float  # Unix time
    summary: dict[str, Any] = field(default_factory=dict)  # small facts for logs and later steps


def read_record(directory: Path) -> StepRecord | None:
    """The step record in ``directory``, or None when absent or unreadable."""
    path = directory / STEP_RECORD
    try:
        return StepRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_done(directory: Path, wanted_hash: str) -> bool:
    """True when ``directory`` holds a finished step computed from the inputs ``wanted_hash`` names."""
    record = read_record(directory)
    return record is not None and record.config_hash == wanted_hash


def write_record(directory: Path, step: str, wanted_hash: str, summary: dict[str, Any] | None = None) -> StepRecord:
    """Mark a step finished (written last, atomically, so an interrupted step never looks done)."""
    record = StepRecord(step=step, config_hash=wanted_hash, finished_at=time.time(), summary=summary or {})
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STEP_RECORD + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    tmp.replace(directory / STEP_RECORD)
    return record


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Job:
    """A resolved run: its config, where it works, and run-time switches (not part of any hash)."""

    config: BuildConfig  # the whole run
    work_dir: Path  # caches and step outputs
    force: frozenset[str] = frozenset()  # steps to redo even when their record matches
    argv: tuple[str, ...] = ()  # the command line, recorded in the manifest
    results: dict[str, Any] = field(default_factory=dict, compare=False)  # step -> its result in this process
    statuses: dict[str, str] = field(default_factory=dict, compare=False)  # step -> "ran" or "skipped"

    @property
    def checkpoint_dir(self) -> Path:
        """Where the checkpoint is written."""
        return Path(self.config.checkpoint_dir) if self.config.checkpoint_dir else self.work_dir / "checkpoint"

    @property
    def report_dir(self) -> Path:
        """Where the evaluation report is written."""
        return Path(self.config.report_dir) if self.config.report_dir else self.checkpoint_dir / "report"

    def step_dir(self, step: str) -> Path:
        """Output directory of one step inside the work dir."""
        return self.work_dir / step

    def should_skip(self, step: str, wanted_hash: str, outputs: Sequence[Path] = ()) -> bool:
        """True (and logged) when the step's record matches these inputs, the ``outputs`` it wrote outside its
        own directory still exist, and the step is not forced."""
        present = all(path.exists() for path in outputs)
        if step not in self.force and present and is_done(self.step_dir(step), wanted_hash):
            log.info("%s: up to date (hash %s), skipped", step, wanted_hash)
            self.statuses[step] = "skipped"
            return True
        log.info("%s: running (hash %s)", step, wanted_hash)
        self.statuses[step] = "ran"
        return False


def path_roots(job: Job) -> dict[str, str]:
    """Named roots that make a job's recorded paths portable (``portable_paths``; the longest match wins)."""
    return {
        "checkpoint": str(job.checkpoint_dir),
        "work": str(job.work_dir),
        "repo": str(REPO_ROOT),
        "data": str(data_root()),
    }


Result = TypeVar("Result")


def step(name: str) -> Callable[[Callable[[Job], Result]], Callable[[Job], Result]]:
    """Run a step at most once per process and job: later steps ask for their inputs by calling earlier steps,
    and this keeps a whole build from re-checking (or re-scanning the data for) the same step repeatedly."""

    def decorate(function: Callable[[Job], Result]) -> Callable[[Job], Result]:
        @wraps(function)
        def run(job: Job) -> Result:
            if name not in job.results:
                job.results[name] = function(job)
            result: Result = job.results[name]
            return result

        return run

    return decorate
