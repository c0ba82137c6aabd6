"""An exponential moving average of the trainable weights, which diffusion training often ships.

After every optimizer step ``k`` (0-based) each shadow tensor moves towards its parameter:
``shadow = d_k * shadow + (1 - d_k) * parameter`` with ``d_k = min(decay, (1 + k) / (10 + k))``. The
bounded warm-up is diffusers' ``EMAModel`` default: the early average follows the fast-moving weights
instead of dragging the initial ones along, so a run from random weights needs no separate schedule.
``d_k`` is a function of the step alone, so a resumed run continues the average exactly.

Under FSDP2 the parameters are DTensors; the shadow tensors are DTensors of the same sharding, each
process averaging its own shard. :meth:`WeightEMA.full_state` gathers them (a collective). The cost
is one more copy of the trainable weights (of this process's shard) on the training device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.training import distributed

EMA_FILE = "ema.safetensors"


def ema_decay(decay: float, step: int) -> float:
    """The decay of the update after optimizer step ``step`` (0-based)."""
    return min(decay, (1 + step) / (10 + step))


class WeightEMA:
    """Shadow copies of ``model``'s trainable parameters (create it after sharding)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self._parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self._parameters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the parameters as they are after optimizer step ``step`` (0-based)."""
        weight = 1.0 - ema_decay(self.decay, step)
        for name, shadow in self.shadow.items():
            shadow.lerp_(self._parameters[name].detach(), weight)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every shadow tensor unsharded on the CPU (every process must call it)."""
        return {name: distributed.full_tensor(shadow) for name, shadow in self.shadow.items()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`full_state`'s tensors (each process passes all of them)."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise CheckpointError(f"the EMA state lacks {len(missing)} tensors, e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(distributed.shard_like(state[name], shadow))


def save_ema(state: dict[str, torch.Tensor], folder: Path) -> None:
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, folder / EMA_FILE)


def read_ema(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / EMA_FILE
    if not path.is_file():
        raise CheckpointError("the run averages its weights (ema_decay > 0) but has no EMA", file=str(path))
    return load_file(path)
