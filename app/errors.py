"""One exception hierarchy, one JSON error shape, one set of handlers.

Every error the service answers looks like ``{"error": {"code": "...", "message": "...", "status": 415}}``, plus
``"details"`` where there is more to say (the index of a bad image in a batch, the fields that failed validation).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lraee_core.errors import ImageError, ImageErrorCode

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the service answers on purpose; subclasses fix ``status`` and a default ``code``."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details
        self.headers = headers

    def for_image(self, index: int) -> ServiceError:
        """The same error naming the batch index of the image it is about."""
        named = copy.copy(self)
        named.message = f"image {index}: {self.message}"
        named.args = (named.message,)
        named.details = {**(self.details or {}), "index": index}
        return named


class BadRequest(ServiceError):
    """Malformed request: invalid JSON, invalid base64, empty image, broken multipart body."""

    status = 400


class Unauthorized(ServiceError):
    """Missing or wrong API key."""

    status = 401
    code = "unauthorized"


class PayloadTooLarge(ServiceError):
    """Request body, one image's bytes, or one image's pixel count over its limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """A content type the route does not take, or bytes that are no supported image."""

    status = 415
    code = "unsupported_media_type"


class InvalidInput(ServiceError):
    """Well-formed but unusable input: labels, templates, top_k, operating point, a damaged image."""

    status = 422
    code = "invalid_input"


class QueueFull(ServiceError):
    """The inference queue is full; the client should retry after ``Retry-After`` seconds."""

    status = 429
    code = "queue_full"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"the inference queue is full; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class TextQueueFull(ServiceError):
    """The text encoder's queue (requests with new labels) is full; retry after ``Retry-After`` seconds."""

    status = 429
    code = "text_queue_full"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"the text encoder's queue (requests with labels not seen before) is full; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class ServiceUnavailable(ServiceError):
    """The model is not loaded yet, or the service is shutting down."""

    status = 503
    code = "not_ready"


class ClientClosedRequest(ServiceError):
    """The client went away before its request was answered (nginx's 499); nobody reads this response."""

    status = 499
    code = "client_closed_request"


class UnknownModel(ServiceError):
    """A request names a model this service does not serve; the message and ``details.models`` list those it does."""

    status = 404
    code = "unknown_model"

    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; this service serves {served}", details={"models": served})


class ImageUrlsDisabled(ServiceError):
    """An image was given by URL while fetching is off (``LRAEE_IMAGE_URLS``)."""

    status = 400
    code = "image_urls_disabled"


class ImageUrlForbidden(ServiceError):
    """An image URL this service will not fetch: its scheme, credentials in it, or an address that is not public
    and not allow-listed (``LRAEE_IMAGE_URL_ALLOW_HOSTS``), including after a redirect."""

    status = 403
    code = "image_url_forbidden"


class ImageUrlFailed(ServiceError):
    """An allowed image URL did not give an image: the origin failed, timed out, answered too much or something
    that is not an image, or redirected too often."""

    status = 422
    code = "image_url_failed"


class TooManyImageFetches(ServiceError):
    """``LRAEE_MAX_IMAGE_FETCHES`` image URLs are being fetched already; retry after ``Retry-After`` seconds."""

    status = 429
    code = "too_many_image_fetches"

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} image URLs are being fetched already; retry shortly", headers={"Retry-After": "1"})


T = TypeVar("T")


def first_failure_or_results(outcomes: Sequence[T | BaseException], *, batch: bool) -> list[T]:
    """The results of per-image work gathered with ``return_exceptions=True``, in order, or the first failure
    (lowest index) raised; a service error names the image's index when ``batch``."""
    done: list[T] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ServiceError):
            raise outcome.for_image(index) if batch else outcome
        if isinstance(outcome, BaseException):
            raise outcome
        done.append(outcome)
    return done


class StartupError(RuntimeError):
    """The service cannot start (no checkpoint, a checkpoint that does not load); the message says what to fix."""


# The HTTP answer to each refusal of lraee_core.images (the decoder itself knows no HTTP).
_IMAGE_ERRORS: dict[ImageErrorCode, type[ServiceError]] = {
    "empty_image": BadRequest,
    "invalid_image": UnsupportedMediaType,
    "image_too_large": PayloadTooLarge,
    "corrupt_image": InvalidInput,
    "unsupported_image_mode": UnsupportedMediaType,
}


def image_error(exc: ImageError) -> ServiceError:
    """The service error (status by code) for an image the core decoder refused."""
    return _IMAGE_ERRORS[exc.code](str(exc), code=exc.code)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "not_ready",
}


def error_body(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one JSON error shape."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON response in the error shape."""
    return JSONResponse(error_body(status, code, message, details), status_code=status, headers=headers)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)


def validation_details(errors: Any) -> dict[str, Any]:
    """Pydantic errors without the offending input (it may be a megabyte of base64) or unserialisable context."""
    fields = [
        {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
        for error in errors
    ]
    return {"fields": jsonable_encoder(fields)}


def validation_message(errors: Any) -> str:
    """One line naming the first failing field, e.g. ``top_k: Input should be a valid integer``."""
    first = next(iter(errors), None)
    if first is None:
        return "invalid request"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))


async def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    return error_response(422, "validation_error", validation_message(errors), details=validation_details(errors))


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged with its traceback here; the client only learns that something failed, never how.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error type through the one JSON shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
