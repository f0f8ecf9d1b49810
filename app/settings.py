"""Service configuration: one ``BaseSettings`` read from ``LRAEE_*`` environment variables, validated at start-up.

The deploy files use exactly these names; a bad value stops the process before it binds its port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lraee_core.assets import DEFAULT_CHECKPOINT, EMBEDDED_CHECKPOINTS, resolve_checkpoint
from lraee_core.backends import BackendChoice
from lraee_core.images import DEFAULT_MAX_PIXELS
from lraee_core.text import MAX_LABEL_CHARS

from .addresses import is_host_or_network

MIB = 1024 * 1024
MAX_TEMPLATES = 100  # prompt templates per request; each label is encoded once per template
# Prompts (labels x templates) one request may send to the text tower: 1000 labels x the 7 default templates fit.
# The default of LRAEE_MAX_PROMPTS; it bounds how long one request holds the text worker.
MAX_PROMPTS = 10_000
# Room in a request body for everything but the images (labels, templates, options, multipart framing). JSON may
# escape one character as up to 6 bytes ("\uXXXX"), hence the factor.
_TEXT_BYTES_PER_CHAR = 6
_BODY_SLACK_BYTES = 64 * 1024


class Settings(BaseSettings):
    """Everything the service reads from its environment (prefix ``LRAEE_``)."""

    model_config = SettingsConfigDict(env_prefix="LRAEE_", frozen=True, extra="ignore")

    # NoDecode: a plain comma-separated list ("everyday,photos"), not the JSON pydantic-settings expects for lists.
    checkpoint: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(DEFAULT_CHECKPOINT,),
        description="the models to serve, comma-separated, the first the default: LRA-EE checkpoint directories "
        "(manifest.json + heads) or embedded ones by name (" + ", ".join(EMBEDDED_CHECKPOINTS) + "). Each has its "
        "own engine, inference worker and text cache; requests choose one with their `model` field",
    )
    backbone_weights: Path | None = Field(
        default=None, description="local backbone weights file overriding the manifest's (of the default model)"
    )
    open_clip_cache_dir: Path | None = Field(default=None, description="open_clip download cache")
    threads: int = Field(default=2, ge=1, le=256, description="torch intra-op threads of the inference worker")
    backend: BackendChoice = Field(
        default="auto",
        description="what runs the vision tower: onnxruntime (INT8 with per-image activation scales inside the graph; "
        "the fastest measured here, see bench/README.md), torch, or auto (onnxruntime for the checkpoint's quant "
        "mode when it runs it, else torch)",
    )
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="images per engine batch")
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="extra time an idle engine gives a batch to gather company (0: it starts at once); while a batch "
        "runs, images pile up and leave together as the next one without this wait",
    )
    queue_capacity: int = Field(default=256, ge=1, description="images waiting for the engine before 429")
    max_upload_bytes: int = Field(default=10 * MIB, ge=1024, description="bytes of one encoded image")
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="width x height of one image (bomb guard)"
    )
    max_labels: int = Field(default=1000, ge=1, le=10_000, description="labels per request")
    max_label_chars: int = Field(default=200, ge=1, le=MAX_LABEL_CHARS, description="characters per label / template")
    max_batch_images: int = Field(default=32, ge=1, le=1024, description="images per /classify/batch request")
    text_cache_size: int = Field(default=8192, ge=1, description="label embeddings kept in the engine's LRU")
    max_prompts: int = Field(
        default=MAX_PROMPTS, ge=1, le=1_000_000, description="labels x templates of one request (text encoding budget)"
    )
    text_queue_capacity: int = Field(
        default=16, ge=1, description="requests with new labels waiting for the text encoder before 429"
    )
    api_key: SecretStr | None = Field(default=None, description="when set, required on everything but health probes")
    max_inflight_requests: int = Field(
        default=64, ge=1, description="requests with a body being read, decoded or awaiting results at once; 429 over"
    )
    max_inflight_bytes: int = Field(
        default=64 * MIB,
        ge=MIB,
        description="request body bytes admitted at once, all requests together; 429 over. Also the largest body",
    )
    max_inflight_per_client: int = Field(
        default=0,
        ge=0,
        description="requests with a body one client address may have in flight (0: no cap). Behind a proxy every "
        "request comes from the proxy's address, unless uvicorn trusts its X-Forwarded-For (--forwarded-allow-ips)",
    )
    body_min_rate: float = Field(
        default=240.0,
        ge=0.0,
        description="bytes/s a request body must keep arriving at once its grace is spent, counting only time spent "
        "waiting for the client; slower: 408 and the connection closed (0: no deadline)",
    )
    body_grace_seconds: float = Field(
        default=5.0, gt=0.0, le=3600.0, description="waiting a request body gets before it must keep the minimum rate"
    )
    body_max_pause_seconds: float = Field(
        default=10.0,
        gt=0.0,
        le=3600.0,
        description="the longest a request body that kept the minimum rate may then pause (at least the grace)",
    )
    stall_seconds: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="/readyz is 503 while images wait and one engine call runs longer"
    )
    shadow_rate: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="share of early exits re-run at full depth (shadow checks: idle time first, then at most "
        "LRAEE_SHADOW_LOAD_BUDGET of engine time under load) to measure their agreement (0: off)",
    )
    shadow_load_budget: float = Field(
        default=0.02,
        ge=0.0,
        le=0.5,
        description="share of engine time shadow checks may take while live images wait (0: idle time only)",
    )
    threshold_control: bool = Field(
        default=True,
        description="raise an operating point's thresholds along its calibrated curve when shadow checks say its "
        "promise is broken, relax them back when it is comfortably kept (per process; reset on restart)",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="browser origins allowed to call the API cross-origin (comma-separated); none: CORS off"
    )
    max_embedding_inputs: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="inputs (texts or images) of one /v1/embeddings request; images also at most LRAEE_QUEUE_CAPACITY",
    )
    max_embedding_input_chars: int = Field(
        default=2000, ge=1, le=100_000, description="characters of one /v1/embeddings text input (CLIP reads 77 tokens)"
    )
    image_urls: bool = Field(
        default=False, description="fetch images given by http(s) URL (image_url, URL inputs); off: refused"
    )
    image_url_allow_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="hostnames or CIDRs (comma-separated) whose addresses image URLs may reach although they are "
        "loopback, private, link-local or otherwise not public (a hostname allows what it resolves to)",
    )
    image_url_connect_timeout_seconds: float = Field(
        default=3.0, gt=0.0, le=60.0, description="connecting to an image URL's host (DNS included)"
    )
    image_url_read_timeout_seconds: float = Field(
        default=5.0, gt=0.0, le=60.0, description="longest wait for the next bytes of an image URL's answer"
    )
    image_url_timeout_seconds: float = Field(
        default=10.0, gt=0.0, le=300.0, description="one image URL's whole fetch, redirects included"
    )
    max_image_fetches: int = Field(
        default=8, ge=1, le=1024, description="image URLs being fetched at once; a request over it gets 429"
    )

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint_list(cls, value: object) -> object:
        # "everyday,photos", one path, or a sequence; embedded names become their directories.
        items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, Path) else value
        if not isinstance(items, list | tuple):
            return value
        paths = tuple(
            resolve_checkpoint(item.strip() if isinstance(item, str) else item)
            for item in items
            if not (isinstance(item, str) and not item.strip())
        )
        if not paths:
            raise ValueError("name at least one checkpoint")
        if len(set(paths)) != len(paths):
            raise ValueError(f"a checkpoint is named twice: {', '.join(map(str, paths))}")
        return paths

    @field_validator("api_key")
    @classmethod
    def _blank_key_means_none(cls, value: SecretStr | None) -> SecretStr | None:
        # Deploy templates often render an unset secret as an empty variable; that must not become the key "".
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("cors_origins", "image_url_allow_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("image_url_allow_hosts")
    @classmethod
    def _hosts_or_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if not is_host_or_network(entry):
                raise ValueError(f"{entry!r} is neither a hostname nor an IP address or CIDR")
        return value

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> Self:
        # A batch request is admitted to the queue all at once; a bigger batch than the queue could never run.
        if self.max_batch_images > self.queue_capacity:
            raise ValueError(
                f"LRAEE_MAX_BATCH_IMAGES ({self.max_batch_images}) must not exceed "
                f"LRAEE_QUEUE_CAPACITY ({self.queue_capacity})"
            )
        return self

    @model_validator(mode="after")
    def _one_image_fits_in_flight(self) -> Self:
        # A body over the in-flight budget could never be admitted: one request of one maximal image must fit.
        one_image = self.body_limit(1, capped=False)
        if self.max_inflight_bytes < one_image:
            raise ValueError(
                f"LRAEE_MAX_INFLIGHT_BYTES ({self.max_inflight_bytes}) must hold one request of one image of "
                f"LRAEE_MAX_UPLOAD_BYTES: at least {one_image}"
            )
        return self

    @model_validator(mode="after")
    def _pause_covers_grace(self) -> Self:
        # A body starts with its grace as allowance; a smaller cap on what it may bank would cut the grace short.
        if self.body_max_pause_seconds < self.body_grace_seconds:
            raise ValueError(
                f"LRAEE_BODY_MAX_PAUSE_SECONDS ({self.body_max_pause_seconds:g}) must be at least "
                f"LRAEE_BODY_GRACE_SECONDS ({self.body_grace_seconds:g})"
            )
        return self

    @property
    def default_checkpoint(self) -> Path:
        """The default model's checkpoint (the first named)."""
        return self.checkpoint[0]

    @property
    def max_embedding_images(self) -> int:
        """Image inputs of one /v1/embeddings request: they enter the inference queue at once, so never more than
        it holds."""
        return min(self.max_embedding_inputs, self.queue_capacity)

    @property
    def max_batch_wait_seconds(self) -> float:
        """``max_batch_wait_ms`` in seconds."""
        return self.max_batch_wait_ms / 1000.0

    def body_limit(self, images: int, *, capped: bool = True) -> int:
        """Largest request body accepted for ``images`` images: base64 of each (4/3) plus the text allowance, and
        never more than ``max_inflight_bytes`` (a bigger body could never be admitted) unless ``capped`` is False."""
        text = (self.max_labels + MAX_TEMPLATES) * self.max_label_chars * _TEXT_BYTES_PER_CHAR
        limit = images * (self.max_upload_bytes * 4 // 3 + 4) + text + _BODY_SLACK_BYTES
        return min(limit, self.max_inflight_bytes) if capped else limit
