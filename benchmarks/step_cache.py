"""The opt-in step cache: speed-up and quality cost against the uncached video, per threshold.

One ``generate`` call per threshold (``--thresholds``; ``0`` is the uncached reference: it runs every
block and gives the plain network's video), same prompt, seed and size. Per threshold: the steps
whose later blocks were skipped, the denoising loop's time (first transformer call to the last
progress callback; VAE decoding excluded) and the whole call's, the loop's speed-up over the
reference (median of per-round ratios, 95 % CI), and the PSNR of the decoded video against the
reference's. Rounds run every threshold once, the order reversed every other round.

    python -m benchmarks.step_cache --preset toy --thresholds 0,0.05,0.1,0.2 --repeats 3
    python -m benchmarks.step_cache --device cuda --wan /models/Wan2.1-T2V-1.3B-Diffusers \\
        --checkpoint /models/univigu.pth --thresholds 0,0.05,0.1,0.2 --repeats 2
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks._cli import (
    add_model_args,
    add_output_args,
    add_run_args,
    add_shape_args,
    load_pipeline,
    new_parser,
    run_main,
)
from benchmarks._timing import median, paired_ratio
from benchmarks.end_to_end import PROMPT, StageTimer
from model.media import psnr
from model.pipeline import UniViGUPipeline, VideoResult


def timed_generate(
    pipe: UniViGUPipeline, timer: StageTimer, video: dict[str, Any]
) -> tuple[VideoResult, float, float]:
    """``(result, denoising loop s, whole call s)`` of one ``generate`` call."""
    timer.reset()
    start = time.perf_counter()
    result = pipe.generate(**video, progress=timer.progress)
    total = time.perf_counter() - start
    assert timer.first_forward is not None and timer.last_progress is not None
    return result, timer.last_progress - timer.first_forward, total


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate once per threshold and round; a JSON-ready dict with one row per threshold."""
    pipe, model = load_pipeline(args)
    timer = StageTimer(pipe.device)
    timer.wrap(pipe.transformer, "embed", "transformer")  # the first embedding marks the loop's start
    d = pipe.defaults
    video: dict[str, Any] = {
        "height": args.height or d.height,
        "width": args.width or d.width,
        "num_frames": args.frames or d.num_frames,
        "steps": args.steps or d.steps,
        "seed": args.seed,
        "prompt": args.prompt,
    }
    thresholds = args.thresholds
    loops: dict[float, list[float]] = {t: [] for t in thresholds}
    calls: dict[float, list[float]] = {t: [] for t in thresholds}
    results: dict[float, VideoResult] = {}
    for _ in range(args.warmup):
        pipe.generate(**video)
    for round_index in range(args.repeats):
        for threshold in thresholds if round_index % 2 == 0 else reversed(thresholds):
            result, loop_s, call_s = timed_generate(pipe, timer, {**video, "step_cache": threshold})
            loops[threshold].append(loop_s)
            calls[threshold].append(call_s)
            results[threshold] = result
    reference = thresholds[0]
    rows = []
    for threshold in thresholds:
        speed_up, speed_up_ci = paired_ratio(loops[reference], loops[threshold])
        rows.append(
            {
                "threshold": threshold,
                "skipped_steps": results[threshold].skipped_steps,
                "steps": video["steps"],
                "loop_s": median(loops[threshold]),
                "call_s": median(calls[threshold]),
                "speed_up": speed_up,
                "speed_up_ci": speed_up_ci,
                "psnr_db": psnr(results[threshold].frames, results[reference].frames),
                "loop_samples": loops[threshold],
            }
        )
    return {
        "benchmark": "step_cache",
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),
        "model": model,
        "num_layers": pipe.transformer.config.num_layers,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        **video,
        "guidance_scale": d.guidance_scale,
        "repeats": args.repeats,
        "reference_threshold": reference,
        "rows": rows,
    }


TABLE = {
    "threshold": "threshold",
    "skipped_steps": "skipped steps",
    "steps": "steps",
    "loop_s": "denoising loop s",
    "call_s": "whole call s",
    "speed_up": "loop speed-up",
    "speed_up_ci": "95% CI",
    "psnr_db": "PSNR vs reference (dB)",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_model_args(p, default_preset="toy")
    p.add_argument("--prompt", default=PROMPT, help="default: the end-to-end benchmark's prompt")
    p.add_argument(
        "--thresholds",
        type=lambda text: [float(part) for part in text.split(",")],
        default=[0.0, 0.05, 0.1, 0.2],
        help="comma-separated; the first is the reference (use 0: uncached)",
    )
    add_shape_args(p)
    add_run_args(p, repeats=3, warmup_help="untimed uncached calls first")
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['model']} ({result['num_layers']} blocks) on {result['device']} ({result['threads']} threads), "
        f"{result['dtype']}, {result['width']}x{result['height']}, {result['num_frames']} frames, "
        f"{result['steps']} steps, guidance {result['guidance_scale']:g}, median of {result['repeats']}"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
