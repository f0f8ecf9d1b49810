"""Test images built in memory with PIL: every mode and container the hostile-input suite needs."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Save ``image`` to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = RED) -> bytes:
    """A solid RGB PNG."""
    return encode(Image.new("RGB", size, color))


def noise_png(seed: int, size: tuple[int, int] = (24, 24)) -> bytes:
    """A random-noise RGB PNG (distinct images give distinct predictions)."""
    rng = random.Random(seed)
    return encode(Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))))


def jpeg(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = RED) -> bytes:
    """A solid RGB JPEG."""
    return encode(Image.new("RGB", size, color), "JPEG")


def truncated(data: bytes) -> bytes:
    """The first half of an encoded image: the header parses, the pixels do not."""
    return data[: len(data) // 2]


def noisy_jpeg() -> bytes:
    """A JPEG with enough entropy that half of it is really missing pixel data."""
    return encode(Image.open(io.BytesIO(noise_png(1, (64, 64)))), "JPEG", quality=95)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but carries almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    """Two frames: red, then blue."""
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def cmyk_jpeg() -> bytes:
    """A CMYK JPEG."""
    return encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")


def gray16_png() -> bytes:
    """A 16-bit grayscale PNG (mode 'I;16') with a ramp up to 65535."""
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    return encode(Image.fromarray(ramp))


def int32_tiff() -> bytes:
    """A 32-bit integer grayscale TIFF (mode 'I') holding 16-bit values."""
    return encode(Image.new("I", (16, 16), 40000), "TIFF")


def palette_png_with_transparency() -> bytes:
    """A palette PNG whose index 0 (black) is transparent."""
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (8, 0, 16, 16))
    return encode(image, transparency=0)


def rgba_png() -> bytes:
    """A fully transparent black RGBA PNG."""
    return encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)))


def la_png() -> bytes:
    """A half-transparent grayscale + alpha PNG."""
    return encode(Image.new("LA", (16, 16), (0, 128)))


def one_bit_png() -> bytes:
    """A 1-bit PNG."""
    return encode(Image.new("1", (16, 16), 1))


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says 'rotate 90° clockwise to display' (orientation 6): upright it is 20x40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (40, 20), RED), "JPEG", exif=exif.tobytes())
