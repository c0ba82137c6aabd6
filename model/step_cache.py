"""An opt-in per-job step cache in the spirit of first-block caching (and TeaCache).

Between neighbouring denoising steps the network's input changes little, and so does what its blocks
add to it. :class:`FirstBlockCache` wraps the transformer call of one job. Each call runs the
embeddings and the first block, and measures how far the first block's residual (its output minus
its input) has moved since the last step on which every block ran:

    change = mean |r_1 - r_1_ref| / mean |r_1_ref|

Below ``threshold`` the remaining blocks are skipped and the residual they added on that last full
step is added instead; otherwise they run and both references are refreshed. The reference stays at
the last full step, so small changes cannot add up unnoticed over several skipped steps. The heads
always run. With ``threshold = 0`` no step is skipped and the output equals the plain network's.

The cache knows nothing about sampling: it has the network's call signature, and the pipeline passes
it to the sampler loop in place of the network. Use one instance per job (its references belong to
that job's trajectory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import limits
from model.network import UniViGUTransformer


@dataclass
class CacheStats:
    """Steps of one job whose remaining blocks ran (``computed``) or were replaced (``skipped``)."""

    computed: int = 0
    skipped: int = 0


def check_threshold(threshold: float) -> float:
    """A step-cache threshold: a relative change in ``[0, 1]`` (0.05 to 0.2 are typical)."""
    return limits.RULES["step_cache"].check(threshold)


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> float:
    """``mean |current - reference| / mean |reference|`` of two same-shaped tensors, in float32."""
    reference = reference.float()
    scale = reference.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
    return float((current.float() - reference).abs().mean() / scale)


class FirstBlockCache:
    """The transformer of one job with its remaining blocks skipped on steps that change little."""

    def __init__(self, network: UniViGUTransformer, threshold: float) -> None:
        self.network = network
        self.threshold = check_threshold(threshold)
        self.stats = CacheStats()
        self._first_residual: torch.Tensor | None = None  # (B, Nv + L, D) at the last full step
        self._rest_residual: torch.Tensor | None = None  # (B, Nv + L, D) what blocks 2..N added then

    def _cached_rest(self, first_residual: torch.Tensor) -> torch.Tensor | None:
        """What blocks 2..N added on the last full step, when this step may reuse it; else None."""
        reference, rest = self._first_residual, self._rest_residual
        if reference is None or rest is None or reference.shape != first_residual.shape:
            return None
        return rest if relative_change(first_residual, reference) < self.threshold else None

    def __call__(
        self,
        x_v: torch.Tensor,
        x_t: torch.Tensor,
        time_v: torch.Tensor,
        time_t: torch.Tensor,
        cond: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        compute_velocity: bool = True,
        compute_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The network's forward pass (same arguments and outputs as :meth:`UniViGUTransformer.forward`)."""
        network = self.network
        hidden, state = network.embed(x_v, x_t, time_v, time_t, cond, text_mask)  # (B, Nv + L, D)
        first = network.run_blocks(hidden, state, network.blocks[:1])
        first_residual = first - hidden
        rest = self._cached_rest(first_residual)
        if rest is not None:
            out = first + rest
            self.stats.skipped += 1
        else:
            out = network.run_blocks(first, state, network.blocks[1:])
            self._first_residual, self._rest_residual = first_residual, out - first
            self.stats.computed += 1
        return network.heads(out, state, compute_velocity=compute_velocity, compute_logits=compute_logits)
