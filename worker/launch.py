"""`univigu worker --devices a,b,...`: start a worker group under torchrun, one process per device.

This process becomes torchrun's agent (``torch.distributed.run``, standalone rendezvous on a free local
port). Each child is `univigu worker` again and reads the same settings from its environment; torchrun
tells it its rank (:mod:`worker.group`). When a child fails, torchrun stops the others and this command
exits 1, so that its supervisor starts the group again (2 when the layout cannot work: restarting would
not help); a stop request (SIGTERM) reaches every child, the leader finishes its job, and the group exits 0.
"""

from __future__ import annotations

import logging
import os

from service.contract.settings import Settings
from worker.cli import EXIT_CONFIGURATION

log = logging.getLogger(__name__)


def launch_group(settings: Settings, *, name: str | None, burst: bool, log_level: str) -> int:
    """Run `univigu worker` on each of ``settings.devices`` under torchrun; the group's exit status: 0, the
    first failed rank's :data:`EXIT_CONFIGURATION` when its settings kept it from starting, else 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.update(settings.environment())
    worker = [
        "--log-level",
        log_level,
        "worker",
        *(["--name", name] if name else []),
        *(["--burst"] if burst else []),
    ]
    torchrun = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={len(settings.devices)}",
            "--max-restarts=0",  # a broken group exits: its supervisor restarts it
            # A stop request lets the leader finish its job, as one worker does; the supervisor's own grace
            # period (compose's stop_grace_period) decides how long that may take.
            f"--shutdown-timeout={settings.job_timeout_seconds}",
            "--module",
            "service.cli",
            *worker,
        ]
    )
    try:
        run(torchrun)
    except ChildFailedError as exc:
        failure = exc.get_first_failure()[1]
        log.error("the worker group stopped: rank %d exited with %d", failure.local_rank, failure.exitcode)
        return EXIT_CONFIGURATION if failure.exitcode == EXIT_CONFIGURATION else 1
    except SignalException as exc:
        log.info("the worker group stopped on %s", exc.sigval.name)
    return 0
