"""Training the tiny Wan VAE (diffusers' ``AutoencoderKLWan``) to reconstruct toy clips.

It is trained as a deterministic autoencoder: the decoder reconstructs the posterior *mean*. With
reparameterised samples a fresh VAE's posterior variance starts near 1 while its means are small, so
the samples carry no information and reconstruction stalls (seen in a probe). A randomly initialised
VAE also first learns to output black frames; the object-weighted squared error counts object pixels
``1 + object_weight`` times, which moves it off that plateau. Clips are random windows of
``clip_frames`` (a ``4k + 1`` count): the causal VAE applies the same weights to every 4-frame chunk,
and short windows cost a fraction of a full clip.

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
    steps: int = 1500
    batch_size: int = 4
    clip_frames: int = 5  # 4k + 1
    lr: float = 1e-3
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
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for step in range(config.steps):
        batch = []
        for _ in range(config.batch_size):
            clip = clips[rng.randrange(len(clips))]
            start = rng.randrange(clip.shape[0] - config.clip_frames + 1)
            batch.append(clip[start : start + config.clip_frames])
        pixels = torch.from_numpy(np.stack(batch)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        loss = reconstruction_loss(reconstruction, pixels, config.object_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    vae.eval().requires_grad_(False)
    calibrate(vae, clips[: config.calibration_clips])
    return losses


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
