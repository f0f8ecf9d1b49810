"""Live check of the monitoring stack without Docker: real service, real Prometheus, every dashboard query.

``python -m deploy.check [--checkpoint DIR]`` starts the service (uvicorn, loopback) and a Prometheus whose config is
the project's own ``deploy/prometheus/prometheus.yml`` with only the service discovery swapped for the local target,
sends real classification traffic (and some deliberate 4xx), waits for the scrapes, then runs every panel query of
``deploy/grafana/dashboards/lraee.json`` against Prometheus's HTTP API. It fails when a query returns no series, or
only NaN: a panel that would show "No data" to an operator. Both processes are stopped whatever happens.

The service runs with shadow sampling on (``LRAEE_SHADOW_RATE=1``), so the agreement panel has data. The rules of
``deploy/prometheus/rules.yml`` are checked twice: by ``promtool check rules`` and ``promtool test rules`` (the
alert fires below an operating point's promise on synthetic series), and live: every rule must evaluate without
error in the real Prometheus and every recording rule must return data from the real traffic.

What it cannot check: the images, compose networking (Docker DNS, nginx) and Grafana rendering; see deploy/README.md.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image, ImageDraw

from app.local_server import free_port, uvicorn_command
from lraee_core.paths import REPO_ROOT

PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES = PROMETHEUS_CONFIG.parent / "rules.yml"
PROMETHEUS_RULE_TESTS = PROMETHEUS_CONFIG.parent / "rules_test.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "lraee.json"
SERVICE_PORT = 8000  # the port the deploy files scrape; the check's own uvicorn listens on a free one instead
SCRAPE_INTERVAL = "1s"  # the check's scrape interval, so it needs seconds rather than minutes of traffic
# What Grafana would put in place of its built-in variables, given the 1 s scrape interval above.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1s",
    "__interval_ms": "1000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
# The dashboard's own variables at "All" (their allValue): the model selector covers every served model.
DASHBOARD_VARIABLES = {"model": ".+"}
GRAFANA_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)")
LABEL_SETS = (
    ("cat", "dog", "car"),
    ("red square", "blue circle", "green triangle", "yellow star"),
    ("a stripe pattern", "a checkerboard", "a plain colour"),
    ("sunrise", "night sky", "forest", "ocean", "desert"),
)
TEMPLATES = ("a photo of a {}.", "a drawing of {}.")
APT_INSTALL = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus"


class CheckError(Exception):
    """A step of the check failed; the message says what and, where known, why."""


class PrometheusUnavailable(CheckError):
    """No ``prometheus`` binary, and none could be installed here."""


@dataclass(frozen=True)
class PanelTarget:
    """One query of one dashboard panel."""

    title: str  # panel title
    ref_id: str  # the target's refId within the panel ("A", "B", ...)
    expr: str  # PromQL as written in the dashboard, Grafana variables included


@dataclass(frozen=True)
class QueryOutcome:
    """What Prometheus answered to one panel query."""

    target: PanelTarget
    promql: str  # the query actually sent (variables substituted)
    series: int  # result series (1 for a scalar)
    values: tuple[float, ...]  # each series' value

    @property
    def ok(self) -> bool:
        """Data a panel can show: at least one series with a number."""
        return any(not math.isnan(value) for value in self.values)


def find_prometheus() -> Path:
    """Path of the ``prometheus`` binary; installs Debian's package when missing, running as root with apt-get."""
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    can_install = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not can_install:
        raise PrometheusUnavailable(
            "the `prometheus` binary is not on PATH and cannot be installed here (needs root and apt-get); "
            "install it (Debian/Ubuntu: `apt-get install prometheus`) or pass --prometheus PATH"
        )
    print(f"prometheus not found; installing it: {APT_INSTALL}", flush=True)
    try:
        done = subprocess.run(["sh", "-c", APT_INSTALL], capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as error:
        raise PrometheusUnavailable("installing prometheus with apt-get took more than 10 minutes") from error
    found = shutil.which("prometheus")
    if done.returncode != 0 or not found:
        raise PrometheusUnavailable(f"installing prometheus with apt-get failed:\n{done.stdout[-2000:]}{done.stderr}")
    return Path(found)


def local_prometheus_config(base: dict[str, Any], target: str, base_dir: Path) -> tuple[dict[str, Any], str]:
    """The project's Prometheus config with the service's discovery replaced by the static ``target``.

    The service's job is the one whose ``dns_sd_configs`` name port 8000. Job name, metrics path, scheme and
    relabelling stay as written; the scrape interval becomes 1 s, and scrape credentials go (the check's service
    runs without ``LRAEE_API_KEY``). Jobs for anything else are dropped (their targets do not exist here), and so is
    ``alerting``. Returns the config and the service job's name.
    """
    config = copy.deepcopy(base)
    global_section = config.setdefault("global", {})
    global_section["scrape_interval"] = SCRAPE_INTERVAL
    global_section["scrape_timeout"] = SCRAPE_INTERVAL  # may not exceed the interval
    global_section["evaluation_interval"] = SCRAPE_INTERVAL  # rules see the check's seconds of traffic
    config.pop("alerting", None)
    if "rule_files" in config:
        config["rule_files"] = [str(base_dir / pattern) for pattern in config["rule_files"]]
    service_jobs = []
    for job in config.get("scrape_configs") or []:
        if not any(sd.get("port") == SERVICE_PORT for sd in job.get("dns_sd_configs") or []):
            continue
        replaced = ("static_configs", "authorization", "basic_auth", "oauth2")
        for key in [key for key in job if key.endswith("_sd_configs") or key in replaced]:
            del job[key]
        job["static_configs"] = [{"targets": [target]}]
        job["scrape_interval"] = SCRAPE_INTERVAL
        job["scrape_timeout"] = SCRAPE_INTERVAL
        service_jobs.append(job)
    if len(service_jobs) != 1:
        raise CheckError(
            f"expected exactly one scrape job discovering the service with dns_sd_configs on port {SERVICE_PORT}, "
            f"found {len(service_jobs)}"
        )
    config["scrape_configs"] = service_jobs
    return config, str(service_jobs[0]["job_name"])


def panel_targets(dashboard: dict[str, Any]) -> list[PanelTarget]:
    """Every query of every panel, rows' nested panels included, in dashboard order."""
    found: list[PanelTarget] = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    found.append(PanelTarget(panel.get("title", ""), target.get("refId", ""), target["expr"]))
            visit(panel.get("panels") or [])

    visit(dashboard.get("panels") or [])
    return found


def grafana_to_promql(expr: str) -> str:
    """``expr`` with Grafana's built-in variables and the dashboard's own (at "All") replaced; other variables are
    refused."""
    known = {**GRAFANA_BUILTINS, **DASHBOARD_VARIABLES}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in known:
            raise CheckError(f"the check knows no value for the dashboard variable ${name} in: {expr}")
        return known[name]

    return GRAFANA_VARIABLE.sub(substitute, expr)


class Deadline:
    """The check's whole time budget; every wait takes what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds remaining (never negative)."""
        return max(0.0, self.end - time.monotonic())

    def wait_for(self, what: str, ready: Callable[[], bool], poll: float = 0.25) -> None:
        """Poll ``ready`` until it is true; CheckError naming ``what`` when time runs out."""
        while True:
            if ready():
                return
            if self.left() <= 0:
                raise CheckError(f"timed out waiting for {what}")
            time.sleep(min(poll, self.left()))


@contextmanager
def running(name: str, command: list[str], log_path: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with its output in ``log_path``; stop it on exit (SIGTERM, then SIGKILL after 10 s)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    print(f"{name} ignored SIGTERM for 10 s; killing it", flush=True)
                    process.kill()
                    process.wait()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a process log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_ok(url: str, process: subprocess.Popen[bytes], name: str, log_path: Path) -> Callable[[], bool]:
    """A readiness predicate: ``url`` answers 200; CheckError at once when ``process`` has exited."""

    def ready() -> bool:
        if process.poll() is not None:
            raise CheckError(f"{name} exited with status {process.returncode}:\n{log_tail(log_path)}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return ready


def png_image(seed: int) -> bytes:
    """A small PNG of random shapes on a random background (sizes vary, so preprocessing resizes)."""
    rng = random.Random(seed)
    size = (rng.randint(48, 160), rng.randint(48, 160))
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        box = (x0, y0, x0 + rng.randint(8, size[0] // 2), y0 + rng.randint(8, size[1] // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def good_request(client: httpx.Client, index: int, operating_point: str) -> int:
    """One valid classification: single or batch, multipart or JSON, rotating label sets (repeats hit the cache)."""
    options: dict[str, Any] = {"labels": list(LABEL_SETS[index % len(LABEL_SETS)]), "operating_point": operating_point}
    kind = index % 4
    if kind == 0:
        response = client.post("/classify", files={"image": ("image.png", png_image(index), "image/png")}, data=options)
    elif kind == 1:
        image = base64.b64encode(png_image(index)).decode()
        response = client.post("/classify", json={"image": image, "templates": list(TEMPLATES), **options})
    elif kind == 2:
        files = [("images", (f"{i}.png", png_image(index * 10 + i), "image/png")) for i in range(3)]
        response = client.post("/classify/batch", files=files, data={"top_k": "2", **options})
    else:
        images = [base64.b64encode(png_image(index * 10 + i)).decode() for i in range(2)]
        response = client.post("/classify/batch", json={"images": images, **options})
    if response.status_code != 200:
        raise CheckError(f"a valid request got {response.status_code}: {response.text[:500]}")
    return response.status_code


def bad_request(client: httpx.Client, index: int) -> int:
    """One deliberately invalid request, so the error panels have data; it must get a 4xx."""
    image = base64.b64encode(png_image(index)).decode()
    kind = index % 5
    if kind == 0:
        response = client.post(
            "/classify", files={"image": ("x.png", b"not an image", "image/png")}, data={"labels": "a"}
        )
    elif kind == 1:
        response = client.post("/classify", json={"image": image, "labels": []})
    elif kind == 2:
        response = client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    elif kind == 3:
        response = client.post("/classify", json={"image": image, "labels": ["a", "b"], "operating_point": "nope"})
    else:
        response = client.get("/no-such-route")
    if not 400 <= response.status_code < 500:
        raise CheckError(f"a deliberately invalid request got {response.status_code}: {response.text[:500]}")
    return response.status_code


def send_traffic(base_url: str, good: int, bad: int, workers: int = 4) -> list[int]:
    """``good`` valid and ``bad`` invalid requests, interleaved, ``workers`` at a time; their status codes.

    The valid ones rotate over the checkpoint's operating points, so images leave at different layers (the
    exit-layer panels show a mix rather than one layer) whatever the checkpoint.
    """
    with httpx.Client(base_url=base_url, timeout=60) as client, ThreadPoolExecutor(workers) as pool:
        operating_points = sorted(client.get("/model").raise_for_status().json()["operating_points"])
        jobs: list[Callable[[httpx.Client], int]] = [
            partial(good_request, index=i, operating_point=operating_points[i % len(operating_points)])
            for i in range(good)
        ]
        for i in range(bad):
            jobs.insert((i * len(jobs)) // max(1, bad), partial(bad_request, index=i))
        return list(pool.map(lambda job: job(client), jobs))


class PrometheusApi:
    """The few calls of Prometheus's HTTP API the check makes."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def query(self, promql: str) -> dict[str, Any]:
        """Instant query at the current time; the ``data`` member of the answer."""
        response = httpx.get(f"{self.base_url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise CheckError(f"Prometheus rejected {promql!r}: {body.get('error', response.text[:300])}")
        return dict(body["data"])

    def scrapes_since(self, job: str, since: float) -> int:
        """Successful scrapes of ``job`` with a timestamp after ``since`` (Unix time)."""
        window = int(time.time() - since)  # whole seconds, so the window starts after ``since``
        if window < 1:
            return 0
        result = self.query(f'sum_over_time(up{{job="{job}"}}[{window}s])')["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def rule_groups(self) -> list[dict[str, Any]]:
        """The rule groups Prometheus has loaded, with each rule's health and last evaluation."""
        response = httpx.get(f"{self.base_url}/api/v1/rules", timeout=10)
        return list(response.json()["data"]["groups"])

    def target_errors(self) -> str:
        """Scrape errors of the active targets, for a message when scrapes do not succeed."""
        targets = httpx.get(f"{self.base_url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return "; ".join(f"{t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}" for t in targets)


def wait_for_scrapes(prometheus: PrometheusApi, job: str, since: float, count: int, deadline: Deadline) -> None:
    """Wait until Prometheus has scraped the service successfully ``count`` times after ``since``."""
    try:
        deadline.wait_for(
            f"{count} successful scrapes of job {job!r}", lambda: prometheus.scrapes_since(job, since) >= count
        )
    except CheckError as error:
        raise CheckError(f"{error}; targets: {prometheus.target_errors()}") from error


def run_panel_queries(prometheus: PrometheusApi, targets: list[PanelTarget]) -> list[QueryOutcome]:
    """Each panel target as an instant query now (sample values arrive as strings, "NaN" included)."""
    outcomes = []
    for target in targets:
        promql = grafana_to_promql(target.expr)
        data = prometheus.query(promql)
        if data["resultType"] == "scalar":
            values: tuple[float, ...] = (float(data["result"][1]),)
        elif data["resultType"] == "vector":
            values = tuple(float(series["value"][1]) for series in data["result"])
        else:  # a matrix: the dashboard asks for an instant range selector
            values = tuple(float(series["values"][-1][1]) for series in data["result"])
        outcomes.append(QueryOutcome(target, promql, len(values), values))
    return outcomes


def promtool_for(prometheus_binary: Path) -> Path | None:
    """The promtool beside ``prometheus_binary`` or on PATH (Debian's prometheus package ships both)."""
    beside = prometheus_binary.parent / "promtool"
    if beside.is_file():
        return beside
    found = shutil.which("promtool")
    return Path(found) if found else None


def check_rule_files(promtool: Path) -> None:
    """``promtool check rules`` on the rule file and ``promtool test rules`` on its unit tests; CheckError if not."""
    for command in (["check", "rules", str(PROMETHEUS_RULES)], ["test", "rules", str(PROMETHEUS_RULE_TESTS)]):
        done = subprocess.run([str(promtool), *command], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise CheckError(f"promtool {' '.join(command)} failed:\n{done.stdout}{done.stderr}")
        print(f"promtool {' '.join(command[:2])}: ok", flush=True)


def recording_rules() -> list[str]:
    """Names of the recording rules in ``rules.yml``."""
    groups = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
    return [rule["record"] for group in groups for rule in group["rules"] if "record" in rule]


def check_live_rules(prometheus: PrometheusApi, deadline: Deadline) -> list[QueryOutcome]:
    """Every rule of the running Prometheus evaluated without error, and each recording rule's result now.

    CheckError when the rule file did not load or a rule's last evaluation failed; a recording rule without data
    comes back as an outcome that is not ``ok``, like a dashboard query.
    """
    expected = recording_rules()

    def evaluated() -> bool:
        rules = [rule for group in prometheus.rule_groups() for rule in group["rules"]]
        return bool(rules) and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)

    deadline.wait_for("a first evaluation of every rule", evaluated)
    outcomes = []
    for group in prometheus.rule_groups():
        for rule in group["rules"]:
            if rule.get("health") != "ok":
                raise CheckError(
                    f"rule {rule['name']} in {group['name']}: {rule.get('health')} {rule.get('lastError')}"
                )
    for name in expected:
        target = PanelTarget(f"rule {name}", "-", name)
        data = prometheus.query(name)
        values = tuple(float(series["value"][1]) for series in data["result"])
        outcomes.append(QueryOutcome(target, name, len(values), values))
    return outcomes


def format_table(outcomes: list[QueryOutcome]) -> str:
    """Panel title, refId, series count and first value of every query, one line each."""
    rows = [("panel", "ref", "series", "value", "")]
    for outcome in outcomes:
        first = f"{outcome.values[0]:.4g}" if outcome.values else "-"
        verdict = "ok" if outcome.ok else ("NO DATA" if not outcome.values else "ONLY NaN")
        rows.append((outcome.target.title, outcome.target.ref_id, str(outcome.series), first, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}"
        for row in rows
    )


def run_check(
    prometheus_binary: Path,
    checkpoint: Path | None,
    *,
    good_requests: int = 36,
    bad_requests: int = 10,
    timeout: float = 600.0,
) -> list[QueryOutcome]:
    """Service + Prometheus + traffic, then every dashboard query; the outcomes (CheckError on a failed step)."""
    deadline = Deadline(timeout)
    dashboard = json.loads(DASHBOARD.read_text())
    targets = panel_targets(dashboard)
    if not targets:
        raise CheckError(f"{DASHBOARD} has no panel queries")
    for target in targets:
        grafana_to_promql(target.expr)  # unknown variables fail before anything starts
    service_port, prometheus_port = free_port(), free_port()
    service_url, prometheus_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{prometheus_port}"
    config, job = local_prometheus_config(
        yaml.safe_load(PROMETHEUS_CONFIG.read_text()), f"127.0.0.1:{service_port}", PROMETHEUS_CONFIG.parent
    )
    env = {key: value for key, value in os.environ.items() if key != "LRAEE_API_KEY"}  # /metrics must be open
    env["LRAEE_SHADOW_RATE"] = "1"  # every early exit checked at full depth: the agreement panel and rules get data
    if checkpoint is not None:
        env["LRAEE_CHECKPOINT"] = str(checkpoint)
    service_command = uvicorn_command(service_port, "--log-level", "warning")

    with tempfile.TemporaryDirectory(prefix="lraee-deploy-check-") as scratch_name:
        scratch = Path(scratch_name)
        config_path = scratch / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        prometheus_command = [
            str(prometheus_binary),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={scratch / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ]
        service_log, prometheus_log = scratch / "service.log", scratch / "prometheus.log"
        with (
            running("the service", service_command, service_log, cwd=REPO_ROOT, env=env) as service,
            running("prometheus", prometheus_command, prometheus_log, cwd=scratch) as prometheus_process,
        ):
            print(f"service on {service_url}, prometheus on {prometheus_url} (job {job!r})", flush=True)
            deadline.wait_for(
                "the service's /readyz (model load and warm-up)",
                http_ok(f"{service_url}/readyz", service, "the service", service_log),
            )
            deadline.wait_for(
                "prometheus /-/ready",
                http_ok(f"{prometheus_url}/-/ready", prometheus_process, "prometheus", prometheus_log),
            )
            api = PrometheusApi(prometheus_url)
            # A first round creates every labelled series before the bulk of the traffic, so rate() over the
            # scrapes that follow sees the increases rather than series that appear already at their final value.
            started = time.time()
            statuses = send_traffic(service_url, good=4, bad=5)
            wait_for_scrapes(api, job, started, 1, deadline)
            statuses += send_traffic(service_url, good=good_requests, bad=bad_requests)
            finished = time.time()
            invalid = sum(status >= 400 for status in statuses)
            print(f"sent {len(statuses)} requests ({invalid} deliberately invalid) in {finished - started:.1f} s")
            wait_for_scrapes(api, job, finished, 2, deadline)
            outcomes = run_panel_queries(api, targets)
            return outcomes + check_live_rules(api, deadline)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the check, print the table; exit status 0 only when every panel query has data."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.check", description="Live check of the Prometheus config and Grafana dashboard"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint directory (default: $LRAEE_CHECKPOINT, else embedded)"
    )
    parser.add_argument("--prometheus", type=Path, default=None, help="prometheus binary (default: from PATH)")
    parser.add_argument("--requests", type=int, default=36, help="valid classification requests to send")
    # Generous: a few dozen requests take seconds on an idle machine but minutes on two cores shared with training.
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole check")
    args = parser.parse_args(argv)
    try:
        binary = args.prometheus or find_prometheus()
        promtool = promtool_for(binary)
        if promtool is None:
            raise CheckError("no promtool beside prometheus or on PATH, so the rule files cannot be checked")
        check_rule_files(promtool)
        outcomes = run_check(binary, args.checkpoint, good_requests=args.requests, timeout=args.timeout)
    except CheckError as error:
        print(f"deploy check FAILED: {error}", file=sys.stderr)
        return 1
    print(format_table(outcomes))
    empty = [outcome for outcome in outcomes if not outcome.ok]
    for outcome in empty:
        print(f"no data: {outcome.target.title} [{outcome.target.ref_id}]: {outcome.promql}")
    panels = len({outcome.target.title for outcome in outcomes})
    verdict = f"FAILED, {len(empty)} without data" if empty else "all have data"
    print(f"{panels} panels, {len(outcomes)} queries: {verdict}")
    return 1 if empty else 0


if __name__ == "__main__":
    raise SystemExit(main())
