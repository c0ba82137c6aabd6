"""Captioning with the clean video's keys and values reused across text steps.

While a video is captioned, its latent is clean and fixed; only the text changes from step to step. A
full pass over ``[video | text]`` keeps every block's self-attention keys and values
(:meth:`UniViGUTransformer.forward_keeping_video`); the steps after it run only the text tokens
(:meth:`UniViGUTransformer.forward_text`), whose queries read the kept video rows. The video tokens
also read the text in that attention, so what they offer the text stays as the last full pass saw it:
an approximation, renewed by a full pass every ``interval`` steps. ``interval = 1`` runs a full pass at
every step, which is the exact sampler; ``interval >= steps`` runs one full pass only.

The full pass sees the current (noisy) tokens, as the exact sampler's pass at that step does; its
logits are exact. A text-only pass costs about ``L / (Nv + L)`` of a full one at the real shape (a
caption of 256 tokens against 32,760 video tokens at 480x832, 81 frames); its FLOP model and measured
figures are in ``BENCHMARKS.md``.

:class:`VideoReuse` wraps the transformer for one caption batch; the pipeline calls it with the step
index, so the schedule (which step is a full pass) lives here, and the network knows nothing about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import limits
from model.network import UniViGUTransformer, VideoKeyValues


def check_interval(interval: int) -> int:
    """A refresh interval within ``limits.RULES["video_reuse"]`` (1 = exact, ``>= steps`` = one full pass)."""
    return int(limits.RULES["video_reuse"].check(interval))


@dataclass
class PassCounts:
    """Steps of one caption batch run as full passes (video and text) or as text-only passes."""

    full: int = 0
    text_only: int = 0


class VideoReuse:
    """The transformer of one caption batch: a full pass every ``interval`` steps, text-only passes between.

    Use one instance per batch and call it at every step in order: the kept keys and values belong
    to that batch's videos and rows (:meth:`keep_rows` when rows leave the batch).
    """

    def __init__(self, network: UniViGUTransformer, interval: int, steps: int) -> None:
        self.network = network
        self.interval = check_interval(interval)
        self.steps = steps
        self.passes = PassCounts()
        self._video: VideoKeyValues | None = None

    def is_full_step(self, index: int) -> bool:
        """Whether step ``index`` runs a full pass: every ``interval``-th step from the first."""
        return index % self.interval == 0

    def __call__(
        self, index: int, x_v: torch.Tensor, x_t: torch.Tensor, time_t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(B, L, V)`` of step ``index`` for the clean latent ``x_v (B, C, f, h, w)`` (time 0), the
        tokens ``x_t (B, L)`` at text time ``time_t (B,)`` and the condition ``cond (B, Lc, text_dim)``."""
        network = self.network
        if not self.is_full_step(index) and self._video is not None:
            self.passes.text_only += 1
            return network.forward_text(x_t, time_t, cond, self._video)
        self.passes.full += 1
        time_v = torch.zeros_like(time_t)
        if self.is_full_step(index + 1) or index + 1 == self.steps:  # no text-only step follows
            self._video = None
            _, logits = network(x_v, x_t, time_v, time_t, cond, compute_velocity=False)
        else:
            logits, self._video = network.forward_keeping_video(x_v, x_t, time_v, time_t, cond)
        assert logits is not None  # compute_logits is on
        return logits

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows (B',)`` (int64 indices) of what the last full pass kept."""
        if self._video is not None:
            self._video = self._video.select(rows)
