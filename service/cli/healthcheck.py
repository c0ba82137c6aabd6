"""`univigu healthcheck`: the image's health check, right for whichever role the container runs.

Docker runs one HEALTHCHECK command in every container of an image, so the command finds the role
itself: it reads the container's command from PID 1's command line (``tini -- univigu worker ...``),
parses it with the real `univigu` parser, and probes what that role serves, on the ports its flags and
``UNIVIGU_*`` settings give:

- ``gateway`` and ``up``: ``GET /healthz`` answers 200;
- ``worker``: its metrics port answers and ``univigu_model_load_seconds`` is set (the model loaded);
  a worker with its metrics port off (0) has nothing to probe;
- any other command (``train``, ``toyworld`` ...): nothing to probe; healthy while it runs.

``univigu healthcheck worker --metrics-port 9101`` names the command instead (outside a container).
Exit status 0 is healthy, 1 unhealthy, as Docker expects.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.contract.settings import Settings, load_settings

PROBE_TIMEOUT_SECONDS = 4.0
LOADED_METRIC = "univigu_model_load_seconds"
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


@dataclass(frozen=True)
class Probe:
    url: str
    needs_loaded_model: bool = False
    """The answer is a worker's metrics, healthy once its model has loaded."""


def container_command(cmdline: bytes) -> list[str]:
    """The `univigu` arguments in a process's command line (``/proc/1/cmdline``: NUL-separated), behind
    any init (``tini --``, Docker's ``docker-init --``)."""
    words = [word.decode() for word in cmdline.split(b"\0") if word]
    for index, word in enumerate(words):
        if Path(word).name == "univigu":
            return words[index + 1 :]
    raise ValueError(f"the command line {words[:1]} ... runs no univigu command")


def probe_for(command: argparse.Namespace, settings: Settings) -> Probe | None:
    """What to probe for a parsed `univigu` command; None: it serves nothing."""
    if command.command in ("gateway", "up"):
        host = command.host or settings.host
        host = "127.0.0.1" if host in _ANY_ADDRESS else host
        return Probe(f"http://{host}:{command.port or settings.port}/healthz")
    if command.command == "worker":
        port = (
            settings.worker_metrics_port
            if command.worker_metrics_port is None
            else command.worker_metrics_port
        )
        return Probe(f"http://127.0.0.1:{port}/metrics", needs_loaded_model=True) if port else None
    return None


def check(probe: Probe) -> str | None:
    """None if healthy, else why not."""
    try:
        with urllib.request.urlopen(probe.url, timeout=PROBE_TIMEOUT_SECONDS) as answer:
            text = answer.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return f"{probe.url}: {exc}"
    if probe.needs_loaded_model:
        loaded = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == LOADED_METRIC
        ]
        if not any(value > 0 for value in loaded):
            return f"{probe.url}: the model has not loaded yet ({LOADED_METRIC} is not set)"
    return None


def register(commands: Any) -> None:
    """Add `healthcheck` to the `univigu` subcommands (``commands`` is argparse's subparsers action)."""
    parser = commands.add_parser(
        "healthcheck", help="the container's health check: probe what its command serves (exit 0 healthy)"
    )
    parser.add_argument(
        "role_command",
        nargs=argparse.REMAINDER,
        help="the univigu command to check, e.g. `worker --metrics-port 9101` (default: PID 1's)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from service.cli.main import build_parser

    try:
        words = args.role_command or container_command(Path("/proc/1/cmdline").read_bytes())
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}; name the command, e.g. `univigu healthcheck gateway`")
        return 1
    probe = probe_for(build_parser().parse_args(words), load_settings())
    if probe is None:
        print(f"healthy: `univigu {words[0]}` serves nothing to probe")
        return 0
    problem = check(probe)
    print(f"unhealthy: {problem}" if problem else f"healthy: {probe.url}")
    return 1 if problem else 0
