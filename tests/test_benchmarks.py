"""The benchmark scripts at their smallest sizes on the CPU: output structure, parity with diffusers,
the FLOP formula, and the naive captioning reference against our sampler. No wall-clock assertions."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks import (
    caption_batching,
    caption_reuse,
    caption_reuse_quality,
    caption_sampler,
    chat_frames,
    end_to_end,
    fast_path,
    latent_cache,
    multi_gpu,
    step_cache,
    transformer_step,
    vae_tiling,
)
from model.samplers import MixturePathTextSampler


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny runs are quicker on one thread, above all on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_number(value: object, *, positive: bool = False) -> None:
    assert isinstance(value, float | int) and math.isfinite(value), value
    assert value > 0 if positive else value >= 0, value


TINY_VIDEO = {"height": 32, "width": 32, "frames": 5}


def cli(**options: object) -> list[str]:
    """``cli(text_tokens="0,8", repeats=2)`` -> ``["--text-tokens", "0,8", "--repeats", "2"]``."""
    return [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def parse(script: ModuleType, **options: object) -> argparse.Namespace:
    """The arguments of ``script`` (a benchmark module) on the command line ``cli(**options)``."""
    return script.parser().parse_args(cli(**options))


def test_transformer_step_tiny_matches_diffusers() -> None:
    args = parse(
        transformer_step, size="tiny", repeats=2, warmup=0, text_tokens="0,8", masked_prompt=5, peak_size=64
    )
    result = transformer_step.run(args)

    assert [(row["text_tokens"], row["real_text_tokens"]) for row in result["rows"]] == [(0, 0), (8, 5)]
    for row in result["rows"]:
        for key in (
            "ours_s",
            "diffusers_s",
            "ratio",
            "ours_tflops",
            "diffusers_tflops",
            "ours_fraction_of_peak",
        ):
            assert_number(row[key], positive=True)
        assert_number(row["cpu_time_ratio"], positive=True)
        low, high = row["ratio_ci"]
        assert low <= row["ratio"] <= high
        assert len(row["ours_samples"]["wall"]) == len(row["diffusers_samples"]["cpu"]) == 2
        for key in ("ours_peak_bytes", "diffusers_peak_bytes"):
            assert row[key] is None or isinstance(row[key], int)
    empty, text = result["rows"]
    assert empty["max_abs_diff"] < 1e-5
    assert text["max_abs_diff"] is None
    assert text["ours_tflop"] > empty["ours_tflop"] == pytest.approx(empty["diffusers_tflop"], rel=1e-2)


def test_flop_formula_gives_283_tflop_for_wan_1_3b_at_480p_81_frames() -> None:
    real = transformer_step.SIZES["real"]
    assert real.latent == (21, 60, 104)
    flops = transformer_step.forward_flops(real.config, real.latent, 0, 512, text_stream=False)
    assert flops["total"] / 1e12 == pytest.approx(283, abs=3)
    assert 0.6 < flops["attention"] / flops["total"] < 0.8


@pytest.mark.parametrize("text_tokens", [0, 8])
def test_flop_formula_matches_torch_flop_counter(text_tokens: int) -> None:
    """Every matmul of both networks at the tiny size, counted by torch (attention via the math kernel)."""
    size = transformer_step.SIZES["tiny"]
    config = size.config
    wan, ours = transformer_step.build_pair(size, torch.device("cpu"), torch.float32, "native", seed=0)
    x_v = torch.randn(1, config.in_channels, *size.latent)
    x_t = torch.randint(0, config.vocab_size, (1, text_tokens))
    cond = torch.randn(1, size.context_tokens, config.text_dim)
    time = torch.full((1,), 500.0)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counted_ours:
            ours(x_v, x_t, time, time, cond, compute_logits=text_tokens > 0)
        with FlopCounterMode(display=False) as counted_wan:
            wan(x_v, time, cond, return_dict=False)
    formula = transformer_step.forward_flops(config, size.latent, text_tokens, size.context_tokens)
    assert counted_ours.get_total_flops() == formula["total"]
    formula = transformer_step.forward_flops(config, size.latent, 0, size.context_tokens, text_stream=False)
    assert counted_wan.get_total_flops() == formula["total"]


def test_text_pass_flop_formula_matches_torch_flop_counter() -> None:
    """Every matmul of a text-only pass at the tiny size, counted by torch (attention via the math kernel)."""
    size = transformer_step.SIZES["tiny"]
    config = size.config
    _, ours = transformer_step.build_pair(size, torch.device("cpu"), torch.float32, "native", seed=0)
    x_v = torch.randn(1, config.in_channels, *size.latent)
    x_t = torch.randint(0, config.vocab_size, (1, 8))
    cond = torch.randn(1, size.context_tokens, config.text_dim)
    time = torch.full((1,), 500.0)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counted_full:
            _, video = ours.forward_keeping_video(x_v, x_t, time, time, cond)
        with FlopCounterMode(display=False) as counted_text:
            ours.forward_text(x_t, time, cond, video)
    full = transformer_step.forward_flops(config, size.latent, 8, size.context_tokens, video_head=False)
    assert counted_full.get_total_flops() == full["total"]
    assert counted_text.get_total_flops() == transformer_step.text_pass_flops(
        config, size.latent, 8, size.context_tokens
    )


def test_caption_flops_at_the_real_shape() -> None:
    """One full pass and 49 text-only passes against 50 full passes: at least 20x fewer FLOPs."""
    exact = caption_reuse.caption_flops("real", 256, 50, 1)
    one_pass = caption_reuse.caption_flops("real", 256, 50, 50)
    assert (exact["full_passes"], exact["text_passes"], one_pass["full_passes"]) == (50, 0, 1)
    assert exact["tflop"] / 50 == pytest.approx(287, abs=1)
    assert exact["tflop"] / one_pass["tflop"] == pytest.approx(34.7, abs=0.1)


def test_caption_reuse_benchmark_times_and_compares_every_interval() -> None:
    args = parse(caption_reuse, size="tiny", intervals="1,2,4", length=8, steps=4, repeats=1, warmup=0)
    result = caption_reuse.run(args)

    exact, every_other, one_pass = result["rows"]
    assert (exact["speed_up"], exact["mean_deviation"], exact["flop_ratio"]) == (1.0, 0.0, 1.0)
    assert exact["argmax_agreement"] == 1.0
    assert (one_pass["full_passes"], one_pass["text_passes"]) == (1, 3)
    for row in (every_other, one_pass):
        assert 0 < row["mean_deviation"] < 0.1 and row["flop_ratio"] > 1
        assert row["deviation_per_step"][0] == 0.0  # the first step is a full pass
        assert_number(row["speed_up"], positive=True)
    assert every_other["deviation_per_step"][2] == 0.0


def test_caption_reuse_quality_benchmark_scores_every_variant(tmp_path: Path) -> None:
    from model.pipeline import UniViGUPipeline

    weights = UniViGUPipeline.from_preset("tiny").save_pretrained(tmp_path / "tiny")
    args = parse(caption_reuse_quality, weights=weights, n=2, intervals="1,8", batch=2, deviation_clips=2)
    result = caption_reuse_quality.run(args)

    rows = {(row["split"], row["variant"]): row for row in result["rows"]}
    assert set(rows) == {
        (split, variant)
        for split in ("seen", "held_out")
        for variant in ("k=1", "k=8", "video alone", "exact, other seeds")
    }
    exact = rows["seen", "k=1"]
    assert (exact["difference"], exact["token_agreement"], exact["identical_captions"]) == (0.0, 1.0, 1.0)
    assert rows["seen", "k=8"]["full_passes"] == 1
    for row in rows.values():
        assert 0 <= row["all"] <= 1 and 0 <= row["token_agreement"] <= 1
    assert len(result["deviation_per_step"]["8"]["deviation"]) == result["steps"]


def test_caption_batching_benchmark_runs_queued_jobs_both_ways() -> None:
    args = parse(caption_batching, preset="tiny", jobs=3, batch_sizes="1,3", steps=2, repeats=1, warmup=0)
    result = caption_batching.run(args)

    alone, batched = result["rows"]
    assert (alone["batch_size"], alone["mean_batch"], alone["speed_up"]) == (1, 1.0, 1.0)
    assert (batched["batch_size"], batched["mean_batch"]) == (3, 3.0)
    for row in result["rows"]:
        assert_number(row["jobs_per_minute"], positive=True)


def test_chat_frames_tiny_output() -> None:
    result = chat_frames.run(parse(chat_frames, preset="tiny", n=2, steps=1))
    assert result["benchmark"] == "chat_frames" and result["frames_sent"] == 10
    rows = {row["way"]: row for row in result["rows"]}
    # The tiny preset's clip is 17 frames at 8 fps: ten frames spread over it, or nine consecutive ones.
    assert {way: row["clip_frames"] for way, row in rows.items()} == {"mp4": 17, "spread": 17, "model_fps": 9}
    assert rows["mp4"]["agreement"] is None
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1
    assert 0 <= rows["spread"]["agreement"] <= 1 and 0 <= rows["model_fps"]["agreement"] <= 1


def test_caption_sampler_tiny_output() -> None:
    args = parse(caption_sampler, size="tiny", vocab=512, length=16, repeats=2, warmup=0)
    result = caption_sampler.run(args)

    assert [row["update"] for row in result["rows"]] == ["naive", "ours"]
    for row in result["rows"]:
        assert_number(row["update_s"], positive=True)
        assert_number(row["forward_s"], positive=True)
        assert 0 < row["share_of_step"] < 1
        assert row["peak_bytes"] is None or isinstance(row["peak_bytes"], int)


def _z(count_a: int, count_b: int, n: int) -> float:
    """Two-sample z score of two binomial counts out of ``n`` each."""
    p = (count_a + count_b) / (2 * n)
    return abs(count_a - count_b) / math.sqrt(max(2 * n * p * (1 - p), 1e-12))


@pytest.mark.parametrize("index", [3, 9])  # a jump step and the last step of 10
def test_naive_reference_and_our_sampler_agree_statistically(index: int) -> None:
    """V=7, L=20000: the share of positions that move, the histogram of new tokens and the theory."""
    steps, length, vocab = 10, 20000, 7
    generator = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(1, 1, vocab, generator=generator).expand(1, length, vocab)  # one law everywhere
    tokens = torch.randint(0, vocab, (1, length), generator=generator)
    naive = caption_sampler.naive_mixture_step(logits, index, steps, tokens, torch.Generator().manual_seed(2))
    ours = MixturePathTextSampler(steps).step(logits, index, tokens, torch.Generator().manual_seed(3))

    moved_naive, moved_ours = int((naive != tokens).sum()), int((ours != tokens).sum())
    assert _z(moved_naive, moved_ours, length) < 4
    probs = torch.softmax(logits[0, 0].double(), dim=-1)
    jump = MixturePathTextSampler(steps).jump_probability(index)
    expected = jump * float((1 - probs[tokens[0]]).mean())  # P(x1 != x_t) times the jump probability
    sigma = math.sqrt(length * expected * (1 - expected))
    assert abs(moved_naive - length * expected) < 4 * sigma
    assert abs(moved_ours - length * expected) < 4 * sigma
    for value in range(vocab):
        assert _z(int((naive == value).sum()), int((ours == value).sum()), length) < 4


def test_end_to_end_tiny_times_every_stage() -> None:
    args = parse(end_to_end, repeats=1, warmup=0, steps=2, **TINY_VIDEO)
    result = end_to_end.run(args)

    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["generate", "caption", "joint"]
    expected = {
        "generate": {"text_encoding_s", "denoising_loop_s", "transformer_s", "vae_decode_s", "mp4_write_s"},
        "caption": {"vae_encode_s", "denoising_loop_s", "transformer_s"},
        "joint": {"text_encoding_s", "denoising_loop_s", "transformer_s", "vae_decode_s", "mp4_write_s"},
    }
    for mode, row in rows.items():
        measured = {key for key, value in row.items() if key.endswith("_s") and value is not None}
        assert measured == expected[mode] | {"other_s", "total_call_s"}, mode
        for key in measured:
            assert_number(row[key])  # "other" is the call minus disjoint stages inside it: never negative


def test_fast_path_variants_are_timed_side_by_side_and_agree_with_eager() -> None:
    variants = "eager,math,auto,compiled"
    args = parse(fast_path, size="tiny", variants=variants, compile_backend="aot_eager", repeats=2, warmup=0)
    result = fast_path.run(args)

    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["eager", "math", "auto", "compiled"]
    assert [(rows[n]["attention"], rows[n]["compiled"]) for n in rows] == [
        ("native", False),
        ("_native_math", False),
        ("native", False),  # auto on the CPU
        ("native", True),
    ]
    assert rows["eager"]["ratio"] == 1.0 and rows["eager"]["max_abs_diff"] == 0.0
    for row in rows.values():
        assert_number(row["step_s"], positive=True)
        assert_number(row["first_call_s"], positive=True)
        assert row["ratio_ci"][0] <= row["ratio"] <= row["ratio_ci"][1]
        assert row["max_abs_diff"] < 1e-5


def test_step_cache_benchmark_reports_skips_speed_up_and_psnr() -> None:
    args = parse(step_cache, preset="tiny", thresholds="0,1", **TINY_VIDEO, steps=3, repeats=1, warmup=0)
    result = step_cache.run(args)

    uncached, cached = result["rows"]
    assert (uncached["threshold"], uncached["skipped_steps"], uncached["speed_up"]) == (0.0, 0, 1.0)
    assert uncached["psnr_db"] == math.inf
    assert cached["skipped_steps"] == 2  # every step but the first
    assert_number(cached["psnr_db"], positive=True)
    for row in result["rows"]:
        assert_number(row["loop_s"], positive=True)
        assert row["call_s"] > row["loop_s"]


def test_vae_tiling_benchmark_compares_tiled_with_untiled() -> None:
    args = parse(vae_tiling, height=64, width=64, frames=5, tile=48, stride=32, repeats=1)
    result = vae_tiling.run(args)

    untiled, tiled = result["rows"]
    assert (untiled["way"], untiled["ratio"], untiled["psnr_db"]) == ("untiled", 1.0, math.inf)
    assert tiled["way"] == "tiled" and 0 < tiled["psnr_db"] < math.inf  # tiles did run, and differ a little
    for row in result["rows"]:
        assert_number(row["decode_s"], positive=True)
        assert row["peak_mib"] is None or row["peak_mib"] >= 0


def test_latent_cache_benchmark_fills_the_cache_both_ways() -> None:
    args = parse(latent_cache, preset="toy", clips=3, repeats=1, warmup=0)
    result = latent_cache.run(args)

    one_by_one, batched = result["rows"]
    assert (one_by_one["way"], one_by_one["ratio"]) == ("one call per video", 1.0)
    assert batched["way"] == "one call for all"
    assert result["geometry"] == {"height": 64, "width": 64, "num_frames": 17, "fps": 8}
    for row in result["rows"]:
        assert_number(row["ms_per_clip"], positive=True)
        assert_number(row["ratio"], positive=True)


def test_main_prints_header_and_table_and_writes_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script's ``main`` (the shared ``run_main``) end to end, on the cheapest script."""
    out = tmp_path / "result.json"
    argv = cli(size="tiny", vocab=512, length=16, repeats=2, warmup=0, json=out)
    monkeypatch.setattr(sys, "argv", ["caption_sampler.py", *argv])
    caption_sampler.main()

    result = json.loads(out.read_text())
    assert result["benchmark"] == "caption_sampler" and result["repeats"] == 2
    header, *table = capsys.readouterr().out.splitlines()
    assert header == caption_sampler.header(result)
    assert header.startswith("cpu (1 threads), B=1 L=16 V=512, step 25 of 50, forward: size tiny float32")
    assert table[0] == "| " + " | ".join(caption_sampler.TABLE.values()) + " |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| naive", "| ours"]


def test_fast_path_main_rejects_unknown_variants_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["fast_path.py", "--variants", "eager,bogus"])
    monkeypatch.setattr(fast_path, "run", lambda args: pytest.fail("ran with an unknown variant"))
    with pytest.raises(SystemExit, match=r"unknown variants \['bogus'\]"):
        fast_path.main()


def test_multi_gpu_paper_splits_the_one_gpu_step_and_marks_impossible_layouts() -> None:
    rows = multi_gpu.paper(multi_gpu.parser().parse_args(["paper"]))["rows"]
    real = transformer_step.SIZES["real"]
    by_layout = {(row["workload"], row["layout"]): row for row in rows}
    for workload in multi_gpu.WORKLOADS:
        whole = transformer_step.forward_flops(
            real.config, real.latent, workload.text_tokens, real.context_tokens, batch=workload.batch
        )["total"]
        single = by_layout[(workload.name, "1 x 1")]
        assert single["tflop_per_gpu"] * 1e12 == pytest.approx(whole)
        assert single["link_ms"] == 0 and single["speedup"] == 1
        assert "does not divide the 12 heads" in by_layout[(workload.name, "1 x 8")]["note"]
        for layout in ("1 x 2", "2 x 2", "1 x 4", "2 x 4"):
            row = by_layout[(workload.name, layout)]
            assert row["all_to_all_mib"] > 0 and 1 < row["speedup"] < row["gpus"]
    guided, caption = (by_layout[(w.name, "2 x 1")] for w in multi_gpu.WORKLOADS)
    half = by_layout[(guided["workload"], "1 x 1")]["tflop_per_gpu"] / 2
    assert guided["tflop_per_gpu"] == pytest.approx(half, rel=1e-3)  # plus the heads, run on every rank
    assert caption["speedup"] == 1, "a caption has no guidance to split"


@pytest.mark.slow
def test_multi_gpu_measure_runs_on_a_two_process_group() -> None:
    from gloo_group import run_on_group

    args = multi_gpu.parser().parse_args(["measure", "--size", "tiny", "--repeats", "1", "--warmup", "0"])
    results = run_on_group(2, multi_gpu.measure, args)
    assert all((r["guidance_parallel"], r["sequence_parallel"]) == (1, 2) for r in results)
    for row in results[0]["rows"]:
        assert row["layout"] == "1 x 2"
        assert_number(row["step_s"], positive=True)
