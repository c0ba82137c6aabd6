"""Reusing the video's keys and values in captioning: FLOPs, time and logit deviation per refresh interval.

One run, one row per refresh interval ``k`` (``--intervals``; ``1`` is the exact sampler, ``k >= steps``
one full pass only), three measures:

* FLOPs of a caption at ``--flop-size`` (default ``real``: Wan2.1-1.3B at 480x832, 81 frames, 32,760 video
  tokens, Lc = 512), ``--length`` caption tokens and ``--steps`` steps: ``ceil(N / k)`` full passes
  (``forward_flops`` without the video head) and the other steps text-only passes (``text_pass_flops``),
  from the FLOP model of ``benchmarks/transformer_step.py``; the ratio is exact's FLOPs over k's.
* Time of the caption's denoising loop (the transformer passes through :class:`VideoReuse` and the
  mixture-path update; no VAE) at ``--size`` (default ``small``: 1,170 video tokens) with random weights,
  every interval once per round, interleaved (wall and process CPU time, ``benchmarks/_timing.py``); the
  speed-up is the median over rounds of exact's time over k's, with its 95 % interval.
* Relative deviation of the logits from the exact pass at ``--size``, along the exact sampler's token
  trajectory: at every step ``||reuse - exact|| / ||exact||`` over the ``(L, V)`` logits, where reuse's
  text-only pass reads the video kept at its last full step (0 at full steps); the mean over steps,
  the largest and the share of positions whose arg-max token agrees with exact's.

    OMP_NUM_THREADS=1 python -m benchmarks.caption_reuse --size small --intervals 1,2,5,10,25,50 --repeats 5
    python -m benchmarks.caption_reuse --device cuda --size real --intervals 1,5,10,50 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import torch

from benchmarks._cli import add_output_args, add_run_args, new_parser, run_main
from benchmarks._timing import median, paired_ratio, parse_int_list, time_interleaved
from benchmarks.transformer_step import (
    SIZES,
    add_device_args,
    device_dtype_size,
    forward_flops,
    text_pass_flops,
    video_tokens,
)
from model.network import UniViGUTransformer, VideoKeyValues
from model.pipeline import cast_transformer
from model.samplers import MixturePathTextSampler, uniform_tokens
from model.video_reuse import VideoReuse


def caption_flops(size_name: str, length: int, steps: int, interval: int) -> dict[str, float]:
    """``{"full_passes", "text_passes", "tflop"}`` of one caption at the size ``size_name``."""
    size = SIZES[size_name]
    full = math.ceil(steps / interval)
    full_flops = forward_flops(size.config, size.latent, length, size.context_tokens, video_head=False)[
        "total"
    ]
    text_flops = text_pass_flops(size.config, size.latent, length, size.context_tokens)
    return {
        "full_passes": full,
        "text_passes": steps - full,
        "tflop": (full * full_flops + (steps - full) * text_flops) / 1e12,
    }


def denoise(
    network: UniViGUTransformer,
    latent: torch.Tensor,
    cond: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    interval: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The captioning loop of ``UniViGUPipeline.caption_batch`` for one batch: ``latent (B, C, f, h, w)``,
    ``cond (B, Lc, text_dim)``, ``tokens (B, L)`` -> the final tokens ``(B, L)``."""
    sampler = MixturePathTextSampler(steps)
    reuse = VideoReuse(network, interval, steps)
    for index, time in enumerate(sampler.timesteps):
        logits = reuse(index, latent, tokens, time.expand(tokens.shape[0]), cond)
        tokens = sampler.step(logits, index, tokens, generator)
    return tokens


def logit_deviation(
    network: UniViGUTransformer,
    latent: torch.Tensor,
    cond: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    intervals: list[int],
    generator: torch.Generator,
) -> dict[int, dict[str, list[float]]]:
    """Per interval, per step: the logits' relative deviation from the exact pass and the share of
    positions whose arg-max agrees, along the exact sampler's trajectory from ``tokens (B, L)``."""
    sampler = MixturePathTextSampler(steps)
    batch = tokens.shape[0]
    kept: dict[int, VideoKeyValues] = {}
    found: dict[int, dict[str, list[float]]] = {
        k: {"deviation": [], "argmax_agreement": []} for k in intervals
    }
    for index, time in enumerate(sampler.timesteps):
        time_t = time.expand(batch)
        exact, video = network.forward_keeping_video(latent, tokens, torch.zeros(batch), time_t, cond)
        for interval in intervals:
            if index % interval == 0:
                kept[interval] = video
                logits = exact
            else:
                logits = network.forward_text(tokens, time_t, cond, kept[interval])
            found[interval]["deviation"].append(float((logits - exact).norm() / exact.norm()))
            agreement = (logits.argmax(-1) == exact.argmax(-1)).float().mean()
            found[interval]["argmax_agreement"].append(float(agreement))
        tokens = sampler.step(exact, index, tokens, generator)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """FLOPs, times and deviations per interval; a JSON-ready dict with one row per interval."""
    device, dtype, size = device_dtype_size(args)
    config = size.config
    torch.manual_seed(args.seed)
    with torch.device(device):
        network = UniViGUTransformer(config)
    network = cast_transformer(network, device, dtype)
    generator = torch.Generator(device).manual_seed(args.seed)
    latent = torch.randn(1, config.in_channels, *size.latent, generator=generator, device=device).to(dtype)
    cond = torch.randn(1, size.context_tokens, config.text_dim, generator=generator, device=device).to(dtype)
    start = uniform_tokens(1, args.length, config.vocab_size, device, generator)

    def loop(interval: int) -> torch.Tensor:
        return denoise(
            network, latent, cond, start, args.steps, interval, torch.Generator(device).manual_seed(0)
        )

    intervals = args.intervals
    with torch.inference_mode():
        samples = time_interleaved(
            {k: (lambda k=k: loop(k)) for k in intervals}, device, repeats=args.repeats, warmup=args.warmup
        )
        deviations = logit_deviation(network, latent, cond, start, args.steps, intervals, generator)
    exact_flops = caption_flops(args.flop_size, args.length, args.steps, 1)["tflop"]
    rows = []
    for interval in intervals:
        flops = caption_flops(args.flop_size, args.length, args.steps, interval)
        speed_up, speed_up_ci = paired_ratio(samples[1]["wall"], samples[interval]["wall"])
        cpu_speed_up, cpu_speed_up_ci = paired_ratio(samples[1]["cpu"], samples[interval]["cpu"])
        found = deviations[interval]
        text_steps = [d for index, d in enumerate(found["deviation"]) if index % interval]
        rows.append(
            {
                "interval": interval,
                "full_passes": flops["full_passes"],
                "text_passes": flops["text_passes"],
                "tflop": flops["tflop"],
                "flop_ratio": exact_flops / flops["tflop"],
                "loop_s": median(samples[interval]["wall"]),
                "loop_cpu_s": median(samples[interval]["cpu"]),
                "speed_up": speed_up,
                "speed_up_ci": speed_up_ci,
                "cpu_speed_up": cpu_speed_up,
                "cpu_speed_up_ci": cpu_speed_up_ci,
                "mean_deviation": sum(found["deviation"]) / args.steps,
                "mean_text_step_deviation": sum(text_steps) / len(text_steps) if text_steps else 0.0,
                "max_deviation": max(found["deviation"]),
                "argmax_agreement": sum(found["argmax_agreement"]) / args.steps,
                "deviation_per_step": found["deviation"],
                "argmax_agreement_per_step": found["argmax_agreement"],
                "samples": samples[interval],
            }
        )
    return {
        "benchmark": "caption_reuse",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "size": args.size,
        "video_tokens": video_tokens(config, size.latent),
        "flop_size": args.flop_size,
        "flop_video_tokens": video_tokens(SIZES[args.flop_size].config, SIZES[args.flop_size].latent),
        "dtype": str(dtype).removeprefix("torch."),
        "length": args.length,
        "steps": args.steps,
        "repeats": args.repeats,
        "config": dataclasses.asdict(config),
        "torch": torch.__version__,
        "rows": rows,
    }


TABLE = {
    "interval": "video_reuse k",
    "full_passes": "full passes",
    "text_passes": "text-only passes",
    "tflop": "TFLOP per caption (FLOP size)",
    "flop_ratio": "exact / k (FLOP)",
    "loop_s": "loop s",
    "speed_up": "speed-up (wall)",
    "speed_up_ci": "95% CI",
    "cpu_speed_up": "speed-up (CPU time)",
    "cpu_speed_up_ci": "95% CI",
    "mean_deviation": "logit deviation, mean over steps",
    "mean_text_step_deviation": "mean over text-only steps",
    "max_deviation": "largest",
    "argmax_agreement": "arg-max agreement",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_device_args(p, size_help="network timed and whose logits are compared (random weights)")
    p.add_argument("--flop-size", choices=sorted(SIZES), default="real", help="shape of the FLOP count")
    p.add_argument(
        "--intervals", type=parse_int_list, default=[1, 2, 5, 10, 25, 50], help="k values; 1 first"
    )
    p.add_argument("--length", type=int, default=256, help="L, caption tokens")
    p.add_argument("--steps", type=int, default=50, help="N, captioning steps")
    add_run_args(p, repeats=5, repeats_help="timed rounds (each runs every interval's loop once)")
    add_output_args(p)
    return p


def check_intervals(args: argparse.Namespace) -> None:
    """``--intervals`` must start with the exact sampler."""
    if args.intervals[0] != 1:
        raise SystemExit("--intervals must start with 1, the exact sampler the others are compared with")


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['device']} ({result['threads']} threads), time and deviation at size {result['size']} "
        f"({result['video_tokens']} video tokens), FLOPs at size {result['flop_size']} "
        f"({result['flop_video_tokens']} video tokens), L={result['length']}, {result['steps']} steps, "
        f"{result['dtype']}, {result['repeats']} rounds"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE, check=check_intervals)


if __name__ == "__main__":
    main()
