"""Promises that hold when the photos change: a real service (HTTP, batcher, shadow sampler, threshold controller,
``/thresholds``, ``/metrics``) fed a stream of shifted photos made here (grayscale, blurred, low resolution, JPEG at
quality 8), then clean photos again.

The tiny test checkpoint's heads and gates are random, so which photo would leave where, and whether its exit would
agree with the full depth, is anybody's guess. The engine's answers are therefore a stand-in that reads each photo:
its gate probability is a fixed pseudo-random function of the pixels, and an exit disagrees with the full depth only
on a shifted (smooth) photo whose gate probability is below 0.7. Which rows leave follows each row's own exit rule,
the thresholds the controller hands the request, exactly as in the engine. The test knows the answer: at the
calibrated `fast` threshold (0.3) 70% of the shifted photos leave and 4 in 7 of those disagree (agreement ~60%
against a 90% promise); from a threshold of 0.6 (`accurate`'s) the promise holds.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from app.main import create_app
from lraee_core.engine import ExitResult, LabelQuery, Prediction

from .conftest import multipart, running
from .test_shadow import scrape_async

LABELS = ["a cat", "a dog"]
PROMISE = 0.9
SURE = 0.7  # a shifted photo's exit agrees with the full depth from this gate probability up
FLOPS_FULL = 1000
EXIT_LAYER = 9  # the stand-in's exits leave at the first candidate layer


@pytest.fixture(scope="module")
def promised_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with two promised points: `fast` (90%, gate threshold 0.3 at layer 9) and `accurate`
    (99%, 0.6), so fast's calibrated curve runs 0.3 -> 0.6 -> 1.0 (never leave)."""
    directory = tmp_path_factory.mktemp("promised")
    for path in tiny_checkpoint.iterdir():
        shutil.copy(path, directory / path.name)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = 4
    manifest["operating_points"] = {
        "fast": {"promise": PROMISE, "label_cap": None, "thresholds": {"2": {str(EXIT_LAYER): 0.3}}},
        "accurate": {"promise": 0.99, "label_cap": None, "thresholds": {"2": {str(EXIT_LAYER): 0.6}}},
    }
    manifest.pop("promises", None)
    manifest.pop("label_caps", None)
    manifest["default_operating_point"] = "fast"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def photo(seed: int) -> Image.Image:
    """A clean 'photo': coloured discs on a coloured ground with sensor noise."""
    rng = random.Random(seed)
    image = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x, y, r = rng.randrange(96), rng.randrange(96), rng.randrange(6, 30)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    pixels = np.asarray(image).astype(np.int16) + np.random.default_rng(seed).integers(-40, 41, (96, 96, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def clean(seed: int) -> bytes:
    return encode(photo(seed), "PNG")


def shifted(seed: int) -> bytes:
    """The same kind of photo, as a bad camera and a bad pipeline deliver it: grayscale, Gaussian blur (r = 2),
    24 x 24 pixels, JPEG at quality 8."""
    image = photo(seed).convert("L").filter(ImageFilter.GaussianBlur(2)).resize((24, 24), Image.Resampling.BILINEAR)
    return encode(image.convert("RGB"), "JPEG", quality=8)


def sharpness(image: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels of a preprocessed image [3, H, W]."""
    return float((image[:, :, 1:] - image[:, :, :-1]).abs().mean())


def gate_probability(image: torch.Tensor) -> float:
    """A fixed pseudo-random function of the pixels, uniform enough over [0, 1)."""
    return float((image.double().abs().sum() * 7919.0) % 1.0)


class StandIn:
    """``classify_rows`` of an engine whose exits are known (see the module docstring)."""

    def __init__(self, smooth_below: float) -> None:
        self.smooth_below = smooth_below  # sharpness under which a photo counts as shifted

    def __call__(self, images: torch.Tensor, queries: Sequence[LabelQuery]) -> list[ExitResult]:
        results = []
        for image, query in zip(images, queries, strict=True):
            labels = query.labels
            full = (Prediction(labels[0], 0.9), *(Prediction(label, 0.1) for label in labels[1:]))
            gate = gate_probability(image)
            threshold = query.rule.thresholds.get(EXIT_LAYER, 1.0) if query.rule.evaluate_heads else 1.0
            if threshold < 1.0 and gate >= threshold:
                wrong = sharpness(image) < self.smooth_below and gate < SURE
                answer = (Prediction(labels[1], 0.6), Prediction(labels[0], 0.4)) if wrong else full
                flops = FLOPS_FULL * EXIT_LAYER // 12 + 10
                results.append(
                    ExitResult(answer[: query.top_k], EXIT_LAYER, 12, "head", gate, flops, 1 - flops / FLOPS_FULL, 1000)
                )
            else:
                results.append(ExitResult(full[: query.top_k], 12, 12, "full", None, FLOPS_FULL, 0.0, FLOPS_FULL))
        return results


async def run_pass(client: Any, photos: list[bytes], operating_point: str = "fast") -> tuple[float, float]:
    """Send every photo through /classify, eight at a time; (agreement with the full depth, mean FLOPs saved)."""
    answers = []
    for start in range(0, len(photos), 8):
        responses = await asyncio.gather(
            *(
                client.post("/classify", **multipart(image, LABELS, operating_point=operating_point))
                for image in photos[start : start + 8]
            )
        )
        answers += [response.json() for response in responses]
        await asyncio.sleep(0.005)  # idle time between clients' bursts: the shadow checks run here
    agreed = sum(answer["predictions"][0]["label"] == LABELS[0] for answer in answers)  # the stand-in's full answer
    return agreed / len(answers), sum(answer["flops_saved"] for answer in answers) / len(answers)


async def fast_band(client: Any) -> dict[str, Any]:
    state = (await client.get("/thresholds")).json()
    [band] = [band for band in state["bands"] if band["operating_point"] == "fast"]
    return dict(band)


@pytest.mark.slow
@pytest.mark.anyio
async def test_shifted_photos_raise_the_thresholds_until_the_promise_holds_and_clean_photos_relax_them(
    make_settings: Any, promised_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(checkpoint=promised_checkpoint, shadow_rate=1.0))
    shifted_photos = [shifted(seed) for seed in range(100)]
    clean_photos = [clean(seed) for seed in range(1000, 1100)]
    async with running(app) as client:
        service = app.state.runtime.models.default.service
        smooth = [sharpness(service.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))) for data in shifted_photos]
        sharp = [sharpness(service.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))) for data in clean_photos]
        assert max(smooth) < min(sharp)  # the stand-in can tell the streams apart by the pixels alone
        monkeypatch.setattr(service.classifier, "classify_rows", StandIn((max(smooth) + min(sharp)) / 2))

        clean_agreement, clean_saved = await run_pass(client, clean_photos)
        assert clean_agreement == 1.0 and (await fast_band(client))["offset"] == 0.0

        first, _ = await run_pass(client, shifted_photos)
        assert first < 0.75  # the calibrated thresholds break the promise on shifted photos
        await run_pass(client, shifted_photos)  # warm-up: two passes in all
        band = await fast_band(client)
        assert band["offset"] >= 1.0 and band["corrections"]["raise"] >= 1
        assert min(float(t) for t in band["thresholds"].values()) >= 0.6 - 1e-9
        restored, shifted_saved = await run_pass(client, shifted_photos)
        assert restored >= PROMISE - 0.01 and shifted_saved > 0.0  # kept, and some exits still pay

        for _ in range(3):  # clean photos again: the thresholds come back down, never below the calibrated ones
            await run_pass(client, clean_photos)
            assert float((await fast_band(client))["thresholds"][str(EXIT_LAYER)]) >= 0.3
        band = await fast_band(client)
        assert band["offset"] == 0.0 and band["corrections"]["relax"] >= 1
        again, saved_again = await run_pass(client, clean_photos)
        assert again == 1.0 and saved_again >= 0.8 * clean_saved

        state = (await client.get("/thresholds")).json()
        directions = [change["direction"] for change in state["changes"]]
        assert state["enabled"] and "raise" in directions and directions[-1] == "relax"
        samples = scrape_async(await client.get("/metrics"))
        corrections = {
            labels["direction"]: value
            for labels, value in samples["lraee_threshold_corrections_total"]
            if labels["operating_point"] == "fast"
        }
        assert corrections["raise"] == directions.count("raise") and corrections["relax"] == directions.count("relax")
        offsets = {labels["operating_point"]: value for labels, value in samples["lraee_threshold_offset"]}
        assert offsets == {"fast": 0.0, "accurate": 0.0}
        promises = {
            labels["operating_point"]: value for labels, value in samples["lraee_promise_broken"] if labels["labels"]
        }
        assert promises["fast"] == 0.0
        estimate = [
            value
            for labels, value in samples["lraee_agreement_estimate"]
            if labels["operating_point"] == "fast" and labels["bound"] == "estimate"
        ]
        assert estimate and estimate[0] >= PROMISE

        # A reset puts the calibrated thresholds back and says so.
        reset = (await client.post("/thresholds/reset", params={"operating_point": "fast"})).json()
        assert reset["changes"][-1]["direction"] == "reset"
        assert (await client.post("/thresholds/reset", params={"operating_point": "nope"})).status_code == 422


@pytest.mark.anyio
async def test_the_threshold_state_is_behind_the_api_key(make_settings: Any, promised_checkpoint: Path) -> None:
    app = create_app(make_settings(checkpoint=promised_checkpoint, api_key="sesame"))
    async with running(app) as client:
        assert (await client.get("/thresholds")).status_code == 401
        assert (await client.post("/thresholds/reset")).status_code == 401
        state = (await client.get("/thresholds", headers={"X-API-Key": "sesame"})).json()
        assert state["enabled"] and state["shadow_rate"] == 0.25  # both on by default
        assert {band["operating_point"] for band in state["bands"]} == {"fast", "accurate"}
        assert all(band["offset"] == 0.0 and band["verdict"] == "unknown" for band in state["bands"])


@pytest.mark.anyio
async def test_without_promises_or_with_the_control_off_the_calibrated_thresholds_stay(make_settings: Any) -> None:
    async with running(create_app(make_settings())) as client:  # the tiny checkpoint promises nothing
        state = (await client.get("/thresholds")).json()
        assert state == {
            "model": "untrained",
            "enabled": False,
            "shadow_rate": 0.25,
            "bands": [],
            "changes": [],
            "config": {},
        }
