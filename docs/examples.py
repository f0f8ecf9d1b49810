"""Re-record the client examples (docs/api.md) against a real service: ``python -m docs.examples`` from the repo root.

It starts the service as ``make serve`` does (``uvicorn app.main:create_app --factory``, the default checkpoint and
backend unless ``LRAEE_*`` variables say otherwise) on a free loopback port, then prints:

1. the banana ``curl`` (the second request with those labels, so their embeddings come from the cache), re-indented,
   and the same photo at ``operating_point=full``;
2. the seven-label check: the 18 ILSVRC val photos of the cat, car, elephant, mountain-bike, banana and school-bus
   classes in ``imagenet-val-acuity.tar``, top-1 and exit block at every operating point;
3. the Hugging Face client's answer for the school bus (docs/api.md's example), the compat endpoint's headers, and
   the client's error on a bad image.

1 and 2 are a look at real photos through every operating point; the pages show no recorded figures of theirs.

The photos are read from the shared photo folder (``training.embedded.photos.source_dir``) into a temporary folder,
never copied into the project.
Nothing is written back: the pages' examples are edited by hand from this output.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from app.local_server import ServerNotReady, start_server
from training.embedded import photos as shared_photos

BANANA = "n07753592/ILSVRC2012_val_00023220.JPEG"
BUS = "n04146614/ILSVRC2012_val_00031163.JPEG"
SEVEN = ["cat", "dog", "car", "banana", "truck", "elephant", "bicycle"]
# The seven-label check's classes and the label that is right for each (None: no label of the seven names it).
CHECK = {
    "n02123045": "cat",  # tabby cat
    "n02123159": "cat",  # tiger cat
    "n02123394": "cat",  # Persian cat
    "n02123597": "cat",  # Siamese cat
    "n04285008": "car",  # sports car
    "n04037443": "car",  # race car
    "n02504458": "elephant",  # African bush elephant
    "n02504013": "elephant",  # Asian elephant
    "n03792782": "bicycle",  # mountain bike
    "n07753592": "banana",
    "n04146614": None,  # school bus
}
POINTS = ("accurate", "balanced", "fast", "full")
HF_LABELS = ["school bus", "sports car", "lion", "banana", "teapot"]


def extract(acuity: Path, folder: Path) -> dict[str, Path]:
    """The photos this script sends, by tar member name."""
    wanted = {BANANA, BUS}
    photos: dict[str, Path] = {}
    with tarfile.open(acuity) as archive:
        for info in archive:
            if info.isfile() and (info.name in wanted or info.name.split("/")[0] in CHECK):
                data = archive.extractfile(info)
                assert data is not None
                path = folder / info.name.replace("/", "_")
                path.write_bytes(data.read())
                photos[info.name] = path
    return photos


def curl_classify(url: str, image: Path, labels: list[str], *extra: str) -> dict[str, object]:
    """``curl -s -F image=@... -F labels=... ... URL/classify``, as a user types it."""
    command = ["curl", "-s", "-F", f"image=@{image}"]
    for label in labels:
        command += ["-F", f"labels={label}"]
    for field in extra:
        command += ["-F", field]
    answer: dict[str, object] = json.loads(subprocess.run([*command, f"{url}/classify"], check=True,
                                                          capture_output=True, text=True).stdout)  # fmt: skip
    return answer


def main() -> None:
    try:
        acuity = shared_photos.source_dir() / shared_photos.TARS["acuity"][0]
    except shared_photos.PhotosUnavailable as error:
        sys.exit(f"the examples need the shared photos: {error}")
    server = start_server({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    url = server.base_url
    try:
        try:
            server.wait_until_ready(300)
        except ServerNotReady as error:
            sys.exit(f"the service did not become ready: {error}")
        model = httpx.get(f"{url}/model").json()
        backend = os.environ.get("LRAEE_BACKEND", "the default")
        print(f"# {time.strftime('%Y-%m-%d')}: {model['model']}, exits {model['candidate_layers']}, backend {backend}")
        with tempfile.TemporaryDirectory() as tmp:
            photos = extract(acuity, Path(tmp))
            banana = photos[BANANA]
            curl_classify(url, banana, SEVEN, "top_k=3")  # the first request fills the label cache
            print("## 1. banana, seven labels, top_k=3 (second request)")
            print(json.dumps(curl_classify(url, banana, SEVEN, "top_k=3"), indent=4))
            full = curl_classify(url, banana, SEVEN, "top_k=1", "operating_point=full")
            print("full:", json.dumps(full["predictions"]), "exit_layer", full["exit_layer"])

            print("\n## 2. seven-label check: member, right label, then top-1@exit block per point")
            right = dict.fromkeys(POINTS, 0)
            agree = dict.fromkeys(POINTS, 0)
            for member in sorted(m for m in photos if m.split("/")[0] in CHECK):
                truth = CHECK[member.split("/")[0]]
                answers = {p: curl_classify(url, photos[member], SEVEN, "top_k=1", f"operating_point={p}")
                           for p in POINTS}  # fmt: skip
                tops = {p: a["predictions"][0]["label"] for p, a in answers.items()}  # type: ignore[index]
                for point in POINTS:
                    right[point] += tops[point] == truth
                    agree[point] += tops[point] == tops["full"]
                row = "  ".join(f"{p}={tops[p]}@{answers[p]['exit_layer']}" for p in POINTS)
                print(f"{member}  right={truth}  {row}")
            count = sum(1 for m in photos if m.split("/")[0] in CHECK)
            print(f"right of {count}:", right, " agree with full:", agree)

            print("\n## 3. Hugging Face client (huggingface_hub), the school bus")
            from huggingface_hub import InferenceClient
            from huggingface_hub.errors import HfHubHTTPError

            client = InferenceClient(model=f"{url}/compat/huggingface")
            for element in client.zero_shot_image_classification(str(photos[BUS]), candidate_labels=HF_LABELS):
                print(element)
            body = {
                "inputs": base64.b64encode(photos[BUS].read_bytes()).decode(),
                "parameters": {
                    "candidate_labels": ["school bus", "lion"],
                    "hypothesis_template": "This is a photo of {}.",
                },
            }
            reply = httpx.post(f"{url}/compat/huggingface", json=body)
            print(reply.status_code, {k: v for k, v in reply.headers.items() if k.startswith("x-lraee")})
            print(reply.text)
            try:
                client.zero_shot_image_classification(b"not an image", candidate_labels=["a", "b"])
                print("a bad image was accepted")
            except HfHubHTTPError as error:
                print("bad image:", error.response.status_code if error.response is not None else "?", str(error)[:200])
    finally:
        server.stop(30)


if __name__ == "__main__":
    main()
