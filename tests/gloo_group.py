"""Run one function on a group of real processes on the CPU, joined by a gloo process group.

``run_on_group(4, fn, *args)`` spawns four processes; each initialises torch.distributed (gloo, a file
rendezvous), calls ``fn(*args)`` and sends its return value back. ``fn`` must be importable by name (a
module-level function), and so must everything it returns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _member(rank: int, world_size: int, folder: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # the test machine has few cores and every rank computes
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        torch.save(fn(*args), Path(folder) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_group(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(*args)`` on ``world_size`` processes; the return value of each rank, in rank order."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _member, args=(world_size, folder, fn, args), nprocs=world_size, start_method="spawn"
        )
        return [torch.load(Path(folder) / f"{rank}.pt", weights_only=False) for rank in range(world_size)]
