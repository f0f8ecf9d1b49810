"""Comparisons derived from the measured rows, the targets, and the text / Markdown renderings of a result.

Every ratio is the quotient of two medians stored in the same result file (so a reader can recompute it), taken in
the same run: nothing is compared across runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .exit_mix import MIX_CYCLE
from .timing import median
from .workloads import LARGE_BATCH, RowResult

METRICS = ("batch1_images_per_s", "batch32_images_per_s")
BATCH_OF_METRIC = {"batch1_images_per_s": 1, "batch32_images_per_s": 32}
FP32 = "openclip_fp32"
TORCH_INT8 = "torch_int8"
ORT_INT8 = "ort_int8"
MIX_SUFFIX = "_paper_mix"
SERVICE_PREFIX = "lraee_service_"  # rows of the service's engine (bench.under_test.SERVICE_ENGINE)
# Issue 14's "done when", chased and never asserted: (numerator rows, denominator, metric) -> target.
TARGET_DEFAULT_VS_FP32 = 1.5  # default model: the service's engine at its default operating point, b1 and b32
TARGET_VS_FP32 = 2.6  # ViT-B-32: LRA-EE at the paper mix vs open_clip FP32, batch 32
TARGET_VS_ORT = 1.1  # ViT-B-32: LRA-EE at the paper mix vs ORT INT8 full depth, batch 32
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
    time_saving: float  # median over rounds of 1 - row pass seconds / reference pass seconds
    flops_saving: float  # mean FLOPs saving the engine reported for the row's images
    ratio: float | None  # time_saving / flops_saving (None when the row saved no FLOPs)
    time_saving_min: float  # the smallest and largest per-round saving (spread)
    time_saving_max: float


def _target(numerator: str, denominator: str, metric: str, default_point_key: str | None) -> float | None:
    if numerator.endswith(MIX_SUFFIX) and metric == "batch32_images_per_s":
        return {FP32: TARGET_VS_FP32, ORT_INT8: TARGET_VS_ORT}.get(denominator)
    if numerator == default_point_key and denominator == FP32:
        return TARGET_DEFAULT_VS_FP32
    return None


def ratios(rows: Sequence[RowResult], default_point_key: str | None = None) -> list[Ratio]:
    """Baselines against each other, every LRA-EE row against the baselines; the rows issue 14 names carry its
    targets (``default_point_key``: the service's engine at the default operating point)."""
    by_key = {row.key: row for row in rows}
    pairs: list[tuple[str, str]] = [(TORCH_INT8, FP32), (ORT_INT8, FP32), (ORT_INT8, TORCH_INT8)]
    for row in rows:
        if row.key.startswith("lraee_") and not row.key.endswith("_full_depth"):
            pairs += [(row.key, FP32), (row.key, ORT_INT8), (row.key, TORCH_INT8)]
    found = []
    for numerator, denominator in pairs:
        if numerator in by_key and denominator in by_key:
            for metric in METRICS:
                value = getattr(by_key[numerator], metric) / getattr(by_key[denominator], metric)
                found.append(
                    Ratio(
                        numerator,
                        denominator,
                        metric,
                        value,
                        _target(numerator, denominator, metric, default_point_key),
                    )
                )
    return found


def _paired_saving(row_passes: Sequence[float], reference_passes: Sequence[float]) -> list[float]:
    """Per interleaved round: 1 - row pass seconds / reference pass seconds (same images, same round)."""
    return [1.0 - row / reference for row, reference in zip(row_passes, reference_passes, strict=True)]


def efficiencies(rows: Sequence[RowResult]) -> list[Efficiency]:
    """Realized wall-clock saving over engine-reported FLOPs saving, for every row with a full-depth reference.

    The time saving is the median over the interleaved rounds of each round's own saving (the row and its
    reference timed back to back), so a burst of load from elsewhere lands on both sides of one comparison."""
    by_key = {row.key: row for row in rows}
    found = []
    for row in rows:
        reference = by_key.get(row.full_depth_reference or "")
        if reference is None:
            continue
        for metric, saving, row_passes, reference_passes in (
            ("batch1_images_per_s", row.flops_saving_batch1, row.batch1_pass_s, reference.batch1_pass_s),
            ("batch32_images_per_s", row.flops_saving_batch32, row.batch32_pass_s, reference.batch32_pass_s),
        ):
            if saving is None:
                continue
            per_round = _paired_saving(row_passes, reference_passes)
            time_saving = median(per_round)
            ratio = time_saving / saving if saving > 1e-6 else None
            found.append(
                Efficiency(row.key, reference.key, metric, time_saving, saving, ratio, min(per_round), max(per_round))
            )
    return found


def standing(backbone: dict[str, Any]) -> list[str]:
    """Where the rows issue 14 names stand against its targets, one line each."""
    lines = []
    for item in backbone["ratios"]:
        target = item["target"]
        if target is None:
            continue
        value = item["value"]
        verdict = "meets" if value >= target else f"short by {(1 - value / target) * 100:.0f}%"
        lines.append(
            f"{item['numerator']} vs {item['denominator']}, batch {BATCH_OF_METRIC[item['metric']]}: {value:.2f}x, "
            f"target >= {target}x: {verdict}"
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


def _other_processes(meta: dict[str, Any]) -> list[str]:
    lines = []
    for when in ("before", "after"):
        busy = meta.get(f"other_processes_{when}") or []
        if busy:
            lines.append(f"Busiest processes {when} the run (pid %cpu elapsed command):")
            lines += [f"    {line}" for line in busy]
    return lines


def _percent_with_spread(value: float, low: float, high: float) -> str:
    return f"{value * 100:.1f}% [{low * 100:.0f}-{high * 100:.0f}]"


def _with_spread(images_per_s: float, passes: Sequence[float], images_per_pass: int) -> str:
    """The median images/s with the slowest and fastest timed pass's."""
    rates = [images_per_pass / seconds for seconds in passes]
    return f"{images_per_s:.1f} [{min(rates):.0f}-{max(rates):.0f}]"


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
        "the medians below, all from this run. Rows were timed in interleaved rounds (each round: one pass of every "
        "row); [min-max] is the spread over those rounds.",
        *_other_processes(meta),
        "",
    ]
    for name, backbone in result["backbones"].items():
        lines += [f"{heading}{name}: {backbone['description']}", ""]
        lines += [f"- {note}" for note in backbone["notes"]]
        lines.append("")
        lines += _table(
            ["row", "b1 img/s [min-max]", "b32 img/s [min-max]", "p50 ms", "p95 ms", "FLOPs saved b32", "run RSS MiB"],
            (
                [
                    row["title"],
                    _with_spread(row["batch1_images_per_s"], row["batch1_pass_s"], MIX_CYCLE),
                    _with_spread(row["batch32_images_per_s"], row["batch32_pass_s"], LARGE_BATCH),
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
            "Early exit: realized wall-clock saving / engine-reported FLOPs saving (vs the same engine at full depth, "
            "paired round by round):",
            "",
        ]
        lines += _table(
            ["row", "batch", "time saved [min-max over rounds]", "FLOPs saved", "ratio"],
            (
                [
                    e["row"],
                    str(BATCH_OF_METRIC[e["metric"]]),
                    _percent_with_spread(e["time_saving"], e["time_saving_min"], e["time_saving_max"]),
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
        by_rows = backbone["block_anatomy"].get("by_rows", [])
        if by_rows:
            counts = by_rows[0]["rows"]
            lines += [
                "",
                "One block (block 1), ms per image, by the rows in the call (a batch of 32 keeps "
                f"{', '.join(map(str, counts))} rows running before and past each exit of the assumed mix):",
                "",
            ]
            lines += _table(
                ["backend", *(f"{count} rows" for count in counts)],
                ([t["backend"], *(_fmt(ms, 2) for ms in t["ms_per_image"])] for t in by_rows),
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


def _cpu_split(split: dict[str, float] | None) -> str:
    """A level's server CPU per request by thread group (bench.service.CPU_GROUPS), or why it is missing."""
    if split is None:
        return "not measured"  # no /proc here, or a run from before the split was recorded
    return " / ".join(f"{split[group]:.2f}" for group in ("event loop", "decode", "text", "inference", "total"))


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
        [
            "clients",
            "req/s",
            "p50 ms",
            "p95 ms",
            "requests",
            "vs in-process",
            "server CPU",
            "client CPU",
            "server ms",
            "server CPU ms/request: loop / decode / text / inference / total",
        ],
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
                _cpu_split(level.get("server_cpu_ms_per_request")),
            ]
            for level in service["levels"]
        ),
        markdown,
    )
    lines += [f"  error: {sample}" for sample in service.get("error_samples", [])]
    return lines
