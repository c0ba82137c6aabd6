"""Training the tiny Wan VAE (diffusers' ``AutoencoderKLWan``) to reconstruct toy clips.

A randomly initialised VAE first learns to output black frames (most pixels are black); the
object-weighted L1 loss below counts object pixels ``1 + object_weight`` times, which moves it off
that plateau. The decoder sees reparameterised posterior samples, so the posterior variance the
training cache samples from stays small; a small KL term keeps the latents near unit scale.
Clips are random windows of ``clip_frames`` (a ``4k + 1`` count): the causal VAE applies the same
weights to every 4-frame chunk, and short windows cost a fraction of a full clip.
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
    steps: int = 1500
    batch_size: int = 4
    clip_frames: int = 5  # 4k + 1
    lr: float = 1e-3
    object_weight: float = 10.0
    kl_weight: float = 1e-4
    seed: int = 0


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, object_weight: float
) -> torch.Tensor:
    """Object-weighted L1: ``reconstruction, target (B, 3, T, H, W)`` in [-1, 1] -> scalar."""
    foreground = (target.max(dim=1, keepdim=True).values > -0.5).float()  # (B, 1, T, H, W)
    weight = 1.0 + object_weight * foreground
    return (weight * (reconstruction - target).abs()).sum() / weight.expand_as(target).sum()


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
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for step in range(config.steps):
        batch = []
        for _ in range(config.batch_size):
            clip = clips[rng.randrange(len(clips))]
            start = rng.randrange(clip.shape[0] - config.clip_frames + 1)
            batch.append(clip[start : start + config.clip_frames])
        pixels = torch.from_numpy(np.stack(batch)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = reconstruction_loss(reconstruction, pixels, config.object_weight) + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    vae.eval().requires_grad_(False)
    return losses
