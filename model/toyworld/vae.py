"""Training the tiny Wan VAE (diffusers' ``AutoencoderKLWan``) to reconstruct toy clips.

It is trained as a deterministic autoencoder: the decoder reconstructs the posterior *mean*. With
reparameterised samples a fresh VAE's posterior variance starts near 1 while its means are small, so
the samples carry no information and reconstruction stalls (seen in a probe). A randomly initialised
VAE also first learns to output black frames; the object-weighted squared error counts object pixels
``1 + object_weight`` times, which moves it off that plateau.

Three phases, each with a one-cycle learning rate (warm-up, then cosine annealing), with calibration
between the second and the third:

1. ``steps`` on random windows of ``clip_frames`` (a ``4k + 1`` count), which cost a fraction of a full
   clip. A window is a first frame and one 4-frame chunk, so this phase never trains the causal cache
   that carries a chunk's features into the next one: after it, the first frames are reconstructed
   well and later chunks drift in colour (colour read right on 72% of clips).
2. ``whole_clip_steps`` on whole clips at a lower rate, which fixes the later chunks (colour 97%, motion
   100% of clips read right by the detector after 600 steps).
3. :func:`refine_decoder`: ``decoder_steps`` on whole clips that train the decoder alone, on the frozen
   encoder's latents, computed once. After phase 2 the encoder's latents already tell the shape apart (a
   two-layer convolutional probe on the first latent frame classifies it 100% right) while the decoder
   still draws rounded blobs; training the decoder alone is what makes it draw the shapes (the shipped
   VAE keeps the shape of 85-97% of seen clips in the evaluation's reconstruction row). A step costs
   about half a whole-clip step, and since the latent space does not move, the phase can also refine
   the decoder of a model whose transformer is already trained (as Stable Diffusion's ``ft-MSE``
   decoder did).

:func:`calibrate` rewrites the two 1x1x1 convolutions around the latent, without changing any
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

from model.pixels import frames_to_pixels

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
    decoder_steps: int = 1000
    decoder_batch_size: int = 2
    decoder_lr: float = 1e-3
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
    """Train ``vae`` in place on uint8 ``clips (N, T, H, W, 3)`` (phases 1-2, calibration, phase 3);
    returns the loss of every step."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    losses: list[float] = []
    vae.train().requires_grad_(True)
    phases = (
        (config.steps, config.batch_size, config.clip_frames, config.lr),
        (config.whole_clip_steps, config.whole_clip_batch_size, clips.shape[1], config.whole_clip_lr),
    )
    for steps, batch_size, frames, lr in phases:

        def batch_loss(batch_size: int = batch_size, frames: int = frames) -> torch.Tensor:
            pixels = _windows(clips, batch_size, frames, rng)
            reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
            return reconstruction_loss(reconstruction, pixels, config.object_weight)

        _optimise(list(vae.parameters()), steps, lr, config.warmup_fraction, batch_loss, losses, on_step)
    vae.eval().requires_grad_(False)
    calibrate(vae, clips[: config.calibration_clips])
    refine_decoder(vae, clips, config, losses, on_step)
    return losses


def refine_decoder(
    vae: AutoencoderKLWan,
    clips: np.ndarray,
    config: VAETrainConfig,
    losses: list[float] | None = None,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Phase 3 (module docstring): ``config.decoder_steps`` steps on the decoder of ``vae`` alone,
    reconstructing whole uint8 ``clips (N, T, H, W, 3)`` from the encoder's posterior means.

    The encoder is left exactly as it was. Appends each step's loss to ``losses`` and returns it."""
    losses = [] if losses is None else losses
    if config.decoder_steps == 0:
        return losses
    rng = random.Random(config.seed)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(frames_to_pixels(clips[i : i + 16])).latent_dist.mean
                for i in range(0, len(clips), 16)
            ]
        )  # (N, z, f, h, w)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in decoder:
        parameter.requires_grad_(True)
    vae.decoder.train()

    def batch_loss() -> torch.Tensor:
        chosen = [rng.randrange(len(clips)) for _ in range(config.decoder_batch_size)]
        reconstruction = vae.decode(latents[chosen]).sample
        return reconstruction_loss(reconstruction, frames_to_pixels(clips[chosen]), config.object_weight)

    _optimise(
        decoder, config.decoder_steps, config.decoder_lr, config.warmup_fraction, batch_loss, losses, on_step
    )
    vae.eval().requires_grad_(False)
    return losses


def _optimise(
    parameters: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    warmup_fraction: float,
    batch_loss: Callable[[], torch.Tensor],
    losses: list[float],
    on_step: StepCallback | None,
) -> None:
    """``steps`` AdamW steps on ``batch_loss()`` with a one-cycle rate peaking at ``lr`` and gradients
    clipped to norm 1; appends each loss to ``losses``."""
    if steps == 0:
        return
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=warmup_fraction
    )
    for _ in range(steps):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses), losses[-1])


def _windows(clips: np.ndarray, batch_size: int, frames: int, rng: random.Random) -> torch.Tensor:
    """``batch_size`` random windows of ``frames`` frames of ``clips (N, T, H, W, 3)`` uint8, as
    ``(B, 3, frames, H, W)`` in [-1, 1]."""
    batch = []
    for _ in range(batch_size):
        clip = clips[rng.randrange(len(clips))]
        start = rng.randrange(clip.shape[0] - frames + 1)
        batch.append(clip[start : start + frames])
    return frames_to_pixels(np.stack(batch))


@torch.no_grad()
def calibrate(vae: AutoencoderKLWan, clips: np.ndarray) -> None:
    """Unit-scale, nearly deterministic latents with unchanged reconstructions (module docstring).

    With per-channel mean ``m`` and std ``s`` of the posterior means of ``clips (N, T, H, W, 3)``:
    ``mu' = (mu - m) / s`` in ``quant_conv``, and ``post_quant_conv`` maps ``mu'`` as it mapped ``mu``.
    """
    z_dim = vae.config.z_dim
    means = torch.cat(
        [vae.encode(frames_to_pixels(clip[None])).latent_dist.mean for clip in clips]
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
