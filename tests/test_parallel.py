"""One pass and one job split across processes (model/parallel.py) give what one process gives.

Real processes joined by gloo on the CPU, 2 and 4 of them, in every layout (guidance-parallel,
sequence-parallel, both): the authors' masked reference batch (``tests/golden/batch_masked``), a masked
batch on a 4-head network (so that 4 ranks split the sequence), and the three modes of a 4-head tiny
pipeline, the step cache included. Videos must agree to float32 rounding (uint8 frames within 1), captions
token for token, and every rank must end with what rank 0 has.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gloo_group import run_on_group
from safetensors.torch import load_file

from model import network as network_module
from model.checkpoint import build_transformer, read_univigu_pth
from model.config import UniViGUConfig
from model.errors import AttentionBackendError, InvalidParameterError
from model.network import UniViGUTransformer, resolve_attention_backend
from model.parallel import ParallelPlan, check_degrees, split_sizes
from model.pipeline import UniViGUPipeline, cast_transformer

GOLDEN = Path(__file__).resolve().parent / "golden" / "batch_masked"
GOLDEN_TOLERANCE = 1e-4  # test_golden.py's bound against the authors' outputs
ROUNDING = 1e-5  # a split pass against the same pass on one process, both float32
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(2, 2), (1, 4)]}
"""World size -> the (guidance, sequence) layouts it runs."""
PROMPT = "a red circle moving left"
VIDEO = {"height": 32, "width": 32, "num_frames": 5, "steps": 3}  # 8 video tokens: 2 per rank at 4 ranks
FOUR_HEADS = {"num_attention_heads": 4, "attention_head_dim": 16}


def golden_network() -> tuple[UniViGUTransformer, dict[str, torch.Tensor]]:
    """The authors' tiny masked-batch network (2 heads) and its reference inputs and outputs."""
    state = read_univigu_pth(GOLDEN / "reference_checkpoint.pth")
    wan_config = json.loads((GOLDEN / "wan" / "transformer" / "config.json").read_text())
    config = UniViGUConfig.from_wan_config(wan_config, vocab_size=state["vocab_embed.weight"].shape[0])
    network = cast_transformer(
        build_transformer(config, state, str(GOLDEN)), torch.device("cpu"), torch.float32
    )
    return network, load_file(GOLDEN / "reference_io.safetensors")


def masked_batch() -> tuple[UniViGUTransformer, tuple[torch.Tensor, ...]]:
    """A 4-head network and a batch of two whose text rows are padded differently (18 video, 9 text tokens)."""
    torch.manual_seed(0)
    config = UniViGUConfig(
        **FOUR_HEADS, num_layers=2, ffn_dim=64, in_channels=4, out_channels=4, text_dim=16, vocab_size=50
    )
    network = UniViGUTransformer(config).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    x_v = torch.randn(2, 4, 3, 4, 6, generator=generator)
    x_t = torch.randint(0, 50, (2, 9), generator=generator)
    cond = torch.randn(2, 7, 16, generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:], mask[1, 4:] = 0, 0
    return network, (x_v, x_t, torch.tensor([999.0, 0.0]), torch.tensor([0.0, 500.0]), cond, mask)


def four_head_pipeline() -> UniViGUPipeline:
    """The tiny pipeline with a 4-head transformer, so that its sequence splits over 1, 2 or 4 ranks."""
    pipe = UniViGUPipeline.from_preset("tiny")
    torch.manual_seed(1)
    config = dataclasses.replace(pipe.transformer.config, **FOUR_HEADS)
    pipe.transformer = cast_transformer(UniViGUTransformer(config), pipe.device, pipe.dtype)
    return pipe


def caption_frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)  # (T, H, W, 3)


def outputs(plan: ParallelPlan | None) -> dict[str, Any]:
    """Every checked output, computed on this process alone (``plan`` None) or on its share of ``plan``."""
    results: dict[str, Any] = {}
    with torch.inference_mode():
        if plan is None or 2 % plan.sequence == 0:  # the golden network has 2 heads
            golden, io = golden_network()
            if plan is not None:
                golden.enable_parallelism(plan)
            inputs = ("x_v", "x_t", "time_v", "time_t", "cond_t", "x_t_attention_mask")
            results["golden"] = golden(*(io[name] for name in inputs))
        network, batch = masked_batch()
        if plan is not None:
            network.enable_parallelism(plan)
        results["masked"] = network(*batch)

    pipe = four_head_pipeline()
    if plan is not None:
        pipe.transformer.enable_parallelism(plan)
    results["generate"] = pipe.generate(PROMPT, **VIDEO, guidance_scale=4.0, seed=3)
    results["cached"] = pipe.generate(
        PROMPT, **{**VIDEO, "steps": 6}, guidance_scale=4.0, step_cache=0.05, seed=3
    )
    results["joint"] = pipe.joint(PROMPT, **VIDEO, guidance_scale=4.0, max_tokens=5, seed=4)
    # The exact sampler: reusing the video's keys and values needs the whole job on one device.
    results["caption"] = pipe.caption(caption_frames(), steps=3, max_tokens=7, seed=5, video_reuse=1)
    if plan is not None:
        with pytest.raises(InvalidParameterError, match="video_reuse needs the whole job on one device"):
            pipe.caption(caption_frames(), steps=3, max_tokens=7, seed=5, video_reuse=3)
    return results


def split_outputs(world_size: int) -> dict[tuple[int, int], dict[str, Any]]:
    """Run on every rank of a group: :func:`outputs` under each layout of ``world_size`` ranks."""
    cpu = torch.device("cpu")
    return {layout: outputs(ParallelPlan.build(*layout, cpu)) for layout in LAYOUTS[world_size]}


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return outputs(None)


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda n: f"{n}-processes")
def group_run(request: pytest.FixtureRequest) -> list[dict[tuple[int, int], dict[str, Any]]]:
    """Each rank's outputs per layout, from one group of ``world_size`` processes."""
    return run_on_group(request.param, split_outputs, request.param)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def assert_same_pass(
    split: tuple[torch.Tensor, torch.Tensor], whole: tuple[torch.Tensor, torch.Tensor]
) -> None:
    for ours, reference in zip(split, whole, strict=True):
        assert ours.shape == reference.shape
        assert relative_error(ours, reference) < ROUNDING


def assert_same_video(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


@pytest.mark.slow
def test_every_layout_reproduces_one_process(group_run, single) -> None:
    for layout, results in group_run[0].items():
        where = f"guidance {layout[0]} x sequence {layout[1]}"
        if "golden" in results:
            assert_same_pass(results["golden"], single["golden"])
        assert_same_pass(results["masked"], single["masked"])
        for mode in ("generate", "cached", "joint"):
            assert_same_video(results[mode].frames, single[mode].frames), (where, mode)
        assert results["cached"].skipped_steps == single["cached"].skipped_steps > 0, where
        assert results["joint"].tokens == single["joint"].tokens, where
        assert results["caption"].tokens == single["caption"].tokens, where


@pytest.mark.slow
def test_the_split_golden_pass_matches_the_authors(group_run) -> None:
    _, io = golden_network()
    for results in group_run[0].values():
        if "golden" in results:
            velocity, logits = results["golden"]
            assert relative_error(velocity, io["out_velocity"]) < GOLDEN_TOLERANCE
            assert relative_error(logits, io["out_logits"]) < GOLDEN_TOLERANCE


@pytest.mark.slow
def test_every_rank_ends_with_rank_zeros_video_and_tokens(group_run) -> None:
    leader, *followers = group_run
    for follower in followers:
        for layout, results in follower.items():
            for mode in ("generate", "cached", "joint"):
                assert np.array_equal(results[mode].frames, leader[layout][mode].frames), (layout, mode)
            assert results["joint"].tokens == leader[layout]["joint"].tokens
            assert results["caption"].tokens == leader[layout]["caption"].tokens


def test_split_sizes_are_those_of_tensor_split() -> None:
    for length in range(12):
        for parts in (1, 2, 3, 4):
            expected = [len(piece) for piece in torch.arange(length).tensor_split(parts)]
            assert split_sizes(length, parts) == expected


def test_degrees_are_checked_against_the_model() -> None:
    check_degrees(2, 4, 12)
    with pytest.raises(InvalidParameterError, match=r"choose one of \[1, 2, 3, 4, 6, 12\], got 5"):
        check_degrees(1, 5, 12)
    with pytest.raises(InvalidParameterError, match="guidance_parallel must be 1 or 2"):
        check_degrees(3, 1, 12)


def refused_plans() -> list[str]:
    """Run on both ranks of a group: what a 3-head network, and a kernel diffusers cannot split, say to a
    2-way sequence split."""
    plan = ParallelPlan.build(1, 2, torch.device("cpu"))
    three_heads = UniViGUTransformer(dataclasses.replace(masked_batch()[0].config, num_attention_heads=3))
    golden, _ = golden_network()
    golden.set_attention_backend("_native_math")
    messages = []
    for network in (three_heads, golden):
        try:
            network.enable_parallelism(plan)
        except (InvalidParameterError, AttentionBackendError) as error:
            messages.append(error.message)
    return messages


@pytest.mark.slow
def test_a_split_the_model_cannot_take_is_refused_with_the_choices() -> None:
    heads, backend = run_on_group(2, refused_plans)[0]
    assert "must divide the model's 3 attention heads" in heads and "choose one of [1, 3], got 2" in heads
    assert "'_native_math' cannot split the sequence across devices; use one of" in backend


def test_auto_attention_skips_kernels_diffusers_cannot_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network_module, "_missing_requirement", lambda backend: None)  # all installed
    cuda = torch.device("cuda")  # only names are resolved: no GPU is touched
    assert resolve_attention_backend("auto", cuda) == "_flash_3"
    assert resolve_attention_backend("auto", cuda, context_parallel=True) == "flash"


def test_a_follower_skips_the_vae_decode() -> None:
    pipe = UniViGUPipeline.from_preset("tiny")
    pipe.decode_video = False
    assert pipe.generate(PROMPT, **{**VIDEO, "steps": 1}, seed=0).frames.shape == (0, 0, 0, 3)
