"""The one decoder: modes, orientation, animations, bombs, truncation, files (lraee_core/images.py, no HTTP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lraee_core.errors import ImageError
from lraee_core.images import DEFAULT_MAX_PIXELS, check_image, load_image, trim_aspect_ratio
from lraee_core.paths import photos_root
from tests.app import imagegen

LIMIT = DEFAULT_MAX_PIXELS
PHOTOS_TAR = photos_root() / "tiny-val.tar"


def decode(data: bytes) -> Image.Image:
    return load_image(data, max_pixels=LIMIT)


def test_rgb_png_passes_through() -> None:
    image = decode(imagegen.png((5, 3)))
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == imagegen.RED


def test_one_by_one() -> None:
    assert decode(imagegen.png((1, 1))).size == (1, 1)


def test_exif_orientation_is_applied() -> None:
    assert decode(imagegen.exif_rotated_jpeg()).size == (20, 40)


def test_animated_gif_uses_the_first_frame() -> None:
    assert decode(imagegen.animated_gif()).getpixel((0, 0)) == imagegen.RED


def test_transparency_is_composited_on_white() -> None:
    assert decode(imagegen.rgba_png()).getpixel((0, 0)) == (255, 255, 255)
    palette = decode(imagegen.palette_png_with_transparency())
    assert palette.getpixel((0, 0)) == (255, 255, 255)  # transparent index
    assert palette.getpixel((15, 0)) == imagegen.RED  # opaque index
    pixel = decode(imagegen.la_png()).getpixel((0, 0))
    assert isinstance(pixel, tuple) and len(pixel) == 3 and 120 <= pixel[0] <= 135  # black at alpha 128 over white


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    pixels = np.asarray(decode(imagegen.gray16_png()))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert 100 < np.median(pixels) < 155  # a ramp stays a ramp (PIL's convert would make most of it white)
    assert decode(imagegen.int32_tiff()).getpixel((0, 0)) == (155, 155, 155)  # 40000 / 257


@pytest.mark.parametrize("data", [imagegen.cmyk_jpeg(), imagegen.one_bit_png()], ids=["cmyk", "1-bit"])
def test_other_modes_become_rgb(data: bytes) -> None:
    assert decode(data).mode == "RGB"


def test_empty_bytes() -> None:
    with pytest.raises(ImageError) as info:
        decode(b"")
    assert info.value.code == "empty_image"


@pytest.mark.parametrize("data", [b"hello, world", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"https://example.com/cat.jpg"])
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        decode(data)
    assert info.value.code == "invalid_image"


@pytest.mark.parametrize(
    "data", [imagegen.truncated(imagegen.noisy_jpeg()), imagegen.truncated(imagegen.png((64, 64)))]
)
def test_truncated(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        decode(data)
    assert info.value.code == "corrupt_image"


def test_bomb_is_refused_from_the_header() -> None:
    with pytest.raises(ImageError) as info:
        decode(imagegen.png_claiming(100_000, 100_000))
    assert info.value.code == "image_too_large"


def test_the_header_check_refuses_what_decoding_would_without_decoding_pixels() -> None:
    """``check_image`` gives the decoder's own refusals for non-images, empty and too-large images from the header;
    a truncated image passes it (its pixels are only read by decoding, which then refuses it)."""
    for data, code in ((b"", "empty_image"), (b"hello, world", "invalid_image")):
        with pytest.raises(ImageError) as info:
            check_image(data)
        assert info.value.code == code
    with pytest.raises(ImageError) as info:
        check_image(imagegen.png_claiming(100_000, 100_000))
    assert info.value.code == "image_too_large"
    truncated = imagegen.truncated(imagegen.png((64, 64)))
    opened = check_image(truncated)
    assert opened.size == (64, 64) and opened.format == "PNG"
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode(truncated)


def test_pixel_limit_is_ours_not_only_pils() -> None:
    with pytest.raises(ImageError, match="17x17|289") as info:
        load_image(imagegen.png((17, 17)), max_pixels=288)
    assert info.value.code == "image_too_large"


def test_extreme_aspect_ratio_is_trimmed_around_the_centre() -> None:
    strip = Image.new("RGB", (1000, 10))
    assert trim_aspect_ratio(strip).size == (40, 10)
    assert trim_aspect_ratio(strip.transpose(Image.Transpose.ROTATE_90)).size == (10, 40)
    square = Image.new("RGB", (30, 20))
    assert trim_aspect_ratio(square) is square


def test_unconvertible_mode_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    import lraee_core.images

    def refuse(image: Image.Image) -> Image.Image:
        raise ValueError(f"conversion from {image.mode} to RGB not supported")

    monkeypatch.setattr(lraee_core.images, "to_rgb", refuse)
    with pytest.raises(ImageError) as info:
        decode(imagegen.png())
    assert info.value.code == "unsupported_image_mode"


def test_a_file_decodes_like_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "sideways.jpg"
    path.write_bytes(imagegen.exif_rotated_jpeg())
    from_file, from_bytes = load_image(path), load_image(path.read_bytes())
    assert from_file.size == from_bytes.size == (20, 40)  # the file path gets the EXIF rotation too
    assert from_file.tobytes() == from_bytes.tobytes()
    assert load_image(str(path)).tobytes() == from_bytes.tobytes()


def test_an_unreadable_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "missing.jpg")
    assert info.value.code == "invalid_image"


def test_trimming_can_be_left_to_the_caller() -> None:
    strip = imagegen.png((200, 10))
    assert load_image(strip).size == (40, 10)
    assert load_image(strip, max_aspect_ratio=None).size == (200, 10)


@pytest.mark.skipif(not PHOTOS_TAR.is_file(), reason=f"real photos absent ({PHOTOS_TAR})")
def test_a_real_photo_is_the_plain_rgb_decode(tmp_path: Path) -> None:
    """An ordinary RGB JPEG without EXIF comes out pixel-identical to PIL's plain decode."""
    import tarfile

    with tarfile.open(PHOTOS_TAR) as tar:
        member = next(m for m in tar if m.isfile() and m.name.lower().endswith(".jpeg"))
        extracted = tar.extractfile(member)
        assert extracted is not None
        path = tmp_path / "photo.jpeg"
        path.write_bytes(extracted.read())
    with Image.open(path) as plain:
        expected = plain.convert("RGB")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == expected.size
    assert image.tobytes() == expected.tobytes()
