"""The one image decoder: encoded bytes or a file -> one upright RGB PIL image, as the model should see it.

The service, the CLIP trainers, head training, calibration and the benchmarks all read images through
:func:`load_image`, so every stage sees the same pixels: EXIF orientation applied, transparency composited on white,
wide grayscale scaled (not clipped), extreme aspect ratios trimmed around the centre.

Order matters for safety: the format is sniffed from the bytes (never from a file name or a client's content type)
among a short list of plain raster formats, the pixel count is checked from the header before any pixel is decoded,
and only then are the pixels loaded. Every refusal is an :class:`~lraee_core.errors.ImageError` with a code; the
service maps codes to HTTP statuses.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

# Plain raster formats only (JPEG covers phones' multi-picture MPO files). Unrestricted, PIL would also try EPS
# (which runs Ghostscript), PSD, ICNS and dozens more.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# The service's default bomb guard (width x height); LRAEE_MAX_IMAGE_PIXELS overrides it there.
DEFAULT_MAX_PIXELS = 40_000_000
# Beyond this aspect ratio the long side is trimmed before resizing: the model only sees the centre square, and
# resizing a 1 x 40,000,000 strip so that its short side is 224 would build a multi-gigapixel intermediate.
MAX_ASPECT_RATIO = 4
_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def set_pil_pixel_limit(max_pixels: int) -> None:
    """PIL's own bomb guard (process-wide): ``Image.open`` refuses twice this many pixels even if our check is off."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def load_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: int | None = MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode an encoded image (bytes, or the path of an image file) into the RGB image the model should see.

    The first frame of an animation is used. ``max_aspect_ratio=None`` keeps the full frame (for callers that crop
    themselves, e.g. random-resized-crop augmentation). Raises :class:`~lraee_core.errors.ImageError` with code
    ``empty_image``, ``invalid_image`` (not an image in an accepted format, or an unreadable file),
    ``image_too_large`` (more than ``max_pixels`` pixels), ``corrupt_image`` (truncated or damaged) or
    ``unsupported_image_mode`` (pixels that have no RGB form).
    """
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {source}: {exc.strerror or exc}", code="invalid_image") from exc
    image = decode_rgb(data, max_pixels=max_pixels)
    return image if max_aspect_ratio is None else trim_aspect_ratio(image, max_aspect_ratio)


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image (first frame of animations), without trimming.

    Raises :class:`~lraee_core.errors.ImageError`; see :func:`load_image` for the codes.
    """
    image = check_image(data, max_pixels=max_pixels)
    try:
        image.load()  # the first frame only: PIL opens animations on frame 0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image has too many pixels: {exc}", code="image_too_large") from exc
    except Exception as exc:  # decoders of untrusted data fail in many ways (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"the {image.format} image is truncated or corrupt: {exc}", code="corrupt_image") from exc
    try:
        return to_rgb(_upright(image))
    except Exception as exc:  # a mode PIL cannot turn into RGB
        raise ImageError(
            f"cannot convert a {image.format} image in mode {image.mode} to RGB", code="unsupported_image_mode"
        ) from exc


def check_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The header checks of :func:`decode_rgb` alone (format sniffed from the bytes, pixel count), no pixel decoded:
    the opened, not yet loaded image. Cheap enough to refuse a non-image before any costlier work on its request.

    Raises :class:`~lraee_core.errors.ImageError` with code ``empty_image``, ``invalid_image``, ``image_too_large``
    or ``corrupt_image`` (a header with no pixels).
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)", code="empty_image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image has too many pixels: {exc}", code="image_too_large") from exc
    except Exception as exc:  # UnidentifiedImageError mostly; plugins' header parsers also raise odd things
        raise ImageError(
            f"not a decodable image; accepted formats: {', '.join(ACCEPTED_FORMATS)}", code="invalid_image"
        ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            code="image_too_large",
        )
    if width < 1 or height < 1:
        raise ImageError(f"the image is {width}x{height} pixels", code="corrupt_image")
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways); malformed EXIF leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF is metadata noise, not a reason to reject the pixels
        return image


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
