"""The service's side of decoding (app/images.py): core refusals become HTTP errors, batches name the bad image."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import get_args

import pytest
import torch
from PIL import Image

from app.errors import BadRequest, InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType, image_error
from app.images import ImageDecoder
from lraee_core.errors import ImageError, ImageErrorCode
from lraee_core.images import DEFAULT_MAX_PIXELS

from . import imagegen


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.zeros(3, image.height, image.width)


@pytest.fixture
def decoder() -> Iterator[ImageDecoder]:
    decoder = ImageDecoder(to_tensor, max_pixels=DEFAULT_MAX_PIXELS, workers=1)
    yield decoder
    decoder.close()


@pytest.mark.parametrize(
    ("data", "error", "status", "code"),
    [
        (b"", BadRequest, 400, "empty_image"),
        (b"hello, world", UnsupportedMediaType, 415, "invalid_image"),
        (imagegen.truncated(imagegen.noisy_jpeg()), InvalidInput, 422, "corrupt_image"),
        (imagegen.png_claiming(100_000, 100_000), PayloadTooLarge, 413, "image_too_large"),
    ],
    ids=["empty", "not-an-image", "truncated", "bomb"],
)
def test_core_refusals_become_http_errors(
    decoder: ImageDecoder, data: bytes, error: type[ServiceError], status: int, code: str
) -> None:
    with pytest.raises(error) as info:
        decoder.decode_one(data)
    assert info.value.status == status and info.value.code == code
    assert isinstance(info.value.__cause__, ImageError)


def test_every_core_code_has_a_client_status() -> None:
    for code in get_args(ImageErrorCode):
        answer = image_error(ImageError("refused", code=code))
        assert 400 <= answer.status < 500 and answer.code == code


def test_the_decoded_tensor_is_the_trimmed_upright_image(decoder: ImageDecoder) -> None:
    assert decoder.decode_one(imagegen.exif_rotated_jpeg()).tensor.shape == (3, 40, 20)
    assert decoder.decode_one(imagegen.png((200, 10))).tensor.shape == (3, 10, 40)


def test_a_batch_names_its_first_bad_image(decoder: ImageDecoder) -> None:
    images = [imagegen.png(), b"not an image", b""]
    with pytest.raises(UnsupportedMediaType) as info:
        asyncio.run(decoder.decode(images, batch=True))
    assert info.value.details == {"index": 1} and info.value.message.startswith("image 1: ")
