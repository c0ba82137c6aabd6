"""Samplers: the shifted Euler schedule, UniPC, guidance, and the discrete text samplers' statistics."""

from __future__ import annotations

import math

import pytest
import torch

from model.errors import InvalidParameterError
from model.samplers import (
    FlowEulerSampler,
    MixturePathTextSampler,
    classifier_free_guidance,
    joint_text_update,
    make_video_sampler,
    sample_categorical,
    shifted_sigmas,
)


def test_shifted_sigmas_follow_the_spec() -> None:
    sigmas = shifted_sigmas(4, shift=3.0)
    plain = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sigmas, 3 * plain / (1 + 2 * plain))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_euler_model_times_are_thousand_sigma() -> None:
    sampler = FlowEulerSampler(4)
    torch.testing.assert_close(sampler.timesteps, (1000 * shifted_sigmas(4)[:-1]).float())


@pytest.mark.parametrize("name", ["euler", "unipc"])
def test_exact_velocity_lands_on_the_data(name: str) -> None:
    """On the straight path x_s = (1-s) x0 + s noise, the true velocity is noise - x0 at every step."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    sampler = make_video_sampler(name, 6)
    x = noise.clone()
    for index in range(len(sampler.timesteps)):
        x = sampler.step(noise - x0, index, x)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=1e-4)


def test_unknown_sampler_and_bad_steps() -> None:
    with pytest.raises(InvalidParameterError, match="'euler' or 'unipc'"):
        make_video_sampler("ddim", 10)
    with pytest.raises(InvalidParameterError, match="between 1 and 1000"):
        FlowEulerSampler(0)


def test_classifier_free_guidance() -> None:
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert classifier_free_guidance(cond, uncond, 5.0).item() == 6.0
    assert classifier_free_guidance(cond, uncond, 1.0).item() == 2.0


PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


def _stub_logits(positions: int) -> torch.Tensor:
    """A stub network's output: the same known distribution at every position, ``(1, positions, V)``."""
    return PROBS.log().expand(1, positions, -1)


def _assert_within(observed: float, expected: float, count: int) -> None:
    sigma = math.sqrt(expected * (1 - expected) / count)
    assert abs(observed - expected) < 5 * sigma + 1e-9, (observed, expected, sigma)


def test_categorical_sampling_matches_the_distribution() -> None:
    draws = sample_categorical(_stub_logits(200_000), torch.Generator().manual_seed(1))
    frequencies = torch.bincount(draws.flatten(), minlength=5).double() / draws.numel()
    for v in range(5):
        _assert_within(frequencies[v].item(), PROBS[v].item(), draws.numel())


def test_categorical_sampling_never_draws_a_token_without_mass() -> None:
    logits = torch.full((1, 50_000, 6), float("-inf"))
    logits[..., 1] = 0.0
    logits[..., 4] = 2.0
    draws = sample_categorical(logits, torch.Generator().manual_seed(2))
    assert set(draws.unique().tolist()) == {1, 4}
    _assert_within((draws == 4).double().mean().item(), math.exp(2) / (1 + math.exp(2)), draws.numel())


def test_categorical_sampling_in_chunks_is_the_same_as_at_once(monkeypatch) -> None:
    logits = torch.randn(3, 40, 11)
    at_once = sample_categorical(logits, torch.Generator().manual_seed(3))
    monkeypatch.setattr("model.samplers.SAMPLE_CHUNK_ELEMENTS", 11 * 7)
    chunked = sample_categorical(logits, torch.Generator().manual_seed(3))
    assert at_once.shape == (3, 40)
    assert torch.equal(at_once, chunked)


@pytest.mark.parametrize("index", [0, 3, 6])
def test_mixture_step_follows_the_jump_rule(index: int) -> None:
    """One step on a stub: a position moves with probability (1 - exp(-h / (1 - t))) * P(sample != token),
    and a moved position lands on v with probability proportional to p(v) over v != its old token."""
    steps, positions = 8, 200_000
    sampler = MixturePathTextSampler(steps)
    g = torch.Generator().manual_seed(index)
    tokens = torch.zeros(1, positions, dtype=torch.long)  # every position currently holds token 0
    after = sampler.step(_stub_logits(positions), index, tokens, g)

    h, t = 1 / steps, index / steps
    jump = 1 - math.exp(-h / (1 - t))
    moved = after != 0
    _assert_within(moved.double().mean().item(), jump * (1 - PROBS[0].item()), positions)
    landed = torch.bincount(after[moved], minlength=5).double() / moved.sum()
    expected = PROBS.clone()
    expected[0] = 0
    expected /= expected.sum()
    for v in range(1, 5):
        _assert_within(landed[v].item(), expected[v].item(), int(moved.sum()))


def test_mixture_last_step_takes_every_sample() -> None:
    sampler = MixturePathTextSampler(4)
    assert sampler.jump_probability(3) == 1.0
    torch.testing.assert_close(sampler.timesteps, torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    after = sampler.step(_stub_logits(50_000), 3, torch.zeros(1, 50_000, dtype=torch.long))
    _assert_within((after == 0).double().mean().item(), PROBS[0].item(), 50_000)


def test_full_caption_run_ends_in_the_stub_distribution() -> None:
    """From uniform noise, the whole loop on a stub ends with each position distributed as p."""
    sampler, positions = MixturePathTextSampler(5), 100_000
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 5, (1, positions), generator=g)
    for index in range(5):
        tokens = sampler.step(_stub_logits(positions), index, tokens, g)
    frequencies = torch.bincount(tokens.flatten(), minlength=5).double() / positions
    for v in range(5):
        _assert_within(frequencies[v].item(), PROBS[v].item(), positions)


def test_joint_text_update_replaces_with_growing_probability() -> None:
    positions, steps = 100_000, 5
    tokens = torch.zeros(1, positions, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(joint_text_update(_stub_logits(positions), 0, steps, tokens, g), tokens)
    for index in (1, 2, 4):
        after = joint_text_update(_stub_logits(positions), index, steps, tokens, g)
        replaced = index / (steps - 1)
        _assert_within((after != 0).double().mean().item(), replaced * (1 - PROBS[0].item()), positions)
    single = joint_text_update(_stub_logits(positions), 0, 1, tokens, g)
    _assert_within((single != 0).double().mean().item(), 1 - PROBS[0].item(), positions)
