"""The `univigu` command: `gateway`, `worker` and `up` (plus the model's commands from model.cli).

`univigu gateway` never imports torch; `univigu worker` imports it when it loads the model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.settings import load_settings

log = logging.getLogger("univigu")


def _overrides(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = load_settings(**_overrides(args, "host", "port"))
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level.lower()
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.loading import ModelSpec, ModelSpecError
    from worker.main import serve

    names = (
        "device",
        "preset",
        "weights",
        "wan",
        "checkpoint",
        "null_prompt",
        "attention_backend",
        "video_sampler",
        "compile",
        "warmup_steps",
        "worker_metrics_port",
    )
    settings = load_settings(**_overrides(args, *names))
    try:
        spec = ModelSpec.from_settings(settings)
    except ModelSpecError as exc:
        log.error("%s", exc)
        return 2
    serve(settings, spec, name=args.name, burst=args.burst)
    return 0


def _up(args: argparse.Namespace) -> int:
    from service.up import run_up

    settings = load_settings(**_overrides(args, "host", "port"))
    return run_up(settings, model=_up_model(args), device=args.device)


def _up_model(args: argparse.Namespace) -> list[str]:
    """The worker's model arguments: as given, else the shipped toy model, else the tiny preset."""
    from model.toyworld import shipped_model

    if args.weights is not None:
        return ["--weights", str(args.weights)]
    toy = None if args.preset else shipped_model()
    return ["--weights", str(toy)] if toy else ["--preset", args.preset or "tiny"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="univigu", description="Uni-ViGU: serve, run and train the model.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", help="run the HTTP gateway (uvicorn)")
    gateway.add_argument("--host", help="bind address (UNIVIGU_HOST, default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (UNIVIGU_PORT, default 8000)")
    gateway.set_defaults(handler=_gateway)

    worker = commands.add_parser("worker", help="run one worker (one per GPU); loads the model once")
    worker.add_argument("--device", help="torch device, e.g. cuda:0 (UNIVIGU_DEVICE, default cpu)")
    source = worker.add_mutually_exclusive_group()
    source.add_argument("--preset", help="random-init preset, e.g. tiny")
    source.add_argument("--weights", type=Path, help="a folder in our saved format")
    source.add_argument("--wan", type=Path, help="a Wan2.1 Diffusers folder (with --checkpoint)")
    worker.add_argument("--checkpoint", type=Path, help="the Uni-ViGU checkpoint for --wan")
    worker.add_argument("--null-prompt", type=Path, help="precomputed empty-prompt embedding for --wan")
    worker.add_argument("--attention-backend", help="auto (default), native, flash, sage ...")
    worker.add_argument("--sampler", dest="video_sampler", choices=["euler", "unipc"], help="video sampler")
    worker.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the blocks (UNIVIGU_COMPILE; for CUDA)",
    )
    worker.add_argument("--warmup-steps", type=int, help="steps per warm-up job before serving; 0: none")
    worker.add_argument("--name", help="worker name (default host.pid.device)")
    worker.add_argument("--metrics-port", dest="worker_metrics_port", type=int, help="0 turns it off")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(handler=_worker)

    up = commands.add_parser("up", help="Redis (if REDIS_URL is unset), a gateway and a CPU worker, at once")
    up.add_argument("--host", help="gateway bind address")
    up.add_argument("--port", type=int, help="gateway port (default 8000)")
    up_source = up.add_mutually_exclusive_group()
    up_source.add_argument("--preset", help="random-init preset (default: the shipped toy model, else tiny)")
    up_source.add_argument("--weights", type=Path, help="a folder in our saved format")
    up.add_argument("--device", default="cpu", help="the worker's device (default cpu)")
    up.set_defaults(handler=_up)

    from service.submit_cli import register as register_submit_command

    register_submit_command(commands)

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


if __name__ == "__main__":
    sys.exit(main())
