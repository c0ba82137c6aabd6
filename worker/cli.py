"""`univigu worker`: the command that starts one worker (registered into the ``univigu`` command by
:func:`register`). Importing this module does not import torch; running the command does."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.contract.settings import load_settings

log = logging.getLogger("univigu")

EXIT_CONFIGURATION = 2
"""The worker's exit status when its settings keep it from starting (restarting it cannot help)."""

SETTING_FLAGS = (
    "device",
    "devices",
    "guidance_parallel",
    "sequence_parallel",
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
"""Settings that a flag of `univigu worker` overrides (the rest come from ``UNIVIGU_*``)."""


def register(commands: Any) -> None:
    """Add `worker` to the `univigu` subcommands (``commands`` is argparse's subparsers action)."""
    worker = commands.add_parser("worker", help="run one worker (one per GPU); loads the model once")
    worker.add_argument("--device", help="torch device, e.g. cuda:0 (UNIVIGU_DEVICE, default cpu)")
    worker.add_argument(
        "--devices",
        help="a worker group: comma-separated devices that run every job together, e.g. cuda:0,cuda:1 "
        "(UNIVIGU_DEVICES; starts torchrun, one process per device); see docs/multi-gpu.md",
    )
    worker.add_argument(
        "--guidance-parallel",
        type=int,
        choices=[1, 2],
        help="a worker group's guidance split: 2 runs the two passes of a guided step on two halves (default 1)",
    )
    worker.add_argument(
        "--sequence-parallel",
        type=int,
        help="a worker group's token split: the devices that share each pass (default: the rest of the group)",
    )
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
    worker.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from worker.group import GroupLayoutError, in_torchrun
    from worker.launch import launch_group
    from worker.loading import LimitsExcludeDefaults, ModelSpec, ModelSpecError
    from worker.main import MetricsPortUnavailable, serve, serve_in_group

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    try:
        settings = load_settings(**overrides)
        spec = ModelSpec.from_settings(settings)
        if in_torchrun():
            serve_in_group(settings, spec, name=args.name, burst=args.burst)
        elif len(settings.devices) > 1:
            return launch_group(settings, name=args.name, burst=args.burst, log_level=args.log_level)
        else:
            serve(settings, spec, name=args.name, burst=args.burst)
    except (
        ValidationError,
        ModelSpecError,
        MetricsPortUnavailable,
        GroupLayoutError,
        LimitsExcludeDefaults,
    ) as exc:
        log.error("%s", exc)
        return EXIT_CONFIGURATION
    return 0
