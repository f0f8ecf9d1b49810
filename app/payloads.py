"""Request bodies of the classify routes: bounded reading, then JSON (base64 images) or multipart (files).

Both forms end as the same :class:`ParsedRequest`: raw image bytes plus :class:`ClassifyOptions`, validated by the
same pydantic model, so the two content types cannot drift apart.

Memory: bodies arrive through app/limits.py, which bounds each one and all of them together. A JSON body is read
into one buffer and parsed, base64 included, on a worker thread (a 40 MB body takes a noticeable time to parse, and
the event loop must keep answering probes meanwhile). A multipart body is never held whole: starlette's parser
streams it, keeping text fields (bounded by the text allowance) in memory and spooling files over 1 MiB to the
temporary directory, from which each image is read back once. An image given by URL (``image_url``) stays a URL
here; the request flow fetches it (app/fetch.py), when the service fetches URLs at all.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

from .errors import (
    BadRequest,
    ClientClosedRequest,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
    validation_details,
    validation_message,
)
from .fetch import ImageUrl
from .schemas import BatchJsonRequest, ClassifyJsonRequest, ClassifyOptions, EmbeddingsRequest
from .settings import MAX_TEMPLATES, Settings

JSON = "application/json"
MULTIPART = "multipart/form-data"
_LIST_FIELDS = ("labels", "templates")  # repeated form fields, or one field holding a JSON list
URL_FIELD = "image_url"  # /classify's image by URL, in a form or a JSON body

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class ParsedRequest:
    """What a classify request asks for, before any image is fetched or decoded."""

    images: list[bytes | ImageUrl]  # encoded image files, or where to fetch them, in request order
    options: ClassifyOptions


def media_type(request: Request) -> str:
    """The request's media type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(kind: str) -> bool:
    """Whether a media type (from :func:`media_type`) is JSON: ``application/json`` or a ``+json`` type."""
    return kind == JSON or kind.endswith("+json")


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole body, refusing more than ``limit`` bytes: by Content-Length up front, then by bytes received
    (a client can lie about, or omit, its Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {declared!r}") from None
        if length > limit:
            raise PayloadTooLarge(f"the request body ({length} bytes) exceeds the limit of {limit} bytes")
    body = bytearray()  # grown in place: no list of chunks joined into a second copy at the end
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            body += chunk
    except ClientDisconnect:
        raise ClientClosedRequest("the client disconnected while sending the body") from None
    return body


def validate_model(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """``data`` as a ``model`` request body; 422 (``validation_error``, the failing fields in details) otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        raise InvalidInput(
            validation_message(errors), code="validation_error", details=validation_details(errors)
        ) from None


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Image bytes from plain base64 or a ``data:<type>;base64,`` URL; line breaks, URL-safe alphabet and missing
    padding are tolerated. Size is checked before decoding."""
    payload = text.strip()
    if payload[:5].lower() == "data:":
        header, comma, payload = payload.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise BadRequest(
                "a data: URL image must be base64-encoded (data:<type>;base64,<data>)", code="invalid_base64"
            )
    payload = "".join(payload.split())
    if not payload:
        raise BadRequest("the image is empty", code="empty_image")
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise PayloadTooLarge(f"the image exceeds {max_bytes} bytes", code="image_too_large")
    payload = payload.replace("-", "+").replace("_", "/") + "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            "the image is not valid base64 (an image URL goes in 'image_url')", code="invalid_base64"
        ) from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}", code="image_too_large")
    return data


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_url(text: str) -> bool:
    """Whether an image string is a URL (``scheme://...``, any scheme: a ``file://`` one is refused as a URL, not
    read as base64) rather than base64 or a ``data:`` URI."""
    return bool(_URL.match(text.lstrip()))


def image_or_url(text: str, max_bytes: int) -> bytes | ImageUrl:
    """An image string as the request flow takes it: a URL to fetch, or decoded bytes (:func:`decode_base64`)."""
    return ImageUrl(text.strip()) if is_url(text) else decode_base64(text, max_bytes)


def json_object(body: bytes | bytearray) -> dict[str, Any]:
    """A JSON body that must be an object: 400 (``invalid_json``) when empty or malformed, 422 for another value.

    A ``bytearray`` (what :func:`read_body` returns) is consumed: emptied once decoded to text, so a big body is not
    held three times (bytes, text, parsed strings) while it is parsed.
    """
    if not body or body.isspace():  # not strip(): that would copy a 60 MB body to look at its ends
        raise BadRequest("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # what json.loads does with bytes
        if isinstance(body, bytearray):
            body.clear()
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidInput("the JSON body must be an object", code="validation_error")
    return data


def _parse_json(body: bytes | bytearray, settings: Settings, *, batch: bool) -> ParsedRequest:
    data = json_object(body)
    parsed = validate_model(BatchJsonRequest if batch else ClassifyJsonRequest, data)
    if isinstance(parsed, BatchJsonRequest):
        encoded = parsed.images
        _check_batch_count(len(encoded), settings)
    else:
        assert isinstance(parsed, ClassifyJsonRequest)
        if parsed.image is None and parsed.image_url is None:
            raise InvalidInput(
                "image: Field required (the image as base64, or 'image_url': a URL to fetch it from)",
                code="validation_error",
            )
        if parsed.image is not None and parsed.image_url is not None:
            raise InvalidInput("send the image once: as 'image' (base64) or as 'image_url'", code="validation_error")
        if parsed.image_url is not None:
            return ParsedRequest([ImageUrl(parsed.image_url)], parsed)
        assert parsed.image is not None
        encoded = [parsed.image]
    images: list[bytes | ImageUrl] = []
    for index, text in enumerate(encoded):
        try:
            images.append(decode_base64(text, settings.max_upload_bytes))
        except (BadRequest, PayloadTooLarge) as exc:
            raise exc.for_image(index) if batch else exc from None
    return ParsedRequest(images, parsed)


def _check_batch_count(count: int, settings: Settings) -> None:
    if count < 1:
        raise InvalidInput("at least one image is required", code="no_images")
    if count > settings.max_batch_images:
        raise InvalidInput(f"too many images: {count} > {settings.max_batch_images}", code="too_many_images")


def _list_field(name: str, values: list[str | UploadFile]) -> list[str]:
    """Repeated text fields, or one field holding a JSON list of strings."""
    texts = []
    for value in values:
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be text fields, not files", code="validation_error")
        texts.append(value)
    if len(texts) == 1 and texts[0].lstrip().startswith("["):
        try:
            parsed = json.loads(texts[0])
        except (ValueError, RecursionError):
            raise InvalidInput(f"{name} looks like a JSON list but is not valid JSON", code=f"invalid_{name}") from None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            raise InvalidInput(f"{name} as one field must be a JSON list of strings", code=f"invalid_{name}")
        return parsed
    return texts


async def _files(form: FormData, name: str, settings: Settings, *, batch: bool) -> list[bytes]:
    values = form.getlist(name)
    images = []
    for index, value in enumerate(values):
        try:
            if not isinstance(value, UploadFile):
                raise UnsupportedMediaType(f"'{name}' must be a file upload", code="invalid_image")
            if value.size is not None and value.size > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"the image is {value.size} bytes; the limit is {settings.max_upload_bytes}", code="image_too_large"
                )
            data = await value.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(f"the image exceeds {settings.max_upload_bytes} bytes", code="image_too_large")
        except (UnsupportedMediaType, PayloadTooLarge) as exc:
            raise exc.for_image(index) if batch else exc from None
        images.append(data)
    return images


async def _one_image(form: FormData, settings: Settings) -> list[bytes | ImageUrl]:
    """A one-image form's image: the file ``image``, or the text field ``image_url``."""
    files, urls = form.getlist("image"), [url for url in form.getlist(URL_FIELD) if url != ""]
    if not files and not urls:
        raise InvalidInput(
            "the multipart field 'image' (a file) is required, or 'image_url' (text)", code="validation_error"
        )
    if (files and urls) or len(urls) > 1:
        raise InvalidInput(
            "send the image once: the multipart field 'image' (a file) or 'image_url' (text)", code="validation_error"
        )
    if files:
        return list(await _files(form, "image", settings, batch=False))
    [url] = urls
    if not isinstance(url, str):
        raise InvalidInput("'image_url' must be a text field, not a file", code="validation_error")
    return [ImageUrl(url)]


async def _parse_multipart(request: Request, settings: Settings, *, batch: bool) -> ParsedRequest:
    image_field = "images" if batch else "image"
    try:
        async with request.form(
            max_files=settings.max_batch_images if batch else 1,
            max_fields=settings.max_labels + MAX_TEMPLATES + 8,
            # A text field may hold every label as one JSON list; files are not parts in this sense (they spool).
            max_part_size=settings.body_limit(0),
        ) as form:
            images: list[bytes | ImageUrl] = []
            if batch:
                _check_batch_count(len(form.getlist(image_field)), settings)
                images.extend(await _files(form, image_field, settings, batch=batch))
            else:
                images.extend(await _one_image(form, settings))
            data: dict[str, Any] = {}
            for name in dict.fromkeys(form.keys()):
                if name in (image_field, URL_FIELD):
                    continue
                values = form.getlist(name)
                if name in _LIST_FIELDS:
                    data[name] = _list_field(name, values)
                elif len(values) == 1 and values[0] == "":
                    continue  # an empty optional form field means "not given" (what HTML forms send)
                else:
                    data[name] = values[0] if len(values) == 1 else values
    except StarletteHTTPException as exc:  # starlette's multipart parser reports limits and syntax this way
        raise BadRequest(f"malformed multipart body: {exc.detail}", code="invalid_multipart") from None
    except ClientDisconnect:
        raise ClientClosedRequest("the client disconnected while sending the body") from None
    return ParsedRequest(images, validate_model(ClassifyOptions, data))


async def parse_classify_request(request: Request, settings: Settings, *, batch: bool) -> ParsedRequest:
    """Read and parse a ``/classify`` (``batch=False``) or ``/classify/batch`` body of either content type."""
    kind = media_type(request)
    if not is_json(kind) and kind != MULTIPART:
        raise UnsupportedMediaType(f"content type {kind or '(none)'!r} is not supported; send {MULTIPART} or {JSON}")
    if kind == MULTIPART:
        return await _parse_multipart(request, settings, batch=batch)
    body = await read_body(request, settings.body_limit(settings.max_batch_images if batch else 1))
    return await asyncio.to_thread(_parse_json, body, settings, batch=batch)


@dataclass(frozen=True)
class ParsedEmbeddings:
    """What a ``/v1/embeddings`` request asks for: texts, or images (bytes or URLs), never both."""

    model: str | None
    texts: list[str] | None
    images: list[bytes | ImageUrl] | None
    dimensions: int | None
    encoding_format: str  # "float" or "base64"


def _is_image_data_uri(text: str) -> bool:
    return text.lstrip()[:11].lower() == "data:image/"


def _parse_embeddings(body: bytes | bytearray, settings: Settings) -> ParsedEmbeddings:
    parsed = validate_model(EmbeddingsRequest, json_object(body))
    inputs: list[Any] = [parsed.input] if isinstance(parsed.input, str) else list(parsed.input)
    if not inputs:
        raise InvalidInput("input must not be empty", code="invalid_input")
    if not all(isinstance(item, str) for item in inputs):
        raise InvalidInput("token-id inputs are not supported; send texts (or images)", code="invalid_input")
    modality = parsed.modality
    if modality is None:
        modality = "image" if all(_is_image_data_uri(item) for item in inputs) else "text"
    if modality == "text":
        if len(inputs) > settings.max_embedding_inputs:
            raise InvalidInput(
                f"too many inputs: {len(inputs)} > {settings.max_embedding_inputs}", code="too_many_inputs"
            )
        for index, text in enumerate(inputs):
            if not text.strip():
                raise InvalidInput(f"input {index} is empty", code="invalid_input", details={"index": index})
            if len(text) > settings.max_embedding_input_chars:
                raise InvalidInput(
                    f"input {index} is {len(text)} characters; the limit is {settings.max_embedding_input_chars}",
                    code="invalid_input",
                    details={"index": index},
                )
        return ParsedEmbeddings(parsed.model, inputs, None, parsed.dimensions, parsed.encoding_format)
    if len(inputs) > settings.max_embedding_images:
        raise InvalidInput(
            f"too many image inputs: {len(inputs)} > {settings.max_embedding_images}", code="too_many_inputs"
        )
    images: list[bytes | ImageUrl] = []
    for index, text in enumerate(inputs):
        try:
            images.append(image_or_url(text, settings.max_upload_bytes))
        except (BadRequest, PayloadTooLarge) as exc:
            raise exc.for_image(index) from None
    return ParsedEmbeddings(parsed.model, None, images, parsed.dimensions, parsed.encoding_format)


async def parse_embeddings_request(request: Request, settings: Settings) -> ParsedEmbeddings:
    """Read and parse a ``/v1/embeddings`` body (JSON; images decoded from base64 off the event loop)."""
    kind = media_type(request)
    if not is_json(kind):
        raise UnsupportedMediaType(f"content type {kind or '(none)'!r} is not supported; send {JSON}")
    body = await read_body(request, settings.body_limit(settings.max_embedding_images))
    return await asyncio.to_thread(_parse_embeddings, body, settings)
