"""The models one service serves (``LRAEE_CHECKPOINT=everyday,photos``), each with its own engine, inference worker
(batcher), text worker and text cache, looked up by the name requests give in their ``model`` field.

One more engine in a process costs its weights and caches, not another interpreter, torch runtime and server. The
models share the event loop, the image decoding pool, the request limits
and the URL fetcher; their inference workers are separate threads, so one model's long batch never holds up
another's queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .batching import MicroBatcher
from .errors import UnknownModel
from .images import ImageDecoder
from .metrics import ModelMetrics
from .service import ModelService, RowResult, WorkKey
from .shadow import ShadowSampler


@dataclass
class ServedModel:
    """One loaded model and what serves it."""

    service: ModelService
    batcher: MicroBatcher[WorkKey, RowResult]
    decoder: ImageDecoder  # the shared decoding pool with this model's preprocessing
    metrics: ModelMetrics  # its series (labelled with its name)
    shadow: ShadowSampler | None = None
    loaded_at: int = field(default_factory=lambda: int(time.time()))  # Unix time, for /v1/models' `created`

    @property
    def name(self) -> str:
        """What requests call it."""
        return self.service.name


class ServedModels:
    """The served models in ``LRAEE_CHECKPOINT`` order; the first is the default."""

    def __init__(self, models: list[ServedModel]) -> None:
        if not models:
            raise ValueError("a service serves at least one model")
        self._models = list(models)
        self._by_name: dict[str, ServedModel] = {}
        for model in models:  # served names first, so a checkpoint id never shadows another model's name
            self._by_name.setdefault(model.name, model)
        for model in models:
            self._by_name.setdefault(model.service.classifier.checkpoint_id, model)

    @property
    def default(self) -> ServedModel:
        """The model a request that names none gets."""
        return self._models[0]

    @property
    def names(self) -> list[str]:
        """Served names, the default first."""
        return [model.name for model in self._models]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str | None) -> ServedModel:
        """The model ``name`` chooses (its served name or its checkpoint id; None: the default);
        :class:`UnknownModel` listing the served ones otherwise."""
        if name is None or name == "":
            return self.default
        model = self._by_name.get(name)
        if model is None:
            raise UnknownModel(name, self.names)
        return model
