"""LRA-EE: layer-wise representation-aware early exit for INT8 open_clip ViTs, as a library.

The public API::

    from lraee_core import load_classifier, load_image

    classifier = load_classifier("path/to/checkpoint")  # quant_mode=..., backend="onnxruntime" override
    image = classifier.backbone.preprocess(load_image("cat.jpg"))
    [result] = classifier.classify(image.unsqueeze(0), ["cat", "dog"])

Everything else (backbone staging, quantization, heads, gates, FLOPs, the training-side checkpoint writer) lives in
the submodules and may change between versions.
"""

from .backends import BACKENDS, BackendName, BackendOptions
from .checkpoint import load_classifier, read_manifest
from .engine import EarlyExitClassifier, ExitResult, Prediction
from .errors import BackboneError, CheckpointError, ImageError, InputError, LraeeError
from .exits import ExitRule
from .images import load_image
from .manifest import Manifest

__all__ = [
    "BACKENDS",
    "BackboneError",
    "BackendName",
    "BackendOptions",
    "CheckpointError",
    "EarlyExitClassifier",
    "ExitResult",
    "ExitRule",
    "ImageError",
    "InputError",
    "LraeeError",
    "Manifest",
    "Prediction",
    "load_classifier",
    "load_image",
    "read_manifest",
]
