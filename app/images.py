"""Safe image decoding: untrusted bytes -> one RGB PIL image -> the model's input tensor.

Order matters for safety: the format is sniffed from the bytes (never from a client's content type) among a short
list of plain raster formats, the pixel count is checked from the header before any pixel is decoded, and only then
are the pixels loaded. Anything PIL cannot decode is the client's problem (4xx), never a 500.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import BadRequest, InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType

# Plain raster formats only (JPEG covers phones' multi-picture MPO files). Unrestricted, PIL would also try EPS
# (which runs Ghostscript), PSD, ICNS and dozens more.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Beyond this aspect ratio the long side is trimmed before resizing: the model only sees the centre square, and
# resizing a 1 x 40,000,000 strip so that its short side is 224 would build a multi-gigapixel intermediate.
MAX_ASPECT_RATIO = 4
_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def set_pil_pixel_limit(max_pixels: int) -> None:
    """PIL's own bomb guard (process-wide): ``Image.open`` refuses twice this many pixels even if our check is off."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit RGB, scaled rather than clipped (PIL's convert clips at 255)."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and pixels.size and float(np.nanmax(pixels)) <= 1.0:
        pixels = pixels * 255.0  # float images are usually 0..1
    elif pixels.size and float(pixels.max()) > 255.0:
        pixels = pixels / 257.0  # 16-bit range (PNG/TIFF 'I;16', or 'I' holding 16-bit data) onto 0..255
    eight_bit = np.clip(np.nan_to_num(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, wide grayscale scaled, CMYK/palette/1-bit converted."""
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels often carry arbitrary (black) colour underneath; white is what viewers show.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_rgb(image)
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image (first frame of animations).

    Raises :class:`BadRequest` (empty), :class:`UnsupportedMediaType` (not an image in an accepted format),
    :class:`PayloadTooLarge` (more than ``max_pixels`` pixels) or :class:`InvalidInput` (truncated / corrupt).
    """
    if not data:
        raise BadRequest("the image is empty (0 bytes)", code="empty_image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the image has too many pixels: {exc}", code="image_too_large") from exc
    except Exception as exc:  # UnidentifiedImageError mostly; plugins' header parsers also raise odd things
        raise UnsupportedMediaType(
            f"not a decodable image; accepted formats: {', '.join(ACCEPTED_FORMATS)}", code="invalid_image"
        ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            code="image_too_large",
        )
    if width < 1 or height < 1:
        raise InvalidInput(f"the image is {width}x{height} pixels", code="invalid_image")
    try:
        image.load()  # the first frame only: PIL opens animations on frame 0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the image has too many pixels: {exc}", code="image_too_large") from exc
    except Exception as exc:  # decoders of untrusted data fail in many ways (OSError, SyntaxError, struct.error, ...)
        raise InvalidInput(f"the {image.format} image is truncated or corrupt: {exc}", code="corrupt_image") from exc
    try:
        return to_rgb(_upright(image))
    except Exception as exc:  # a mode PIL cannot turn into RGB
        raise UnsupportedMediaType(
            f"cannot convert a {image.format} image in mode {image.mode} to RGB", code="unsupported_image_mode"
        ) from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways); malformed EXIF leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF is metadata noise, not a reason to reject the pixels
        return image


def trim_aspect_ratio(image: Image.Image, max_ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop the long side to ``max_ratio`` x the short side.

    CLIP preprocessing resizes the short side and centre-crops a square, so the trimmed margins are never seen; this
    only bounds the size of the resized intermediate.
    """
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= max_ratio * short:
        return image
    if width > height:
        left = (width - max_ratio * short) // 2
        return image.crop((left, 0, left + max_ratio * short, height))
    top = (height - max_ratio * short) // 2
    return image.crop((0, top, width, top + max_ratio * short))


@dataclass(frozen=True)
class DecodedImage:
    """One image ready for the engine."""

    tensor: torch.Tensor  # [3, H, W], preprocessed for the backbone
    seconds: float  # decode + preprocess time


Preprocess = Callable[[Image.Image], Any]


class ImageDecoder:
    """Decodes and preprocesses images on a small thread pool so the event loop never touches pixels."""

    def __init__(self, preprocess: Preprocess, *, max_pixels: int, workers: int = 2) -> None:
        self._preprocess = preprocess
        self._max_pixels = max_pixels
        # One torch thread per decode worker: the inference worker owns the cores' intra-op parallelism.
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="lraee-decode", initializer=torch.set_num_threads, initargs=(1,)
        )

    def decode_one(self, data: bytes) -> DecodedImage:
        """Bytes -> preprocessed tensor (blocking; runs on the pool)."""
        start = time.perf_counter()
        image = trim_aspect_ratio(decode_image(data, max_pixels=self._max_pixels))
        tensor = self._preprocess(image)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise TypeError(f"the backbone's preprocess returned {type(tensor).__name__}, expected a [3, H, W] tensor")
        return DecodedImage(tensor=tensor, seconds=time.perf_counter() - start)

    async def decode(self, images: Sequence[bytes], *, batch: bool) -> list[DecodedImage]:
        """Decode all ``images`` concurrently; the first bad one (lowest index) fails the whole request.

        With ``batch`` the error names the image's index.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, self.decode_one, data) for data in images]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        decoded: list[DecodedImage] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ServiceError):
                raise outcome.for_image(index) if batch else outcome
            if isinstance(outcome, BaseException):
                raise outcome
            decoded.append(outcome)
        return decoded

    def close(self) -> None:
        """Stop the pool; queued decodes are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
