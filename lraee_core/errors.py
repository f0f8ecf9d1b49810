"""Exceptions of the engine. The service maps them to HTTP errors; the engine knows nothing of HTTP."""


class LraeeError(Exception):
    """Base class of every error the engine raises on purpose."""


class BackboneError(LraeeError):
    """The requested backbone cannot be built (unsupported tower, missing or mismatched weights)."""


class CheckpointError(LraeeError):
    """A checkpoint is missing, corrupt, or does not match its backbone."""


class InputError(LraeeError):
    """Caller-supplied input (labels, templates, operating point, images) is invalid."""
