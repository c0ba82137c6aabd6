"""The `univigu` command: `gateway` and `up` here, `worker` from :mod:`worker.cli`, `submit` from
:mod:`service.cli.submit`, `healthcheck` from :mod:`service.cli.healthcheck`, and the model's commands
(`generate`, `caption`, `joint`, `train`, `toyworld`) from :mod:`model.cli`.

`univigu gateway` never imports torch; `univigu worker` and the model's commands import it when they
run.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.cli.healthcheck import register as register_healthcheck_command
from service.cli.submit import register as register_submit_command
from service.contract.settings import load_settings
from worker.cli import register as register_worker_command

log = logging.getLogger("univigu")


def _overrides(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from service.gateway.app import create_app

    settings = load_settings(**_overrides(args, "host", "port"))
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level.lower()
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    from service.cli.up import run_up

    settings = load_settings(**_overrides(args, "host", "port", "data_dir", "worker_metrics_port"))
    return run_up(settings, model=_up_model(args), device=args.device)


def _up_model(args: argparse.Namespace) -> list[str]:
    """The worker's model arguments: as given, else the default (the shipped toy model, else tiny)."""
    from model.toyworld import default_model_source

    if args.weights is not None:
        return ["--weights", str(args.weights)]
    if args.preset is not None:
        return ["--preset", args.preset]
    source, value = default_model_source()
    return [f"--{source}", value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="univigu", description="Uni-ViGU: serve, run and train the model.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", help="run the HTTP gateway (uvicorn)")
    gateway.add_argument("--host", help="bind address (UNIVIGU_HOST, default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (UNIVIGU_PORT, default 8000)")
    gateway.set_defaults(handler=_gateway)

    register_worker_command(commands)

    up = commands.add_parser(
        "up", help="Redis (if REDIS_URL is unset), a gateway and a CPU worker, at once, kept running"
    )
    up.add_argument("--host", help="gateway bind address")
    up.add_argument("--port", type=int, help="gateway port (default 8000)")
    up_source = up.add_mutually_exclusive_group()
    up_source.add_argument("--preset", help="random-init preset (default: the shipped toy model, else tiny)")
    up_source.add_argument("--weights", type=Path, help="a folder in our saved format")
    up.add_argument("--device", default="cpu", help="the worker's device (default cpu)")
    up.add_argument(
        "--data-dir",
        type=Path,
        help="Redis's data and the results (UNIVIGU_DATA_DIR; default ~/.local/share/univigu on Linux)",
    )
    up.add_argument(
        "--metrics-port",
        dest="worker_metrics_port",
        type=int,
        help="the worker's metrics port (UNIVIGU_WORKER_METRICS_PORT; default 9100, another free one if "
        "9100 is taken; 0 turns it off)",
    )
    up.set_defaults(handler=_up)

    register_submit_command(commands)
    register_healthcheck_command(commands)

    try:
        from model.cli import register as register_model_commands
    except ImportError as exc:  # a gateway-only install: the model's commands are not available
        log.debug("model commands unavailable: %s", exc)
    else:
        register_model_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.handler(args) or 0)
