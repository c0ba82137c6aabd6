"""One or many processes: the same training script alone or under ``torchrun`` with PyTorch FSDP2.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every process joins a process group
(NCCL on CUDA, gloo on the CPU), each transformer block and then the whole transformer are sharded
with ``fully_shard``, and gradients are averaged by FSDP's reduce-scatter. Alone, the model stays a
plain module. Full (unsharded) model and optimizer states for checkpoints go through
``torch.distributed.checkpoint.state_dict``, which handles both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from model.network import UniViGUTransformer

GATHER_TO_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Unsharded tensors on the CPU of the main process only (the others receive empty dicts)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group when launched by it; otherwise a single process.

    ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available and the CPU otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return DistContext(rank, world_size, target)


def shard(model: UniViGUTransformer, context: DistContext) -> UniViGUTransformer:
    """FSDP2: each block, then the root (embeddings, heads), sharded over all processes."""
    if not context.distributed:
        return model
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def mean_over_processes(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The element-wise mean of ``values`` over all processes (a copy on this device)."""
    values = values.detach().clone()
    if context.distributed:
        dist.all_reduce(values)
        values /= context.world_size
    return values


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, unsharded, on the main process's CPU (collective under FSDP)."""
    state = get_model_state_dict(model, options=GATHER_TO_MAIN)
    return {k: v.detach().cpu() for k, v in state.items()}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` unsharded on this process's CPU (a collective when it is an FSDP2 DTensor)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` on ``like``'s device and dtype, and sharded as ``like`` is when it is a DTensor."""
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements) if isinstance(like, DTensor) else full


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"state": {fqn: {name: tensor}}, "param_groups": [...]}`` unsharded on the main process's CPU
    (collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER_TO_MAIN)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a state from :func:`full_optimizer_state`; every process passes the full state."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shutdown(context: DistContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
