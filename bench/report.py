"""Comparisons derived from the measured rows, the targets, and the text / Markdown renderings of a result.

Every ratio is the quotient of two medians stored in the same result file (so a reader can recompute it), taken in
the same run: nothing is compared across runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .workloads import RowResult

METRICS = ("batch1_images_per_s", "batch32_images_per_s")
BATCH_OF_METRIC = {"batch1_images_per_s": 1, "batch32_images_per_s": 32}
FP32 = "openclip_fp32"
TORCH_INT8 = "torch_int8"
ORT_INT8 = "ort_int8"
MIX_SUFFIX = "_paper_mix"
TARGET_VS_FP32 = 2.6  # LRA-EE at the paper mix vs open_clip FP32
TARGET_VS_ORT = 1.15  # LRA-EE at the paper mix vs ORT INT8 full depth
TARGET_SERVICE = 0.9  # service requests/s vs in-process images/s at the server's max batch size
TARGET_EFFICIENCY = 0.9  # realized time saving / FLOPs saving


@dataclass(frozen=True)
class Ratio:
    """numerator row's metric / denominator row's metric."""

    numerator: str  # row key
    denominator: str  # row key
    metric: str  # one of METRICS
    value: float
    target: float | None  # what the project chases (never asserted)


@dataclass(frozen=True)
class Efficiency:
    """How much of an early-exit row's FLOPs saving shows up as wall-clock saving."""

    row: str  # the early-exit row
    reference: str  # the same engine forced to full depth (thresholds 1.0)
    metric: str  # one of METRICS
    time_saving: float  # 1 - reference images/s / row images/s
    flops_saving: float  # mean FLOPs saving the engine reported for the row's images
    ratio: float | None  # time_saving / flops_saving (None when the row saved no FLOPs)


def ratios(rows: Sequence[RowResult]) -> list[Ratio]:
    """Baselines against each other, every LRA-EE row against the baselines (mix rows carry the targets)."""
    by_key = {row.key: row for row in rows}
    pairs: list[tuple[str, str, float | None]] = [(TORCH_INT8, FP32, None), (ORT_INT8, FP32, None)]
    pairs.append((ORT_INT8, TORCH_INT8, None))
    for row in rows:
        if not row.key.startswith("lraee_") or row.key.endswith("_full_depth"):
            continue
        mix = row.key.endswith(MIX_SUFFIX)
        pairs.append((row.key, FP32, TARGET_VS_FP32 if mix else None))
        pairs.append((row.key, ORT_INT8, TARGET_VS_ORT if mix else None))
        pairs.append((row.key, TORCH_INT8, None))
    found = []
    for numerator, denominator, target in pairs:
        if numerator in by_key and denominator in by_key:
            for metric in METRICS:
                value = getattr(by_key[numerator], metric) / getattr(by_key[denominator], metric)
                found.append(Ratio(numerator, denominator, metric, value, target))
    return found


def efficiencies(rows: Sequence[RowResult]) -> list[Efficiency]:
    """Realized wall-clock saving over engine-reported FLOPs saving, for every row with a full-depth reference."""
    by_key = {row.key: row for row in rows}
    found = []
    for row in rows:
        reference = by_key.get(row.full_depth_reference or "")
        if reference is None:
            continue
        for metric, saving in (
            ("batch1_images_per_s", row.flops_saving_batch1),
            ("batch32_images_per_s", row.flops_saving_batch32),
        ):
            if saving is None:
                continue
            time_saving = 1.0 - getattr(reference, metric) / getattr(row, metric)
            ratio = time_saving / saving if saving > 1e-6 else None
            found.append(Efficiency(row.key, reference.key, metric, time_saving, saving, ratio))
    return found


def standing(backbone: dict[str, Any]) -> list[str]:
    """Where the best LRA-EE row stands against each target, one line each."""
    lines = []
    for target, denominator in ((TARGET_VS_FP32, FP32), (TARGET_VS_ORT, ORT_INT8)):
        for metric in METRICS:
            candidates = [
                r
                for r in backbone["ratios"]
                if r["denominator"] == denominator and r["metric"] == metric and r["numerator"].endswith(MIX_SUFFIX)
            ]
            if not candidates:
                continue
            best = max(candidates, key=lambda r: r["value"])
            verdict = "meets" if best["value"] >= target else f"short by {(1 - best['value'] / target) * 100:.0f}%"
            lines.append(
                f"LRA-EE at the paper mix vs {denominator}, batch {BATCH_OF_METRIC[metric]}: best {best['value']:.2f}x "
                f"({best['numerator']}), target >= {target}x: {verdict}"
            )
    for level in (backbone.get("service") or {}).get("levels", []):
        value = level["ratio_to_in_process"]
        verdict = "meets" if value >= TARGET_SERVICE else f"short by {(1 - value / TARGET_SERVICE) * 100:.0f}%"
        lines.append(
            f"service at {level['concurrency']} clients vs in-process batch "
            f"{backbone['service']['max_batch_size']}: {value:.2f}x, target >= {TARGET_SERVICE}x: {verdict}"
        )
    for item in backbone["early_exit_efficiency"]:
        if item["row"].endswith(MIX_SUFFIX) and item["metric"] == "batch32_images_per_s" and item["ratio"] is not None:
            verdict = "meets" if item["ratio"] >= TARGET_EFFICIENCY else "below"
            lines.append(
                f"early-exit efficiency {item['row']} at batch 32: {item['ratio']:.2f} "
                f"(target >= {TARGET_EFFICIENCY}): {verdict}"
            )
    return lines


def advice(backbone: dict[str, Any]) -> list[str]:
    """What bounds the targets, from this run's own numbers."""
    lines = []
    saving = backbone["flops"].get("paper_mix_saving")
    rows = {row["key"]: row for row in backbone["rows"]}
    if saving is not None and ORT_INT8 in rows:
        ceiling = 1 / (1 - saving)
        lines.append(
            f"The assumed mix saves {saving * 100:.1f}% of the FLOPs, so early exit alone can make a backend at most "
            f"{ceiling:.3f}x faster than itself at full depth; >= {TARGET_VS_ORT}x ORT INT8 therefore needs an LRA-EE "
            f"backend whose full-depth speed is >= {TARGET_VS_ORT / ceiling:.2f}x ORT INT8's."
        )
        for key in (k for k in rows if k.endswith("_full_depth")):
            speed = rows[key]["batch32_images_per_s"] / rows[ORT_INT8]["batch32_images_per_s"]
            lines.append(f"  {key}: full-depth speed {speed:.2f}x ORT INT8 at batch 32")
    profile = backbone.get("block_anatomy", {}).get("profile_paper_batch32", {})
    if profile:
        parts = ", ".join(f"{group} {share * 100:.0f}%" for group, share in profile.items())
        lines.append(f"torch INT8 paper block at batch 32, self CPU time: {parts}")
    return lines


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], body: Iterable[Sequence[str]], markdown: bool) -> list[str]:
    body = [list(map(str, line)) for line in body]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return out + ["| " + " | ".join(line) + " |" for line in body]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    out = [
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    ]
    out.append("  ".join("-" * w for w in widths))
    for line in body:
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        )
    return out


def render(result: dict[str, Any], *, markdown: bool = False) -> str:
    """The whole result as a plain-text report (``markdown=False``) or Markdown."""
    meta = result["meta"]
    heading = "## " if markdown else "== "
    lines = [
        ("# " if markdown else "") + "LRA-EE benchmark",
        "",
        f"{meta['timestamp']}  commit {meta['git_commit']}  threads {meta['threads']}  repeats {meta['repeats']} "
        f"(warm-up {meta['warmup']})  {'QUICK  ' if meta['quick'] else ''}load average before/after "
        f"{meta['load_average_before']} / {meta['load_average_after']}",
        f"torch {meta['versions']['torch']}, open_clip {meta['versions']['open_clip']}, onnxruntime "
        f"{meta['versions']['onnxruntime']}, {meta['cpu_count']} CPUs. Figures are medians; ratios are quotients of "
        "the medians below, all from this run.",
        "",
    ]
    for name, backbone in result["backbones"].items():
        lines += [f"{heading}{name}: {backbone['description']}", ""]
        lines += [f"- {note}" for note in backbone["notes"]]
        lines.append("")
        lines += _table(
            ["row", "b1 img/s", "b32 img/s", "p50 ms", "p95 ms", "FLOPs saved b32", "run RSS MiB"],
            (
                [
                    row["title"],
                    _fmt(row["batch1_images_per_s"]),
                    _fmt(row["batch32_images_per_s"]),
                    _fmt(row["latency_p50_ms"], 2),
                    _fmt(row["latency_p95_ms"], 2),
                    "-" if row["flops_saving_batch32"] is None else f"{row['flops_saving_batch32'] * 100:.1f}%",
                    _fmt(row["run_rss_growth_mib"]),
                ]
                for row in backbone["rows"]
            ),
            markdown,
        )
        lines += ["", "Ratios (images/s over images/s):", ""]
        lines += _table(
            ["numerator", "denominator", "b1", "b32", "target"],
            _ratio_lines(backbone["ratios"]),
            markdown,
        )
        lines += [
            "",
            "Early exit: realized wall-clock saving / engine-reported FLOPs saving (vs same engine, full depth):",
            "",
        ]
        lines += _table(
            ["row", "batch", "time saved", "FLOPs saved", "ratio"],
            (
                [
                    e["row"],
                    str(BATCH_OF_METRIC[e["metric"]]),
                    f"{e['time_saving'] * 100:.1f}%",
                    f"{e['flops_saving'] * 100:.1f}%",
                    _fmt(e["ratio"], 2),
                ]
                for e in backbone["early_exit_efficiency"]
            ),
            markdown,
        )
        flops = backbone["flops"]
        text = backbone["text"]
        lines += [
            "",
            f"Heads + gates at all {len(backbone['candidate_layers'])} candidate layers: "
            f"{flops['head_plus_gate_share'] * 100:.2f}% of full-depth FLOPs ({backbone['labels']} labels).",
            f"Text embeddings of {text['labels']} labels x {text['templates']} templates: cold {text['cold_s']:.2f} s "
            f"(median of {len(text['cold_runs_s'])}), cached {text['cached_s'] * 1e3:.2f} ms "
            f"(median of {len(text['cached_runs_s'])}); cold/cached {text['cold_over_cached']:.0f}x.",
            *_trimmed_line(text),
            "",
            "One block (block 1), ms per image:",
            "",
        ]
        lines += _table(
            ["backend", "batch 1", "batch 32"],
            (
                [t["backend"], _fmt(t["batch1_ms_per_image"], 2), _fmt(t["batch32_ms_per_image"], 2)]
                for t in backbone["block_anatomy"]["timings"]
            ),
            markdown,
        )
        lines += ["", "Set-up (not in any figure above): seconds and resident memory added per component:", ""]
        setup = backbone["setup"]
        lines += _table(
            ["component", "seconds", "RSS MiB"],
            (
                [component, _fmt(seconds), _fmt(setup["rss_growth_mib"].get(component))]
                for component, seconds in setup["seconds"].items()
            ),
            markdown,
        )
        lines += ["", *_service_lines(backbone.get("service"), markdown), ""]
        lines += ["Where we stand (targets are chased, never asserted):", ""]
        lines += [f"- {line}" for line in backbone["standing"]]
        lines += ["", "What bounds them:", ""]
        lines += [f"- {line}" for line in backbone["advice"]]
        lines.append("")
    lines.append(f"Peak RSS of the benchmark process (ru_maxrss): {result['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines) + "\n"


def _trimmed_line(text: dict[str, Any]) -> list[str]:
    if text.get("full_context_cold_s") is None:
        return []
    return [
        f"  open_clip's full-context encode_text (prompts padded): cold {text['full_context_cold_s']:.2f} s;"
        f" the engine's context trimmed to the longest prompt is {text['full_context_cold_s'] / text['cold_s']:.1f}x "
        f"faster, max |difference| {text['full_context_max_abs_difference']:.1e} on the FP16 embeddings."
    ]


def _ratio_lines(items: Sequence[dict[str, Any]]) -> list[list[str]]:
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for item in items:
        entry = merged.setdefault((item["numerator"], item["denominator"]), {"target": item["target"]})
        entry[item["metric"]] = item["value"]
    return [
        [
            numerator,
            denominator,
            _fmt(values.get("batch1_images_per_s"), 2),
            _fmt(values.get("batch32_images_per_s"), 2),
            "-" if values["target"] is None else f">= {values['target']}",
        ]
        for (numerator, denominator), values in merged.items()
    ]


def _service_lines(service: dict[str, Any] | None, markdown: bool) -> list[str]:
    if not service:
        return ["Service: not run."]
    if "skipped" in service:
        return [f"Service: SKIPPED - {service['skipped']}"]
    lines = [
        f"Service ({service['transport']}, {service['labels']} labels per request): in-process engine at batch "
        f"{service['max_batch_size']} = {service['in_process_images_per_s']:.1f} img/s; errors {service['errors']}",
        "",
    ]
    lines += _table(
        ["clients", "req/s", "p50 ms", "p95 ms", "requests", "vs in-process", "server CPU", "client CPU", "server ms"],
        (
            [
                str(level["concurrency"]),
                _fmt(level["requests_per_s"]),
                _fmt(level["latency_p50_ms"]),
                _fmt(level["latency_p95_ms"]),
                str(level["requests"]),
                f"{level['ratio_to_in_process']:.2f}x",
                f"{level['server_cpu_cores']:.2f} cores",
                f"{level['client_cpu_cores']:.2f} cores",
                " ".join(f"{name} {value:.1f}" for name, value in level["server_timing_ms"].items()) or "-",
            ]
            for level in service["levels"]
        ),
        markdown,
    )
    lines += [f"  error: {sample}" for sample in service.get("error_samples", [])]
    return lines
