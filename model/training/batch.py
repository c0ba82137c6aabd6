"""Assemble one micro-batch of model inputs and targets from cached examples and their draws."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.text import TextSide
from model.training.config import ObjectiveConfig, Stage
from model.training.data import TrainingExample, load_posterior
from model.training.objective import (
    CLEAN_TEXT,
    CLEAN_VIDEO,
    ExampleDraw,
    draw_example,
    example_generator,
    text_path,
    video_path,
)


@dataclass(frozen=True)
class TrainBatch:
    """Inputs of one forward pass and the targets of its losses, on the training device."""

    x_v: torch.Tensor  # (B, C, f, h, w) noisy (or clean) latent
    x_t: torch.Tensor  # (B, L) token ids
    time_v: torch.Tensor  # (B,) 0..1000
    time_t: torch.Tensor  # (B,) 0..1000
    cond: torch.Tensor  # (B, Lc, text_dim)
    text_mask: torch.Tensor  # (B, L); all ones except the padding of clean prompts
    video_target: torch.Tensor  # (B, C, f, h, w) velocity noise - x0
    text_target: torch.Tensor  # (B, L) clean ids
    video_on: torch.Tensor  # (B,) 1 where the video loss counts
    text_on: torch.Tensor  # (B,) 1 where the text loss counts


def build_batch(
    examples: list[TrainingExample],
    positions: list[int],
    *,
    seed: int,
    stage: Stage,
    text: TextSide,
    objective: ObjectiveConfig,
    text_tokens: int,
    vocab_size: int,
    device: torch.device,
) -> TrainBatch:
    """The micro-batch of ``examples`` at absolute stream ``positions`` (see ``objective``)."""
    # 1. Clean latents: one posterior sample per example.
    posteriors = [load_posterior(example.latent) for example in examples]
    shape = tuple(posteriors[0][0].shape)
    draws: list[ExampleDraw] = [
        draw_example(example_generator(seed, p), shape, text_tokens, vocab_size, objective, stage)
        for p in positions
    ]
    x0 = torch.stack(
        [
            mean + (0.5 * logvar).exp() * d.latent_eps
            for (mean, logvar), d in zip(posteriors, draws, strict=True)
        ]
    )
    # 2. Video path.
    sigma = torch.tensor([d.sigma for d in draws], dtype=torch.float32)
    noise = torch.stack([d.video_noise for d in draws])
    x_v, video_target = video_path(x0, noise, sigma)
    # 3. Text: the clean target on the mixture path, or the prompt held clean with its mask.
    target, _ = text.tokenize([e.target for e in examples], text_tokens)
    prompt, prompt_mask = text.tokenize([e.prompt for e in examples], text_tokens)
    target, prompt, prompt_mask = target.cpu(), prompt.cpu(), prompt_mask.cpu()
    t = torch.tensor([d.text_t for d in draws], dtype=torch.float32)
    noisy = text_path(
        target, torch.stack([d.token_noise for d in draws]), torch.stack([d.token_keep for d in draws]), t
    )
    clean_text = torch.tensor([d.kind == CLEAN_TEXT for d in draws])
    x_t = torch.where(clean_text[:, None], prompt, noisy)
    text_mask = torch.where(clean_text[:, None], prompt_mask, torch.ones_like(prompt_mask))
    # 4. Conditions: the prompt, all zeros (dropped) or the empty prompt (unconditional).
    cond = text.encode([e.prompt for e in examples]).float()
    zero_rows = torch.tensor([d.drop_prompt for d in draws], device=cond.device)
    null_rows = torch.tensor([d.uncond for d in draws], device=cond.device)
    cond = torch.where(zero_rows[:, None, None], torch.zeros_like(cond), cond)
    cond = torch.where(null_rows[:, None, None], text.null_condition().float().expand_as(cond), cond)
    video_on = torch.tensor([float(d.kind != CLEAN_VIDEO) for d in draws])
    return TrainBatch(
        x_v=x_v.to(device),
        x_t=x_t.to(device),
        time_v=(1000.0 * sigma).to(device),
        time_t=(1000.0 * (1.0 - t)).to(device),
        cond=cond.to(device),
        text_mask=text_mask.to(device),
        video_target=video_target.to(device),
        text_target=target.to(device),
        video_on=video_on.to(device),
        text_on=(~clean_text).float().to(device),
    )
