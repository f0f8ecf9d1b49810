"""/metrics: every metric present with the expected (bounded) labels; one registry per app."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app

from . import imagegen
from .conftest import multipart


def scrape(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for sample_labels, v in samples[name] if sample_labels == labels]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


MODEL = "untrained"  # the served name of the tiny test checkpoint (its checkpoint id)


def test_every_metric_with_its_labels(make_settings: Any) -> None:
    with TestClient(create_app(make_settings())) as client:
        before = scrape(client)
        # Series exist before any traffic: one per candidate layer plus the full path, at 0.
        for layer in ("9", "11", "12", "full"):
            assert value(before, "lraee_exit_layer_total", model=MODEL, layer=layer) == 0
        assert value(before, "lraee_queue_depth", model=MODEL) == 0
        assert (
            value(
                before,
                "lraee_model_info",
                model=MODEL,
                backbone="lraee-tiny-vit12",  # the architecture alone: no weights path on /metrics
                quant_mode="paper",
                checkpoint="untrained",
            )
            == 1
        )
        misses_before = value(before, "lraee_text_cache_misses_total", model=MODEL)
        hits_before = value(before, "lraee_text_cache_hits_total", model=MODEL)

        labels = ["metric-a", "metric-b", "metric-c"]
        answers = []
        for _ in range(2):  # the second request's labels all come from the cache
            answers.append(client.post("/classify", **multipart(imagegen.png(), labels=labels)))
        answers.append(client.post("/classify", **multipart(imagegen.png(), labels, operating_point="never")))
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert client.post("/classify", **multipart(b"not an image")).status_code == 415
        assert client.get("/nowhere/123").status_code == 404
        assert client.get("/readyz").status_code == 200

        after = scrape(client)
        assert value(after, "lraee_requests_total", route="/classify", status="200") == 3
        assert value(after, "lraee_requests_total", route="/classify", status="415") == 1
        assert value(after, "lraee_requests_total", route="other", status="404") == 1
        assert value(after, "lraee_requests_total", route="/readyz", status="200") == 1
        routes = {labels["route"] for labels, _ in after["lraee_requests_total"]}
        assert not any("123" in route for route in routes)  # templates, not raw paths
        assert value(after, "lraee_request_duration_seconds_count", route="/classify") == 4
        assert value(after, "lraee_inference_seconds_count", model=MODEL) == 3
        assert value(after, "lraee_exit_layer_total", model=MODEL, layer="full") == 1  # the "never" request
        assert sum(v for _, v in after["lraee_exit_layer_total"]) == 3
        assert value(after, "lraee_flops_saved_ratio_count", model=MODEL) == 3
        # The FLOPs counters add up what the responses reported (GFLOPs there), so a dashboard's compute-weighted
        # saving 1 - spent / full is the responses' saving.
        spent = sum(answer.json()["flops"] for answer in answers) * 1e9
        full = sum(a.json()["flops"] / (1 - a.json()["flops_saved"]) for a in answers) * 1e9
        assert value(after, "lraee_flops_total", model=MODEL) == pytest.approx(spent, rel=1e-3)
        assert value(after, "lraee_flops_full_total", model=MODEL) == pytest.approx(full, rel=1e-3)
        buckets = {labels["le"] for labels, _ in after["lraee_batch_size_bucket"]}
        assert buckets == {"1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "+Inf"}
        assert value(after, "lraee_batch_size_count", model=MODEL) == 3
        assert value(after, "lraee_queue_depth", model=MODEL) == 0
        # The refused image's request had its (new, default) labels left alone: a non-image is refused from its
        # header before any text work.
        assert value(after, "lraee_text_cache_misses_total", model=MODEL) == misses_before + len(labels)
        assert value(after, "lraee_text_cache_hits_total", model=MODEL) == hits_before + 2 * len(labels)


def test_apps_have_their_own_registries(make_settings: Any) -> None:
    first, second = create_app(make_settings()), create_app(make_settings())
    first.state.runtime.metrics.requests.labels(route="/x", status="200").inc()
    assert second.state.runtime.metrics.requests.labels(route="/x", status="200")._value.get() == 0
