"""The deployment files checked against the code, without a Docker engine.

Dockerfile, docker-compose.yml and deploy/ (Prometheus, Grafana, Redis) must agree with the code: every
command parses with the real ``univigu`` argument parser, every ``UNIVIGU_*`` variable is a field of
:class:`service.contract.settings.Settings` and the values validate, ports and volumes agree between services,
Prometheus scrapes the ports the code listens on, the health checks probe them, and every metric in the
dashboard is one the code's registries export. Compose files are read after interpolation with every
variable unset (the defaults), except the secrets the user must set (:data:`REQUIRED_VARIABLES`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from prometheus_client import start_http_server
from prometheus_client.metrics import MetricWrapperBase

from model.config import PRESETS
from service.cli import healthcheck
from service.cli.main import build_parser
from service.cli.redis_server import free_port
from service.contract.metrics import GatewayMetrics, WorkerMetrics
from service.contract.settings import Settings
from service.gateway.routes import health
from worker.loading import ModelSpec

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SETTING_VARIABLES = {f"UNIVIGU_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
MODEL_SOURCES = {"UNIVIGU_PRESET", "UNIVIGU_WEIGHTS", "UNIVIGU_WAN", "UNIVIGU_CHECKPOINT"}
WEIGHT_PATTERNS = ("*.safetensors", "*.pth", "*.pt", "*.ckpt", "*.bin")
TOY_MODEL = REPO / "model" / "assets" / "toy"
TOY_MODEL_IN_IMAGE = "/opt/univigu/toy"
REQUIRED_VARIABLES = {"GRAFANA_ADMIN_PASSWORD"}
"""Secrets compose refuses to start without (``${X:?message}``): no default is safe for them."""


# --- reading the files --------------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str) -> str:
    """Compose interpolation with every variable unset: ``${X:-default}`` gives the default; a required
    variable (``${X:?message}``, only those in :data:`REQUIRED_VARIABLES`) reads as ``<X>``."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        operator = match.group(2) or ""
        if "?" in operator:
            assert match.group(1) in REQUIRED_VARIABLES, (
                f"{match.group(0)}: a required variable; give it a default"
            )
            return f"<{match.group(1)}>"
        return match.group(3) or ""

    return _INTERPOLATION.sub(value, text)


def interpolation_variables(text: str) -> set[str]:
    return {m.group(1) or m.group(4) for m in _INTERPOLATION.finditer(text) if m.group(0) != "$$"}


COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(interpolate(COMPOSE_TEXT))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "univigu.json"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if all("=" in word for word in words):
                values.update(word.split("=", 1) for word in words)
            else:  # the legacy form `ENV KEY value with spaces`
                values[words[0]] = " ".join(words[1:])
        return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in filter(str.strip, logical):
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(word, str) for word in value), args
    return value


DOCKERFILE_TEXT = (REPO / "Dockerfile").read_text()
DOCKER_ARGS, STAGES = parse_dockerfile(DOCKERFILE_TEXT)
RUNTIME = STAGES[-1]
IMAGE_ENV = RUNTIME.env()
ENTRYPOINT = exec_form(RUNTIME.all("ENTRYPOINT")[-1])
CMD = exec_form(RUNTIME.all("CMD")[-1])
RUNTIME_HEALTHCHECK = exec_form(RUNTIME.all("HEALTHCHECK")[-1].split("CMD", 1)[1].strip())


OUR_IMAGES = {service.get("image") for service in SERVICES.values() if "build" in service}


def ours(name: str) -> bool:
    """Services that run the image built from our Dockerfile."""
    return "build" in SERVICES[name] or SERVICES[name].get("image") in OUR_IMAGES


OUR_SERVICES = sorted(name for name in SERVICES if ours(name))


def command(name: str) -> list[str]:
    """The `univigu` arguments a service of our image runs (compose command, else the image's CMD)."""
    service = SERVICES[name]
    entrypoint = service.get("entrypoint", ENTRYPOINT)
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint
    assert entrypoint == ENTRYPOINT, f"{name}: entrypoint {entrypoint} is not the image's (tini, univigu)"
    args = service.get("command", CMD)
    return shlex.split(args) if isinstance(args, str) else [str(arg) for arg in args]


def role(name: str) -> str:
    return command(name)[0]


def environment(name: str) -> dict[str, str | None]:
    """The service's own variables; ``None`` is a variable passed through from the host (or unset)."""
    env = SERVICES[name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: None if value is None else str(value) for key, value in env.items()}


def settings_of(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container of this service reads: the image's ENV, then the service's."""
    for key in list(os.environ):
        if key.startswith("UNIVIGU_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    values = {**IMAGE_ENV, **environment(name)}
    for key, value in values.items():
        if value is not None and key in SETTING_VARIABLES:
            monkeypatch.setenv(key, value)
    return Settings()


def url_port(url: str) -> int:
    parts = urlsplit(url)
    assert parts.port is not None, f"{url} names no port"
    return parts.port


def published_container_ports(name: str) -> set[int]:
    ports = {int(str(entry).split(":")[-1].split("/")[0]) for entry in SERVICES[name].get("ports", [])}
    return ports | {int(str(entry)) for entry in SERVICES[name].get("expose", [])}


def prometheus_targets() -> dict[str, list[tuple[str, int]]]:
    """job_name -> [(host, port)]"""
    targets: dict[str, list[tuple[str, int]]] = {}
    for job in PROMETHEUS["scrape_configs"]:
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                host, _, port = target.rpartition(":")
                targets.setdefault(job["job_name"], []).append((host, int(port)))
    return targets


def target_ports() -> dict[str, list[int]]:
    """compose service -> the ports Prometheus scrapes on it"""
    ports: dict[str, list[int]] = {}
    for targets in prometheus_targets().values():
        for host, port in targets:
            ports.setdefault(host, []).append(port)
    return ports


def volumes(name: str) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each mount, from short or long syntax."""
    mounts = []
    for entry in SERVICES[name].get("volumes", []):
        if isinstance(entry, dict):
            mounts.append((entry["source"], entry["target"], bool(entry.get("read_only"))))
        else:
            source, target, *mode = entry.split(":")
            mounts.append((source, target, "ro" in mode[0].split(",") if mode else False))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


# --- the metrics the code exports ---------------------------------------------------------------------
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the gateway's and a worker's registries export, with its label names."""
    store = SimpleNamespace(running_count=lambda: 1, live_workers=lambda ttl: 1, webhook_backlog=lambda: 0)
    queue = SimpleNamespace(name="univigu", depth=lambda: 1)
    owners = [GatewayMetrics(store, queue, worker_ttl_seconds=10.0), WorkerMetrics()]  # type: ignore[arg-type]
    exported: dict[str, set[str]] = {}
    for owner in owners:
        wrappers = {m._name: m for m in vars(owner).values() if isinstance(m, MetricWrapperBase)}
        for family in owner.registry.collect():
            if family.name in wrappers:
                labels = set(wrappers[family.name]._labelnames)
            else:  # a custom collector: the labels of what it collected
                labels = {label for sample in family.samples for label in sample.labels}
            for suffix in _SUFFIXES.get(family.type, ("",)):
                exported[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return exported


EXPORTED = exported_metrics()
# Series Prometheus itself adds, and the labels it puts on every scraped series.
PROMETHEUS_SERIES = {"up": set()}
TARGET_LABELS = {"job", "instance"} | {
    label
    for job in PROMETHEUS["scrape_configs"]
    for group in job.get("static_configs", [])
    for label in group.get("labels", {})
}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
_KEYWORDS |= {"offset"}


def promql(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, label names, grouping labels) of a PromQL expression; functions are left out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    grouping = {label for _, body in _GROUPING.findall(text) for label in re.findall(r"[A-Za-z_]\w*", body)}
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        if match.group() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation
        names.add(match.group())
    return names, labels | grouping, grouping


DASHBOARD = json.loads(DASHBOARD_PATH.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in DASHBOARD["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    queries = [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in DASHBOARD.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query or "")
        if inner:
            queries.append((f"variable {variable['name']}", inner.group(1)))
    return queries


# --- commands and the image ---------------------------------------------------------------------------
def test_the_entrypoint_is_the_univigu_console_script_under_tini() -> None:
    """tini is PID 1 (see tests/test_container_init.py for what that changes), from Debian's package."""
    assert PYPROJECT["project"]["scripts"]["univigu"] == "service.cli.main:main"
    assert ENTRYPOINT == ["/usr/bin/tini", "--", "univigu"]
    assert CMD == ["gateway"]
    installs = [args for args in RUNTIME.all("RUN") if "apt-get install" in args]
    assert any(re.search(r"apt-get install [^&]*\btini\b", args) for args in installs), installs
    for name in OUR_SERVICES:
        assert not SERVICES[name].get("init"), f"{name}: `init: true` would put a second init above tini"


def documented_runs() -> list[list[str]]:
    """The `docker run IMAGE <args>` examples in the Dockerfile's header."""
    runs = []
    for line in DOCKERFILE_TEXT.splitlines():
        if line.startswith("#") and "docker run" in line and " IMAGE" in line:
            words = shlex.split(line.lstrip("# ").split("#")[0])
            runs.append(words[words.index("IMAGE") + 1 :] or CMD)  # no arguments: the image's CMD
    return runs


@pytest.mark.parametrize(
    ("where", "args"),
    [(f"service {name}", command(name)) for name in OUR_SERVICES]
    + [("Dockerfile CMD", CMD)]
    + [(f"Dockerfile example {i}", args) for i, args in enumerate(documented_runs())],
)
def test_every_command_parses(where: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `univigu {shlex.join(args)}` is rejected: {capsys.readouterr().err.strip()}")
    assert callable(parsed.handler)


def test_the_dockerfile_documents_commands() -> None:
    assert len(documented_runs()) >= 3, "the Dockerfile header shows gateway, worker and training runs"


def test_compose_runs_a_gateway_and_workers() -> None:
    roles = {name: role(name) for name in OUR_SERVICES}
    assert sorted(roles.values()).count("gateway") == 1, roles
    assert "worker" in roles.values(), roles


def test_the_runtime_image_runs_as_a_non_root_user() -> None:
    users = RUNTIME.all("USER")
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]


def image_probe(args: list[str], monkeypatch: pytest.MonkeyPatch) -> healthcheck.Probe | None:
    """What the image's health check probes in a container running `univigu ARGS` with the image's ENV."""
    for key in list(os.environ):
        if key.startswith("UNIVIGU_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in IMAGE_ENV.items():
        if key in SETTING_VARIABLES:
            monkeypatch.setenv(key, value)
    return healthcheck.probe_for(build_parser().parse_args(args), Settings())


def test_the_image_health_check_is_right_for_every_role(monkeypatch: pytest.MonkeyPatch) -> None:
    (check,) = RUNTIME.all("HEALTHCHECK")
    probe_command = exec_form(check[check.index("CMD") + 3 :].strip())
    assert probe_command[0] == ENTRYPOINT[-1], "the health check runs the univigu console script"
    assert build_parser().parse_args(probe_command[1:]).handler is healthcheck.run
    exposed = {int(p) for args in RUNTIME.all("EXPOSE") for p in args.split()}
    health_paths = {route.path for route in health.router.routes}  # type: ignore[attr-defined]
    probes = {tuple(args): image_probe(args, monkeypatch) for args in [CMD, *documented_runs()]}
    roles = {args[0] for args in probes}
    assert {"gateway", "worker", "train"} <= roles, roles
    for args, probe in probes.items():
        if args[0] == "gateway":
            assert probe and urlsplit(probe.url).path in health_paths and not probe.needs_loaded_model
            assert url_port(probe.url) == Settings.model_fields["port"].default
        elif args[0] == "worker":
            assert probe and probe.needs_loaded_model and urlsplit(probe.url).path == "/metrics"
            assert url_port(probe.url) == int(IMAGE_ENV["UNIVIGU_WORKER_METRICS_PORT"])
        else:
            assert probe is None, f"`univigu {args[0]}` serves nothing, so nothing is probed"
        assert probe is None or url_port(probe.url) in exposed, probe


def test_a_workers_health_check_passes_once_its_model_has_loaded() -> None:
    """Against a real exporter of the worker's metrics (what `univigu worker` serves while it loads)."""
    metrics = WorkerMetrics()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        probe = healthcheck.Probe(f"http://127.0.0.1:{port}/metrics", needs_loaded_model=True)
        assert "has not loaded yet" in (healthcheck.check(probe) or "")
        metrics.model_load.set(1.5)
        assert healthcheck.check(probe) is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert "Connection refused" in (healthcheck.check(probe) or "")


def test_the_health_check_finds_the_command_behind_any_init() -> None:
    command_line = b"/usr/bin/tini\0--\0univigu\0worker\0--device\0cuda:0\0"
    assert healthcheck.container_command(command_line) == ["worker", "--device", "cuda:0"]
    docker_init = b"/sbin/docker-init\0--\0/usr/bin/tini\0--\0/opt/venv/bin/univigu\0gateway\0"
    assert healthcheck.container_command(docker_init) == ["gateway"]
    with pytest.raises(ValueError, match="runs no univigu command"):
        healthcheck.container_command(b"/bin/sh\0-c\0sleep 1\0")


def test_the_image_is_offline_and_bakes_in_no_weights() -> None:
    assert IMAGE_ENV.get("HF_HUB_OFFLINE") == "1"
    for stage in STAGES:
        for keyword, args in stage.instructions:
            if keyword not in {"COPY", "ADD"} or "--from=" in args:
                continue
            sources = [word for word in shlex.split(args)[:-1] if not word.startswith("--")]
            for source in sources:
                assert "weight" not in source.lower(), f"{keyword} {args}: weights are mounted, never copied"
                assert not any(Path(source).match(p) for p in WEIGHT_PATTERNS), f"{keyword} {args}"
                assert (REPO / source).exists(), f"{keyword} {args}: {source} is not in the repository"
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*", ".dockerignore is an allow-list: it starts by excluding everything"
    for pattern in WEIGHT_PATTERNS:
        assert f"**/{pattern}" in ignored, f".dockerignore does not keep {pattern} out of the context"


def test_torch_matches_the_cuda_base_image() -> None:
    builder = STAGES[0]
    args = {key: value for key, _, value in (a.partition("=") for a in builder.all("ARG"))}
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+$", DOCKER_ARGS["CUDA_IMAGE"])
    assert cuda, f"the base is not a CUDA runtime image: {DOCKER_ARGS['CUDA_IMAGE']}"
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda.group(1)}{cuda.group(2)}"), args["TORCH_INDEX_URL"]
    assert all(stage.base == "${CUDA_IMAGE}" for stage in STAGES), "builder and runtime share the base"
    torch_spec = next(
        r for r in PYPROJECT["project"]["optional-dependencies"]["model"] if r.startswith("torch")
    )
    assert args["TORCH_VERSION"] in SpecifierSet(torch_spec.removeprefix("torch")), torch_spec
    extras = set(re.findall(r"extras\['(\w+)'\]", DOCKERFILE_TEXT))
    assert extras == {"model", "redis"} and extras <= set(PYPROJECT["project"]["optional-dependencies"])


# --- settings -------------------------------------------------------------------------------------------
def test_every_univigu_variable_is_a_setting() -> None:
    unknown = {f"Dockerfile ENV {key}" for key in IMAGE_ENV if key.startswith("UNIVIGU_")} - {
        f"Dockerfile ENV {key}" for key in SETTING_VARIABLES
    }
    for name in OUR_SERVICES:
        unknown |= {f"{name}: {key}" for key in environment(name) if key not in SETTING_VARIABLES}
    unknown |= {
        f"interpolated ${{{key}}}"
        for key in interpolation_variables(COMPOSE_TEXT)
        if key.startswith("UNIVIGU_") and key not in SETTING_VARIABLES
    }
    assert not unknown, f"not fields of service.contract.settings.Settings: {sorted(unknown)}"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_service_settings_validate(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(name, monkeypatch)
    if role(name) == "gateway":
        assert settings.host == "0.0.0.0", "the gateway must listen on all interfaces in a container"
    if role(name) == "worker":
        passed_through = {key for key, value in environment(name).items() if value is None}
        if passed_through:  # the model comes from the host's .env: every source may be chosen there
            assert passed_through == MODEL_SOURCES - {"UNIVIGU_PRESET"}, passed_through
        else:
            ModelSpec.from_settings(settings)


def test_the_cpu_profile_needs_no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    (name,) = [n for n in OUR_SERVICES if "cpu" in SERVICES[n].get("profiles", [])]
    settings = settings_of(name, monkeypatch)
    spec = ModelSpec.from_settings(settings)
    assert settings.device == "cpu" and "deploy" not in SERVICES[name]
    if (TOY_MODEL / "univigu.json").exists():
        assert spec.weights == Path(TOY_MODEL_IN_IMAGE), "the toy model ships: serve it in the cpu profile"
    else:
        assert spec.preset in PRESETS, spec
    assert TOY_MODEL_IN_IMAGE in DOCKERFILE_TEXT, "the image links the shipped toy model to a stable path"


def test_gpu_workers_and_groups_do_not_share_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a profile no two services reserve one GPU. Inside a container its GPUs are numbered from 0:
    a one-GPU worker uses cuda:0, a worker group lists cuda:0 ... cuda:n-1 for its n GPUs."""
    taken: dict[tuple[str, str], str] = {}  # (profile, GPU id) -> service
    for name in OUR_SERVICES:
        reservations = SERVICES[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        devices = reservations.get("devices", [])
        if not devices:
            continue
        profiles = SERVICES[name].get("profiles")
        assert role(name) == "worker" and profiles and all(p.startswith("gpu") for p in profiles), name
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], device
        for profile in profiles:
            for gpu in device["device_ids"]:
                assert (profile, gpu) not in taken, f"{name} and {taken[(profile, gpu)]} share GPU {gpu}"
                taken[(profile, gpu)] = name
        settings = settings_of(name, monkeypatch)
        visible = [f"cuda:{index}" for index in range(len(device["device_ids"]))]
        if len(visible) == 1:
            assert settings.device == "cuda:0" and not settings.devices, "one GPU is visible: cuda:0"
        else:
            assert settings.devices == visible, f"{name} reserves {len(visible)} GPUs: devices {visible}"
    assert taken, "no worker reserves an NVIDIA GPU"


# --- ports, volumes, dependencies -----------------------------------------------------------------------
@pytest.mark.parametrize("name", OUR_SERVICES)
def test_ports_agree(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(name, monkeypatch)
    port = settings.port if role(name) == "gateway" else settings.worker_metrics_port
    assert port, f"{name} serves no metrics"
    assert port in published_container_ports(name), (
        f"{name} listens on {port}, exposes {published_container_ports(name)}"
    )
    assert target_ports().get(name) == [port], (
        f"Prometheus scrapes {name} on {target_ports().get(name)}, not {port}"
    )
    assert SERVICES[name]["healthcheck"]["test"] == ["CMD", *RUNTIME_HEALTHCHECK], f"{name}: not the image's"
    probe = healthcheck.probe_for(build_parser().parse_args(command(name)), settings)
    assert probe and url_port(probe.url) == port, f"{name}'s health check probes {probe}, not port {port}"
    exposed = {int(p) for args in RUNTIME.all("EXPOSE") for p in args.split()}
    assert port in exposed, f"the Dockerfile does not EXPOSE {port}"


def test_prometheus_scrapes_real_services_on_the_metrics_path() -> None:
    for job in PROMETHEUS["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job
        for host, _ in prometheus_targets()[job["job_name"]]:
            assert host in SERVICES, f"Prometheus target {host} is not a compose service"
    assert "/metrics" in {route.path for route in health.router.routes}  # type: ignore[attr-defined]


def test_the_results_volume_is_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OUR_SERVICES:
        results_dir = str(settings_of(name, monkeypatch).results_dir)
        assert ("results", results_dir, False) in volumes(name), (
            f"{name} does not mount results at {results_dir}"
        )
    volume_args = [
        exec_form(args) if args.startswith("[") else args.split() for args in RUNTIME.all("VOLUME")
    ]
    assert IMAGE_ENV["UNIVIGU_RESULTS_DIR"] in [path for paths in volume_args for path in paths]


def test_volumes_are_declared_and_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name in SERVICES:
        for source, target, read_only in volumes(name):
            if is_bind(source):
                if source.startswith("./deploy"):
                    assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
                    assert read_only, f"{name} mounts configuration {source} writable"
            else:
                assert source in declared, f"{name} mounts volume {source}, not declared under volumes:"
                used.add(source)
            if target == "/weights":
                assert read_only, f"{name} mounts the weights writable"
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


def test_redis_is_durable_and_never_evicts(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = SERVICES["redis"]
    conf_mount = {target: source for source, target, _ in volumes("redis")}
    conf_path = next(arg for arg in redis["command"] if arg.endswith(".conf"))
    conf: dict[str, str] = {}
    for line in (REPO / conf_mount[conf_path]).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key] = value.strip()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert not is_bind(conf_mount[conf["dir"]]), "Redis keeps its AOF on a named volume"
    for name in OUR_SERVICES:
        url = urlsplit(settings_of(name, monkeypatch).redis_url)
        assert (url.hostname, url.port) == ("redis", int(conf.get("port", 6379))), f"{name}: {url.geturl()}"


def active_with(name: str) -> set[str] | None:
    """The profiles a service runs under; None: always."""
    profiles = SERVICES[name].get("profiles")
    return set(profiles) if profiles else None


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies() -> None:
    for name, service in SERVICES.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}: {condition}"
            needed, available = active_with(name), active_with(dependency)
            assert available is None or (needed is not None and needed <= available), (
                f"{name} can start without {dependency} (profiles {needed} vs {available})"
            )


def test_every_univigu_service_is_scraped() -> None:
    for name in OUR_SERVICES:
        assert name in target_ports(), f"Prometheus does not scrape {name}"


# --- laptop defaults and building --------------------------------------------------------------------------
def test_published_ports_are_on_the_loopback_unless_the_user_opts_in() -> None:
    for name, service in SERVICES.items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} on every interface"
    (gateway_port,) = SERVICES["gateway"]["ports"]
    raw = re.search(r"^\s*- \"(\$\{PUBLISH_ADDRESS:-127\.0\.0\.1\}:[^\"]*:8000)\"", COMPOSE_TEXT, re.M)
    assert raw and interpolate(raw.group(1)) == gateway_port, "PUBLISH_ADDRESS opens the gateway to others"


def test_grafana_needs_an_admin_password() -> None:
    password = SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password == "<GRAFANA_ADMIN_PASSWORD>", "Grafana's admin password has a default"
    message = re.search(r"\$\{GRAFANA_ADMIN_PASSWORD:\?([^}]+)\}", COMPOSE_TEXT)
    assert message and "GRAFANA_ADMIN_PASSWORD" in message.group(1) and ".env" in message.group(1)


def test_compose_builds_the_image_with_the_dockerfiles_defaults() -> None:
    """Compose's build arguments come from .env (a CPU-only image stays CPU-only on `up --build`), and
    unset they are the Dockerfile's own defaults."""
    builder_args = {key: value for key, _, value in (a.partition("=") for a in STAGES[0].all("ARG"))}
    defaults = {**DOCKER_ARGS, **builder_args}
    for name in OUR_SERVICES:
        build = SERVICES[name].get("build")
        if build is None:
            continue
        args = build["args"]
        assert build["context"] == "." and args, name
        assert args == {key: defaults[key] for key in args}, (
            f"{name}: {args} are not the Dockerfile's defaults"
        )
        assert {"CUDA_IMAGE", "TORCH_INDEX_URL"} <= set(args) <= set(interpolation_variables(COMPOSE_TEXT))


# --- Grafana ----------------------------------------------------------------------------------------------
def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    assert url.hostname in SERVICES and url.port in published_container_ports(url.hostname), source["url"]
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/univigu.yml").read_text())[
        "providers"
    ]
    mounts = {target: source for source, target, _ in volumes("grafana")}
    assert (REPO / mounts[provider["options"]["path"]] / DASHBOARD_PATH.name).exists()
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    uids = {p["datasource"]["uid"] for p in dashboard_panels()}
    uids |= {t["datasource"]["uid"] for p in dashboard_panels() for t in p.get("targets", [])}
    assert uids == {source["uid"]}, f"panels use datasources {uids}, Grafana provisions {source['uid']}"


def test_dashboard_panels_are_well_formed() -> None:
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        mine = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells |= mine
    assert DASHBOARD["uid"] and DASHBOARD["title"]


@pytest.mark.parametrize(("where", "expr"), dashboard_queries())
def test_dashboard_metrics_are_exported(where: str, expr: str) -> None:
    names, labels, _ = promql(expr)
    known = {**EXPORTED, **PROMETHEUS_SERIES}
    assert names, f"{where}: no metric in {expr}"
    assert not names - known.keys(), f"{where}: {sorted(names - known.keys())} are not exported by the code"
    offered = set().union(*(known[name] for name in names)) | TARGET_LABELS
    assert labels <= offered, f"{where}: labels {sorted(labels - offered)} are on none of {sorted(names)}"


def test_healthcheck_metrics_are_exported() -> None:
    assert healthcheck.LOADED_METRIC in EXPORTED, (
        "the worker's health check reads a metric no registry exports"
    )
    for name in SERVICES:
        test = " ".join(SERVICES[name].get("healthcheck", {}).get("test", []))
        for metric in re.findall(r"univigu_\w+", test):
            assert metric in EXPORTED, f"{name} healthcheck reads {metric}, which no registry exports"


def _quantiles(metric: str) -> Any:
    def check(expr: str) -> bool:
        names, _, grouping = promql(expr)
        return "histogram_quantile(" in expr and f"{metric}_bucket" in names and {"le", "type"} <= grouping

    return check


TOPICS = {
    "queue depth": lambda e: "univigu_queue_depth" in promql(e)[0],
    "jobs by status": lambda e: "univigu_jobs_finished_total" in promql(e)[0] and "status" in promql(e)[2],
    "queue wait percentiles by job type": _quantiles("univigu_job_queue_wait_seconds"),
    "run time percentiles by job type": _quantiles("univigu_job_run_seconds"),
    "step time": lambda e: any(n.startswith("univigu_denoising_step_seconds") for n in promql(e)[0]),
    "busy workers": lambda e: bool({"univigu_workers_busy", "univigu_worker_busy"} & promql(e)[0]),
    "GPU memory": lambda e: "univigu_gpu_memory_allocated_bytes" in promql(e)[0],
    "error rate": lambda e: 'status="failed"' in e and "/" in e,
}


@pytest.mark.parametrize("topic", TOPICS)
def test_dashboard_covers_topic(topic: str) -> None:
    matches = [(where, expr) for where, expr in dashboard_queries() if TOPICS[topic](expr)]
    assert matches, f"no dashboard panel shows {topic}"
    if "percentiles" in topic:
        quantiles = {re.search(r"histogram_quantile\(([\d.]+)", expr).group(1) for _, expr in matches}  # type: ignore[union-attr]
        assert len(quantiles) >= 2, f"{topic}: only the quantiles {quantiles}"
