"""Training the tiny Wan VAE (diffusers' ``AutoencoderKLWan``) to reconstruct toy clips.

It is trained as a deterministic autoencoder: the decoder reconstructs the posterior *mean*. With
reparameterised samples a fresh VAE's posterior variance starts near 1 while its means are small, so
the samples carry no information and reconstruction stalls (seen in a probe). A randomly initialised
VAE also first learns to output black frames; the object-weighted squared error counts object pixels
``1 + object_weight`` times, which moves it off that plateau.

Two phases, each with a one-cycle learning rate (warm-up, then cosine annealing):

1. ``steps`` on random windows of ``clip_frames`` (a ``4k + 1`` count), which cost a fraction of a full
   clip. A window is a first frame and one 4-frame chunk, so this phase never trains the causal cache
   that carries a chunk's features into the next one: after it, the first frames are reconstructed
   well and later chunks drift in colour (colour read right on 72% of clips).
2. ``whole_clip_steps`` on whole clips at a lower rate, which fixes the later chunks (colour 97%, motion
   100% of clips read right by the detector after 600 steps).

:func:`calibrate` then rewrites the two 1x1x1 convolutions around the latent, without changing any
reconstruction, so that the posterior mean has zero mean and unit variance per channel (the scale of
the flow-matching noise) and the log-variance is a constant :data:`LOG_VARIANCE`: the posterior samples
that the pipeline and the training cache draw equal the mean up to noise of std 0.0025.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class VAETrainConfig:
    """The VAE stage (module docstring); ``warmup_fraction`` of each phase's steps warm the rate up."""

    steps: int = 2500
    batch_size: int = 4
    clip_frames: int = 5  # 4k + 1
    lr: float = 2e-3
    whole_clip_steps: int = 600
    whole_clip_batch_size: int = 2
    whole_clip_lr: float = 5e-4
    warmup_fraction: float = 0.05
    object_weight: float = 20.0
    seed: int = 0
    calibration_clips: int = 32


LOG_VARIANCE = -12.0


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, object_weight: float
) -> torch.Tensor:
    """Object-weighted squared error: ``reconstruction, target (B, 3, T, H, W)`` in [-1, 1] -> scalar.

    Squared, not absolute: under L1 an all-black output stays optimal until object pixels carry half
    the weight, which left a probe on the black plateau."""
    foreground = (target.max(dim=1, keepdim=True).values > -0.5).float()  # (B, 1, T, H, W)
    weight = 1.0 + object_weight * foreground
    return (weight * (reconstruction - target).pow(2)).sum() / weight.expand_as(target).sum()


def train_vae(
    vae: AutoencoderKLWan,
    clips: np.ndarray,
    config: VAETrainConfig,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train ``vae`` in place on uint8 ``clips (N, T, H, W, 3)``; returns the loss of every step."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    vae.train().requires_grad_(True)
    phases = (
        (config.steps, config.batch_size, config.clip_frames, config.lr),
        (config.whole_clip_steps, config.whole_clip_batch_size, clips.shape[1], config.whole_clip_lr),
    )
    losses: list[float] = []
    for steps, batch_size, frames, lr in phases:
        if steps == 0:
            continue
        optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=steps, pct_start=config.warmup_fraction
        )
        for _ in range(steps):
            pixels = _windows(clips, batch_size, frames, rng)
            reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
            loss = reconstruction_loss(reconstruction, pixels, config.object_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses), losses[-1])
    vae.eval().requires_grad_(False)
    calibrate(vae, clips[: config.calibration_clips])
    return losses


def _windows(clips: np.ndarray, batch_size: int, frames: int, rng: random.Random) -> torch.Tensor:
    """``batch_size`` random windows of ``frames`` frames of ``clips (N, T, H, W, 3)`` uint8, as
    ``(B, 3, frames, H, W)`` in [-1, 1]."""
    batch = []
    for _ in range(batch_size):
        clip = clips[rng.randrange(len(clips))]
        start = rng.randrange(clip.shape[0] - frames + 1)
        batch.append(clip[start : start + frames])
    return torch.from_numpy(np.stack(batch)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


@torch.no_grad()
def calibrate(vae: AutoencoderKLWan, clips: np.ndarray) -> None:
    """Unit-scale, nearly deterministic latents with unchanged reconstructions (module docstring).

    With per-channel mean ``m`` and std ``s`` of the posterior means of ``clips (N, T, H, W, 3)``:
    ``mu' = (mu - m) / s`` in ``quant_conv``, and ``post_quant_conv`` maps ``mu'`` as it mapped ``mu``.
    """
    z_dim = vae.config.z_dim
    means = torch.cat(
        [
            vae.encode(
                torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
            ).latent_dist.mean
            for clip in clips
        ]
    )  # (N, z, f, h, w)
    shift = means.mean(dim=(0, 2, 3, 4))  # (z,)
    scale = means.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)  # (z,)
    encode_out, decode_in = vae.quant_conv, vae.post_quant_conv
    decode_in.bias += decode_in.weight[:, :, 0, 0, 0] @ shift
    decode_in.weight *= scale.view(1, -1, 1, 1, 1)
    encode_out.weight[:z_dim] /= scale.view(-1, 1, 1, 1, 1)
    encode_out.bias[:z_dim] = (encode_out.bias[:z_dim] - shift) / scale
    encode_out.weight[z_dim:] = 0.0
    encode_out.bias[z_dim:] = LOG_VARIANCE
