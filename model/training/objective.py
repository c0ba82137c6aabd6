"""The training objective: video flow matching plus text discrete flow matching (spec §5, §7).

Video: ``sigma = shift*u / (1 + (shift-1)*u)`` with ``u ~ U(0, 1)`` (the inference schedule's shift),
``x_sigma = (1 - sigma) * x0 + sigma * noise``, target velocity ``noise - x0``, model time
``1000 * sigma``; loss: mean squared error.

Text: the mixture path with ``kappa(t) = t``: every position holds its clean token with probability
``t`` and a uniform random id otherwise, ``t ~ U(0, 1)``, model time ``(1 - t) * 1000``; loss:
cross-entropy of the logits against the clean tokens at every position of the stream, padding
included, because captioning runs without a text mask and reads up to the first ``</s>``.

Each example is one of three kinds, so that all inference modes are trained:

* ``JOINT``: both streams noisy, their times drawn independently (joint mode);
* ``CLEAN_VIDEO``: the video latent clean at time 0, text noisy (captioning); no video loss;
* ``CLEAN_TEXT``: the prompt clean at time 0 with its padding mask, video noisy (text-to-video);
  no text loss.

Every random draw of an example comes from a generator seeded by the run seed and the example's
absolute position in the data stream, so a batch is the same whether it is computed in one process
or split over several, and a resumed run draws exactly what the uninterrupted run would have.

Unconditional examples for guidance: clean-text examples swap the umT5 condition for the empty-prompt
encoding with probability ``uncond_prob`` and keep the clean prompt in the text stream, exactly as
our inference builds its unconditional pass (spec §5), so training and inference agree. The prompt
still reaches the video through the joint self-attention, so guidance amplifies only what the
cross-attention adds; a recipe that also noised the text stream would need the same change in the
pipeline's guided pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.training.config import ObjectiveConfig, Stage

JOINT, CLEAN_VIDEO, CLEAN_TEXT = 0, 1, 2


def example_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the example at absolute stream ``position`` of a run seeded with ``seed``."""
    digest = hashlib.sha256(f"{seed}:{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Uniform ``u`` -> noise level ``shift*u / (1 + (shift-1)*u)``, as the inference schedule shifts."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass(frozen=True)
class ExampleDraw:
    """Everything random about one example (CPU tensors)."""

    kind: int
    sigma: float  # video noise level; 0 for CLEAN_VIDEO
    text_t: float  # probability of a clean token; 1 for CLEAN_TEXT
    drop_prompt: bool  # all-zero condition (noisy-text examples)
    uncond: bool  # empty-prompt condition (CLEAN_TEXT examples)
    latent_eps: torch.Tensor  # (C, f, h, w) posterior sample noise
    video_noise: torch.Tensor  # (C, f, h, w)
    token_noise: torch.Tensor  # (L,) int64 uniform ids
    token_keep: torch.Tensor  # (L,) uniform draws; a position is clean where < text_t


def draw_example(
    generator: torch.Generator,
    latent_shape: tuple[int, ...],
    text_tokens: int,
    vocab_size: int,
    objective: ObjectiveConfig,
    stage: Stage,
) -> ExampleDraw:
    """Draw one example's kind, times, condition choices and noises (always in the same order)."""
    scalars = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    kind_u, video_u, text_u, drop_u, uncond_u = scalars
    if kind_u < objective.clean_video_fraction:
        kind = CLEAN_VIDEO
    elif kind_u < objective.clean_video_fraction + objective.clean_text_fraction:
        kind = CLEAN_TEXT
    else:
        kind = JOINT
    sigma = 0.0 if kind == CLEAN_VIDEO else float(shifted_sigma(torch.tensor(video_u), objective.shift))
    return ExampleDraw(
        kind=kind,
        sigma=sigma,
        text_t=1.0 if kind == CLEAN_TEXT else text_u,
        drop_prompt=kind != CLEAN_TEXT and drop_u < objective.prompt_drop(stage),
        uncond=kind == CLEAN_TEXT and uncond_u < objective.uncond_prob,
        latent_eps=torch.randn(latent_shape, generator=generator),
        video_noise=torch.randn(latent_shape, generator=generator),
        token_noise=torch.randint(0, vocab_size, (text_tokens,), generator=generator),
        token_keep=torch.rand(text_tokens, generator=generator),
    )


def video_path(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0, noise (B, C, f, h, w)``, ``sigma (B,)`` -> ``(x_sigma, target velocity noise - x0)``."""
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, noise - x0


def text_path(
    clean: torch.Tensor, noise: torch.Tensor, keep_u: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Mixture path sample: ``clean, noise, keep_u (B, L)``, ``t (B,)`` -> ``x_t (B, L)``."""
    return torch.where(keep_u < t[:, None], clean, noise)


@dataclass(frozen=True)
class LossTerms:
    """Scalar losses averaged over the micro-batch (examples without a term count as zero)."""

    video: torch.Tensor
    text: torch.Tensor

    def total(self, objective: ObjectiveConfig) -> torch.Tensor:
        return objective.video_weight * self.video + objective.text_weight * self.text


def flow_matching_losses(
    velocity: torch.Tensor,
    logits: torch.Tensor,
    video_target: torch.Tensor,
    text_target: torch.Tensor,
    video_on: torch.Tensor,
    text_on: torch.Tensor,
) -> LossTerms:
    """``velocity, video_target (B, C, f, h, w)``, ``logits (B, L, V)``, ``text_target (B, L)``,
    ``video_on, text_on (B,)`` 0/1 -> per-term means over the B examples.

    The denominator is the micro-batch size, not the number of active examples, so the mean over
    processes of per-process losses equals the loss of the whole batch in one process.
    """
    video = (velocity.float() - video_target.float()).pow(2).flatten(1).mean(1)  # (B,)
    text = F.cross_entropy(logits.float().transpose(1, 2), text_target, reduction="none").mean(1)  # (B,)
    return LossTerms(video=(video * video_on).mean(), text=(text * text_on).mean())
