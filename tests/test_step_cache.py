"""The opt-in first-block step cache: off-equivalence, skipping, and its wiring through the pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.config import get_preset
from model.errors import InvalidParameterError
from model.network import UniViGUTransformer
from model.pipeline import UniViGUPipeline
from model.step_cache import FirstBlockCache, relative_change

CONFIG = dataclasses.replace(get_preset("tiny").transformer, num_layers=3, vocab_size=50)
SMALL_VIDEO = {"height": 32, "width": 32, "num_frames": 5, "steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def network() -> UniViGUTransformer:
    torch.manual_seed(0)
    return UniViGUTransformer(CONFIG).eval().requires_grad_(False)


def inputs(seed: int, time: float) -> tuple[torch.Tensor, ...]:
    """``(x_v (2, C, 2, 4, 4), x_t (2, 6), time_v (2,), time_t (2,), cond (2, 8, text_dim))``."""
    generator = torch.Generator().manual_seed(seed)
    x_v = torch.randn(2, CONFIG.in_channels, 2, 4, 4, generator=generator)
    x_t = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=generator)
    cond = torch.randn(2, 8, CONFIG.text_dim, generator=generator)
    times = torch.full((2,), time)
    return x_v, x_t, times, times, cond


@pytest.fixture(scope="module")
def pipe() -> UniViGUPipeline:
    return UniViGUPipeline.from_preset("tiny")


def test_threshold_zero_runs_every_block_and_equals_the_network(network) -> None:
    cache = FirstBlockCache(network, 0.0)
    with torch.inference_mode():
        for step, time in enumerate((900.0, 899.0, 898.0)):
            args = inputs(step, time)
            assert all(torch.equal(a, b) for a, b in zip(cache(*args), network(*args), strict=True))
    assert (cache.stats.computed, cache.stats.skipped) == (3, 0)


def test_an_unchanged_step_is_skipped_and_reuses_the_residual_of_the_later_blocks(network) -> None:
    cache = FirstBlockCache(network, 0.01)
    args = inputs(0, 500.0)
    with torch.inference_mode():
        full = network(*args)
        first = cache(*args)
        again = cache(*args)  # the first block's residual has not moved at all
        other = cache(*inputs(1, 100.0))  # a different input: everything runs again
    assert (cache.stats.computed, cache.stats.skipped) == (2, 1)
    for expected, cached in zip(full, again, strict=True):
        torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, full, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(other, network(*inputs(1, 100.0)), strict=True))


def test_relative_change_is_the_mean_absolute_change_over_the_mean_magnitude() -> None:
    reference = torch.tensor([1.0, -3.0])
    assert relative_change(torch.tensor([2.0, -3.0]), reference) == pytest.approx(0.25)
    assert relative_change(reference, reference) == 0.0


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_a_threshold_outside_zero_to_one_is_refused(network, pipe, threshold) -> None:
    with pytest.raises(InvalidParameterError, match="step_cache must be between 0.0 and 1.0") as error:
        FirstBlockCache(network, threshold)
    assert error.value.param == "step_cache"
    with pytest.raises(InvalidParameterError, match="step_cache"):
        pipe.generate("a red circle", step_cache=threshold, **SMALL_VIDEO)


def test_generate_with_threshold_zero_equals_the_uncached_video(pipe) -> None:
    plain = pipe.generate("a red circle moving left", **SMALL_VIDEO)
    cached = pipe.generate("a red circle moving left", step_cache=0.0, **SMALL_VIDEO)
    assert cached.skipped_steps == plain.skipped_steps == 0
    assert np.array_equal(cached.frames, plain.frames)


def test_generate_and_joint_with_a_huge_threshold_skip_steps_and_still_give_a_video(pipe) -> None:
    video = pipe.generate("a red circle moving left", step_cache=1.0, **SMALL_VIDEO)
    joint = pipe.joint("a red circle moving left", step_cache=1.0, max_tokens=4, **SMALL_VIDEO)
    for result in (video, joint):
        assert result.frames.shape == (5, 32, 32, 3)
        assert 1 <= result.skipped_steps <= SMALL_VIDEO["steps"] - 1  # the first step always runs
    assert len(joint.tokens) == 4
