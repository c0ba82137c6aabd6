"""The order in which examples are seen: an endless stream of per-epoch permutations.

Position ``p`` of the stream is example ``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e``
is a permutation drawn from the run seed and ``e``. A step takes the next ``global_batch_size``
positions and each process its own slice of them, so the data-loader state is one number (the
positions consumed), resuming is exact, and the split over processes does not change the batch.
"""

from __future__ import annotations

import torch


class ExampleStream:
    """Maps absolute stream positions to example indices."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self._epoch = -1
        self._permutation: list[int] = []

    def epoch_of(self, position: int) -> int:
        return position // self.num_examples

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_examples, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[offset]


def micro_batch_positions(
    step: int, micro: int, *, global_batch: int, grad_accum: int, rank: int, world_size: int
) -> list[int]:
    """Stream positions of micro-batch ``micro`` of optimizer step ``step`` on process ``rank``."""
    per_micro = global_batch // grad_accum
    per_rank = per_micro // world_size
    start = step * global_batch + micro * per_micro + rank * per_rank
    return list(range(start, start + per_rank))
