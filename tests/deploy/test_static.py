"""Static checks of the deployment files: they parse, agree with each other and with the service's contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import check
from lraee_core.paths import REPO_ROOT

REPO = REPO_ROOT
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES = DEPLOY / "prometheus" / "rules.yml"
NGINX_CONFIG = DEPLOY / "nginx" / "nginx.conf"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "lraee.json"
K8S = DEPLOY / "k8s"

SERVICE = "lraee"  # compose service name = the name Docker DNS, nginx and Prometheus resolve
SERVICE_PORT = 8000
# The service's settings as its contract names them; app/settings.py's Settings is the authority when importable.
CONTRACT_SETTINGS = frozenset(
    "LRAEE_" + name
    for name in [
        "CHECKPOINT",
        "BACKBONE_WEIGHTS",
        "OPEN_CLIP_CACHE_DIR",
        "THREADS",
        "MAX_BATCH_SIZE",
        "MAX_BATCH_WAIT_MS",
        "QUEUE_CAPACITY",
        "MAX_UPLOAD_BYTES",
        "MAX_IMAGE_PIXELS",
        "MAX_LABELS",
        "MAX_LABEL_CHARS",
        "MAX_BATCH_IMAGES",
        "TEXT_CACHE_SIZE",
        "API_KEY",
    ]
)
# The service's metrics (app/metrics.py) by Prometheus type; histograms also expose _bucket/_count (and _sum).
SERVICE_METRICS = {
    "lraee_requests_total": "counter",
    "lraee_request_duration_seconds": "histogram",
    "lraee_inference_seconds": "histogram",
    "lraee_exit_layer_total": "counter",
    "lraee_flops_saved_ratio": "histogram",
    "lraee_flops_total": "counter",
    "lraee_flops_full_total": "counter",
    "lraee_batch_size": "histogram",
    "lraee_queue_depth": "gauge",
    "lraee_text_cache_hits_total": "counter",
    "lraee_text_cache_misses_total": "counter",
    "lraee_model_info": "gauge",
    "lraee_answers_total": "counter",
    "lraee_shadow_checks_total": "counter",
    "lraee_shadow_dropped_total": "counter",
    "lraee_operating_point_promise": "gauge",
    "lraee_inflight_requests": "gauge",
    "lraee_inflight_bytes": "gauge",
    "lraee_body_timeouts_total": "counter",
    "lraee_embedded_inputs_total": "counter",
    "lraee_agreement_estimate": "gauge",
    "lraee_threshold_offset": "gauge",
    "lraee_promise_broken": "gauge",
    "lraee_threshold_corrections_total": "counter",
}
PROMETHEUS_SERIES = frozenset({"up"})  # what Prometheus itself records per target, usable in panels
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
)


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    """Every document of a YAML stream, empty ones left out."""
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as data."""
    return dict(load_yaml(COMPOSE_FILE))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The Grafana dashboard as data."""
    return dict(json.loads(DASHBOARD_FILE.read_text()))


def setting_env_names() -> frozenset[str]:
    """Environment names the service reads: from its Settings class when importable, else the contract's list."""
    try:
        from app.settings import Settings
    except ImportError:
        return CONTRACT_SETTINGS
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return frozenset(prefix + name.upper() for name in Settings.model_fields)


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a compose service's bind mounts, short syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def compose_command() -> list[str] | None:
    """The docker compose client: the docker CLI plugin, or a standalone docker-compose (in PATH or this venv)."""
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if plugin.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose") or shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    return [standalone] if standalone else None


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, label lists and calls removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", expr):
        name, call = match.groups()
        if not call and name not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def exposed_series() -> frozenset[str]:
    """Sample names the service's metrics can expose."""
    names = set(PROMETHEUS_SERIES)
    for name, kind in SERVICE_METRICS.items():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "count", "sum"))
    return frozenset(names)


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in rows included."""
    found = []
    pending = list(dashboard.get("panels", []))
    while pending:
        panel = pending.pop(0)
        found.append(panel)
        pending.extend(panel.get("panels", []))
    return found


def k8s_objects() -> dict[str, dict[str, Any]]:
    """The Kubernetes manifests' objects by kind (one of each here)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in load_yaml_documents(path):
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    return objects


# ---- compose ---------------------------------------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client here (docker CLI plugin or docker-compose); YAML checks still run")
    done = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_compose_runs_a_scalable_service_behind_a_balancer_with_monitoring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {SERVICE, "lb", "prometheus", "grafana"}
    service = services[SERVICE]
    assert service["build"]["context"] == "."
    # Anything tying the service to one container would break `--scale`.
    assert "container_name" not in service and "ports" not in service
    assert str(SERVICE_PORT) in [str(port) for port in service["expose"]]
    assert "replicas" in service["deploy"]
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert ("models", "/models") in [tuple(str(v).split(":")[:2]) for v in service["volumes"]]
    assert {"models", "grafana-data"} <= set(compose["volumes"])
    assert services["lb"]["depends_on"][SERVICE]["condition"] == "service_healthy"


def test_compose_bind_mounts_exist_in_the_repository(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_host_side_variables_do_not_pose_as_settings() -> None:
    # ${...} in compose is interpolated on the host; LRAEE_* names there would be mistaken for service settings.
    interpolated = re.findall(r"\$\{([A-Za-z0-9_]+)", COMPOSE_FILE.read_text())
    assert interpolated and not [name for name in interpolated if name.startswith("LRAEE_")]


# ---- settings ----------------------------------------------------------------------------------------------------


def test_contract_settings_exist_in_the_service() -> None:
    assert setting_env_names() >= CONTRACT_SETTINGS


@pytest.mark.parametrize(
    "path",
    [DOCKERFILE, COMPOSE_FILE, *sorted(K8S.glob("*.yaml"))],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_lraee_environment_names_are_real_settings(path: Path) -> None:
    used = set(re.findall(r"\bLRAEE_[A-Z0-9_]+\b", path.read_text()))
    assert used <= setting_env_names(), f"not settings of the service: {sorted(used - setting_env_names())}"


# ---- image -------------------------------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_cpu_image_with_a_readiness_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM\s", text, re.MULTILINE)) >= 2, "multi-stage"
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK\s.*/readyz", text, re.MULTILINE | re.DOTALL)
    assert re.search(r'^VOLUME\s+\["/models"\]', text, re.MULTILINE)
    assert re.search(rf"^EXPOSE\s+{SERVICE_PORT}\b", text, re.MULTILINE)
    assert "LRAEE_OPEN_CLIP_CACHE_DIR=/models/open_clip" in text
    cmd = re.search(r"^CMD\s+(\[.*?\])\s*$", text.replace("\\\n", ""), re.MULTILINE | re.DOTALL)
    assert cmd, "exec-form CMD"
    assert json.loads(cmd.group(1))[:3] == ["uvicorn", "app.main:create_app", "--factory"]


def test_dockerfile_pins_torch_like_the_project() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [dependency for dependency in dependencies if re.match(r"^(torch|torchvision)==", dependency)]
    assert len(pins) == 2
    for pin in pins:
        assert pin in DOCKERFILE.read_text(), f"the Dockerfile should install {pin} (pyproject.toml's pin)"


def test_dockerfile_copies_what_the_build_context_has() -> None:
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv", "runs", "data", ".pytest_cache", ".mypy_cache", ".ruff_cache"} <= ignored
    for line in re.findall(r"^COPY\s+(?!--)(.+)$", DOCKERFILE.read_text(), re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


# ---- load balancer ------------------------------------------------------------------------------------------------


def test_nginx_balances_over_the_service_name_through_docker_dns() -> None:
    text = NGINX_CONFIG.read_text()
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", text, re.MULTILINE)
    # A variable makes nginx re-resolve at request time, which is what lets replicas come and go.
    upstream = re.search(r"set\s+\$(\w+)\s+http://([\w-]+):(\d+);", text)
    assert upstream and upstream.group(2, 3) == (SERVICE, str(SERVICE_PORT))
    assert f"proxy_pass ${upstream.group(1)};" in text


def test_nginx_bounds_slow_clients() -> None:
    # Bodies are read whole before they reach a replica, a stalled one times out, one address holds few connections.
    directives = dict(
        re.findall(
            r"^\s*(proxy_request_buffering|client_body_timeout|limit_conn)\s+([^;]+);",
            NGINX_CONFIG.read_text(),
            re.MULTILINE,
        )
    )
    assert directives.get("proxy_request_buffering") == "on"
    assert "client_body_timeout" in directives and directives.get("limit_conn", "").startswith("per_client ")


def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("no nginx binary to test the config with (the other nginx assertions still run)")
    done = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-e", "stderr", "-c", str(NGINX_CONFIG)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


# ---- prometheus ---------------------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_replica_on_the_service_port() -> None:
    jobs = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    service_jobs = [job for job in jobs if job.get("dns_sd_configs")]
    assert len(service_jobs) == 1
    job = service_jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == [SERVICE] and discovery["type"] == "A" and discovery["port"] == SERVICE_PORT


def test_promtool_accepts_the_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian's prometheus package ships it)")
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def promtool_or_skip() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian's prometheus package ships it)")
    return promtool


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = promtool_or_skip()
    for command in (["check", "rules", str(PROMETHEUS_RULES)], ["test", "rules", str(check.PROMETHEUS_RULE_TESTS)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_rules_use_only_metrics_the_service_exposes_and_compose_mounts_them(compose: dict[str, Any]) -> None:
    assert load_yaml(PROMETHEUS_CONFIG)["rule_files"] == [PROMETHEUS_RULES.name]
    groups = load_yaml(PROMETHEUS_RULES)["groups"]
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert [alert["alert"] for alert in alerts] == [
        "LraeeEarlyExitAgreementBelowPromise",
        "LraeePromiseBrokenNotCorrected",
    ]
    for group in groups:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - exposed_series() - recorded
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown metrics {sorted(unknown)}"
    mounts = dict(bind_mounts(compose["services"]["prometheus"]))
    assert mounts["./deploy/prometheus/rules.yml"] == "/etc/prometheus/rules.yml"


def test_the_live_check_swaps_only_the_targets() -> None:
    base = load_yaml(PROMETHEUS_CONFIG)
    [original] = [job for job in base["scrape_configs"] if job.get("dns_sd_configs")]
    original["authorization"] = {"credentials_file": "/etc/prometheus/lraee_api_key"}  # as deploy/README.md advises
    config, job_name = check.local_prometheus_config(base, "127.0.0.1:1234", PROMETHEUS_CONFIG.parent)
    [job] = config["scrape_configs"]
    assert job_name == original["job_name"] == job["job_name"]
    assert job.get("metrics_path") == original.get("metrics_path")
    assert job["static_configs"] == [{"targets": ["127.0.0.1:1234"]}]
    assert "dns_sd_configs" not in job and job["scrape_interval"] == check.SCRAPE_INTERVAL
    assert "authorization" not in job  # the check's service runs without an API key


# ---- grafana ------------------------------------------------------------------------------------------------------


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    mounts = dict(bind_mounts(compose["services"]["grafana"]))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    [provider] = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "lraee.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["./" + str(DASHBOARD_FILE.parent.relative_to(REPO))]
    [datasource] = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


def test_dashboard_is_provisionable(dashboard: dict[str, Any]) -> None:
    [datasource] = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']}: no queries"
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == datasource["uid"], panel["title"]


def test_dashboard_covers_what_operators_of_an_early_exit_service_watch(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(target["expr"] for panel in dashboard_panels(dashboard) for target in panel.get("targets", []))
    for needle in (
        "lraee_exit_layer_total",  # exit-layer distribution and early-exit rate
        'layer!="full"',
        "lraee_flops_saved_ratio",
        '1 - sum(rate(lraee_flops_total{model=~"$model"}[$__rate_interval])) / sum(rate(lraee_flops_full_total',  # mean
        "lraee_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(lraee_request_duration_seconds_bucket",
        "lraee_batch_size",
        "lraee_queue_depth",
        "lraee_text_cache_hits_total",
        "lraee_model_info",
        'lraee_shadow_checks_total{agree="true", model=~"$model"}',  # agreement of early exits with full depth
        "lraee_inflight_bytes",
        "lraee_body_timeouts_total",  # slow bodies cut off
        'lraee_agreement_estimate{bound="estimate", model=~"$model"}',  # the controller's live estimate
        "lraee_operating_point_promise",  # ... against the promise
        "lraee_threshold_offset",  # how far the thresholds are raised
        "lraee_threshold_corrections_total",  # the corrections made
    ):
        assert needle in exprs, needle


def test_dashboard_queries_only_metrics_the_service_exposes(dashboard: dict[str, Any]) -> None:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            unknown = metric_names(target["expr"]) - exposed_series()
            assert not unknown, f"{panel['title']}: unknown metrics {sorted(unknown)} in {target['expr']}"
            assert set(re.findall(r'job="([^"]+)"', target["expr"])) <= jobs, panel["title"]


def test_every_engine_panel_follows_the_model_selector(dashboard: dict[str, Any]) -> None:
    [variable] = dashboard["templating"]["list"]
    assert variable["name"] == "model" and variable["includeAll"] and variable["multi"]
    assert {"model": variable["allValue"]} == check.DASHBOARD_VARIABLES
    assert "lraee_model_info" in variable["query"]["query"]
    request_level = (  # series of the HTTP layer, before a request names its model
        "lraee_requests_total",
        "lraee_request_duration_seconds",
        "lraee_inflight_bytes",
        "lraee_body_timeouts_total",
        "up{",
    )
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            if not any(name in expr for name in request_level):
                assert expr.count('model=~"$model"') == expr.count("lraee_"), f"{panel['title']}: {expr}"


def test_metric_names_reads_promql() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket{route=~"/x.*"}[$__rate_interval]))) / scalar(b) or c'
    assert metric_names(expr) == {"a_bucket", "b", "c"}


def test_the_live_check_queries_every_panel(dashboard: dict[str, Any]) -> None:
    targets = check.panel_targets(dashboard)
    assert len(targets) == sum(len(panel.get("targets", [])) for panel in dashboard_panels(dashboard))
    for target in targets:
        assert "$" not in check.grafana_to_promql(target.expr)
    with pytest.raises(check.CheckError, match=r"\$instance"):
        check.grafana_to_promql('up{instance=~"$instance"}')


# ---- kubernetes --------------------------------------------------------------------------------------------------


def test_k8s_deployment_probes_resources_config_and_models_volume() -> None:
    objects = k8s_objects()
    assert set(objects) >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "PersistentVolumeClaim"}
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [port["containerPort"] for port in container["ports"]] == [SERVICE_PORT]
    assert {"requests", "limits"} <= set(container["resources"])
    config_maps = [source["configMapRef"]["name"] for source in container["envFrom"] if "configMapRef" in source]
    assert config_maps == [objects["ConfigMap"]["metadata"]["name"]]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    models = next(name for name, path in mounts.items() if path == "/models")
    claim = volumes[models]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def quantity(value: str) -> int:
    """A Kubernetes memory quantity (``3Gi``, ``256Mi``) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def test_k8s_memory_and_tmp_hold_what_the_settings_admit() -> None:
    """The arithmetic in deployment.yaml's comment, from the ConfigMap's settings (the app's defaults elsewhere)."""
    from app.settings import Settings

    objects = k8s_objects()
    settings = Settings(
        **{name.removeprefix("LRAEE_").lower(): value for name, value in objects["ConfigMap"]["data"].items()}
    )
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    memory = quantity(container["resources"]["limits"]["memory"])
    image = 3 * 224 * 224 * 4  # one queued image, [3, 224, 224] fp32
    worst_case = (
        (1 << 30)  # model, torch and the process (ViT-B-32 INT8)
        + 3 * settings.max_inflight_bytes  # JSON bodies: the body, its text, the parsed strings
        + 2 * settings.max_image_pixels * 3 * 3  # two decode workers, RGB, three copies at most
        + (settings.queue_capacity + settings.max_batch_size) * image
        + 32 * image  # the shadow queue
    )
    assert worst_case < memory, (worst_case, memory)
    [tmp] = [volume for volume in pod["volumes"] if volume["name"] == "tmp"]
    assert quantity(tmp["emptyDir"]["sizeLimit"]) >= 2 * settings.max_inflight_bytes  # spooled multipart + caches
    assert settings.body_limit(settings.max_batch_images) <= settings.max_inflight_bytes


def test_k8s_service_and_autoscaler_point_at_the_deployment() -> None:
    objects = k8s_objects()
    deployment, service, autoscaler = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    [metric] = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_k8s_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the listing is checked; rendering needs kubectl
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
