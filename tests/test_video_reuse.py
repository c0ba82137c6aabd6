"""Captioning with the video's keys and values reused across text steps, and captions run as one batch:
interval 1 is the exact sampler, a text-only pass reads the video of the last full pass and of no other,
and a caption in a batch equals the caption alone (cancel and progress per caption)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.config import get_preset
from model.errors import InvalidParameterError
from model.network import UniViGUTransformer
from model.pipeline import UniViGUPipeline
from model.samplers import MixturePathTextSampler
from model.video_reuse import VideoReuse

CONFIG = dataclasses.replace(get_preset("tiny").transformer, num_layers=3, vocab_size=50)
TEXT_LENGTH = 6
FLOAT32_ROUNDING = 1e-5  # relative, over a few blocks of float32 matmuls


@pytest.fixture(scope="module")
def network() -> UniViGUTransformer:
    torch.manual_seed(0)
    return UniViGUTransformer(CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pipe() -> UniViGUPipeline:
    return UniViGUPipeline.from_preset("tiny")


def video_and_cond(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean latent ``(B, C, 2, 4, 4)`` and a condition ``(B, 8, text_dim)``."""
    generator = torch.Generator().manual_seed(7)
    x_v = torch.randn(batch, CONFIG.in_channels, 2, 4, 4, generator=generator)
    return x_v, torch.randn(batch, 8, CONFIG.text_dim, generator=generator)


def tokens(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(
        0, CONFIG.vocab_size, (batch, TEXT_LENGTH), generator=torch.Generator().manual_seed(seed)
    )


def exact(network: UniViGUTransformer, x_v, x_t, time_t, cond) -> torch.Tensor:
    """The exact sampler's logits: the whole network over the clean video and the text."""
    return network(x_v, x_t, torch.zeros_like(time_t), time_t, cond, compute_velocity=False)[1]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= FLOAT32_ROUNDING * b.abs().max())


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


def test_interval_one_runs_the_exact_pass_at_every_step(network) -> None:
    x_v, cond = video_and_cond()
    reuse = VideoReuse(network, 1, steps=3)
    with torch.inference_mode():
        for index, time in enumerate((1000.0, 667.0, 333.0)):
            x_t, time_t = tokens(index), torch.full((2,), time)
            assert torch.equal(reuse(index, x_v, x_t, time_t, cond), exact(network, x_v, x_t, time_t, cond))
    assert (reuse.passes.full, reuse.passes.text_only) == (3, 0)


def test_a_text_only_pass_over_its_own_full_pass_equals_the_full_pass(network) -> None:
    x_v, cond = video_and_cond()
    x_t, time_t = tokens(1), torch.tensor([800.0, 300.0])
    with torch.inference_mode():
        full, video = network.forward_keeping_video(x_v, x_t, torch.zeros(2), time_t, cond)
        text_only = network.forward_text(x_t, time_t, cond, video)
    assert torch.equal(full, exact(network, x_v, x_t, time_t, cond))
    assert close(text_only, full)


def test_text_only_steps_read_the_video_of_the_last_full_pass(network) -> None:
    """Interval 2: steps 0 and 2 are full passes, exact for their own inputs; steps 1 and 3 read the video
    kept at steps 0 and 2. A cache left stale after the refresh at step 2 fails here."""
    x_v, cond = video_and_cond()
    times = (1000.0, 750.0, 500.0, 250.0)
    inputs = [(tokens(index), torch.full((2,), time)) for index, time in enumerate(times)]
    reuse = VideoReuse(network, 2, steps=4)

    def text_only(step: int, kept_at: int) -> torch.Tensor:
        x_t, time_t = inputs[kept_at]
        _, video = network.forward_keeping_video(x_v, x_t, torch.zeros(2), time_t, cond)
        return network.forward_text(*inputs[step], cond, video)

    with torch.inference_mode():
        logits = [reuse(index, x_v, x_t, time_t, cond) for index, (x_t, time_t) in enumerate(inputs)]
        from_step = {(step, kept_at): text_only(step, kept_at) for step in (1, 3) for kept_at in (0, 2)}
    for step in (0, 2):
        assert torch.equal(logits[step], exact(network, x_v, *inputs[step], cond))
    assert close(logits[1], from_step[1, 0])
    assert close(logits[3], from_step[3, 2])
    assert not close(logits[3], from_step[3, 0])  # the video of step 0 would be stale here
    assert not close(logits[3], exact(network, x_v, *inputs[3], cond))  # and step 3 is an approximation
    assert (reuse.passes.full, reuse.passes.text_only) == (2, 2)


def test_rows_leaving_the_batch_keep_their_own_video(network) -> None:
    x_v, cond = video_and_cond()
    first, second = (tokens(0), torch.full((2,), 1000.0)), (tokens(1), torch.full((2,), 500.0))
    reuse = VideoReuse(network, 4, steps=4)
    with torch.inference_mode():
        reuse(0, x_v, *first, cond)
        reuse.keep_rows(torch.tensor([1]))
        logits = reuse(1, x_v[1:], second[0][1:], second[1][1:], cond[1:])
        _, alone = network.forward_keeping_video(
            x_v[1:], first[0][1:], torch.zeros(1), first[1][1:], cond[1:]
        )
        expected = network.forward_text(second[0][1:], second[1][1:], cond[1:], alone)
    assert close(logits, expected)


def test_the_sampler_draws_each_row_from_its_own_generator() -> None:
    sampler = MixturePathTextSampler(5)
    logits = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(0))
    start = torch.zeros(3, 4, dtype=torch.long)
    rows = sampler.step_rows(logits, 2, start, [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)])
    for row, seed in enumerate((1, 2, 3)):
        alone = sampler.step(
            logits[row : row + 1], 2, start[row : row + 1], torch.Generator().manual_seed(seed)
        )
        assert torch.equal(rows[row : row + 1], alone)


def test_interval_one_gives_todays_captions(pipe) -> None:
    """The exact sampler written out (spec §5): the whole network at every step, then the mixture-path
    update; ``video_reuse=1`` gives the same tokens."""
    job = pipe.prepare_caption(frames(0), steps=5, seed=11)
    sampler = MixturePathTextSampler(5)
    ids = job.tokens
    with torch.inference_mode():
        for index, time in enumerate(sampler.timesteps):
            logits = exact(pipe.transformer, job.latent, ids, time.view(1), job.cond)
            ids = sampler.step(logits, index, ids, job.generator)
    assert pipe.caption(frames(0), steps=5, seed=11, video_reuse=1).tokens == ids[0].tolist()


def test_the_option_counts_full_and_text_only_passes(pipe) -> None:
    result = pipe.caption(frames(0), steps=5, seed=1, video_reuse=2)
    assert (result.full_passes, result.text_only_passes) == (3, 2)
    one_pass = pipe.caption(frames(0), steps=5, seed=1, video_reuse=1000)
    assert (one_pass.full_passes, one_pass.text_only_passes) == (1, 4)
    assert pipe.caption(frames(0), steps=5, seed=1).full_passes == 1  # the default: one per caption


@pytest.mark.parametrize("interval", [0, -1, 1001])
def test_an_interval_outside_one_to_a_thousand_is_refused(pipe, interval: int) -> None:
    with pytest.raises(InvalidParameterError, match="video_reuse must be between 1 and 1000") as error:
        pipe.caption(frames(0), steps=2, video_reuse=interval)
    assert error.value.param == "video_reuse"


@pytest.mark.parametrize("interval", [1, 3])
def test_captions_in_one_batch_equal_the_captions_alone(pipe, interval: int) -> None:
    requests = [
        {"video": frames(0), "seed": 5},
        {"video": frames(1), "seed": 6, "prompt": "a red circle"},
        {"video": frames(0), "seed": 7},
    ]
    options = {"steps": 6, "max_tokens": 10, "video_reuse": interval}
    alone = [pipe.caption(**request, **options) for request in requests]
    batch = pipe.caption_batch([pipe.prepare_caption(**request, **options) for request in requests])
    assert batch == alone


def test_a_canceled_caption_leaves_the_batch_and_the_others_go_on(pipe) -> None:
    progress: dict[int, list[int]] = {0: [], 1: [], 2: []}
    checks = {"n": 0}

    def cancel_after_two_steps() -> bool:
        checks["n"] += 1
        return checks["n"] > 2

    options = {"steps": 5, "max_tokens": 10, "video_reuse": 2}
    jobs = [
        pipe.prepare_caption(
            frames(job),
            seed=job,
            progress=lambda step, total, job=job: progress[job].append(step),
            should_cancel=cancel_after_two_steps if job == 1 else None,
            **options,
        )
        for job in range(3)
    ]
    first, canceled, last = pipe.caption_batch(jobs)
    assert canceled is None
    assert progress == {0: [1, 2, 3, 4, 5], 1: [1, 2], 2: [1, 2, 3, 4, 5]}
    assert first == pipe.caption(frames(0), seed=0, **options)
    assert last == pipe.caption(frames(2), seed=2, **options)


def test_captions_that_do_not_fit_one_batch_are_refused(pipe) -> None:
    longer = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    jobs = [pipe.prepare_caption(frames(0), steps=2), pipe.prepare_caption(longer, steps=2)]
    with pytest.raises(InvalidParameterError, match="same settings and video size"):
        pipe.caption_batch(jobs)
    with pytest.raises(InvalidParameterError, match="same settings and video size"):
        pipe.caption_batch(
            [pipe.prepare_caption(frames(0), steps=2), pipe.prepare_caption(frames(0), steps=3)]
        )
