"""Exceptions of the engine. The service maps them to HTTP errors; the engine knows nothing of HTTP."""

from typing import Literal


class LraeeError(Exception):
    """Base class of every error the engine raises on purpose."""


class BackboneError(LraeeError):
    """The requested backbone cannot be built (unsupported tower, missing or mismatched weights)."""


class CheckpointError(LraeeError):
    """A checkpoint is missing, corrupt, or does not match its backbone."""


class InputError(LraeeError):
    """Caller-supplied input (labels, templates, operating point, images) is invalid."""


# Why an image was refused; app/errors.py maps each code to an HTTP status.
ImageErrorCode = Literal["empty_image", "invalid_image", "image_too_large", "corrupt_image", "unsupported_image_mode"]


class ImageError(InputError):
    """An image that cannot be decoded safely; ``code`` says why (empty, not an image, too large, corrupt, ...)."""

    def __init__(self, message: str, *, code: ImageErrorCode) -> None:
        super().__init__(message)
        self.code: ImageErrorCode = code
