"""End to end, per mode: where the time of one ``generate`` / ``caption`` / ``joint`` call goes.

The pipeline is not modified: on the pipeline instance, ``text.encode``, ``vae.encode``, ``vae.decode``
and the transformer's passes (``forward``, and a caption's ``forward_keeping_video`` and ``forward_text``)
are replaced by timing wrappers (synchronising the device around each call), and ``write_mp4`` is timed
here on the returned frames. Stages of a call:

* ``text_encoding``: umT5 calls (the prompt; the null prompt only on its first, cached use);
* ``vae_encode``: the input video to latents (captioning);
* ``denoising_loop``: from the first transformer call to the last progress callback, i.e. every step's
  forward passes and sampler updates; ``transformer`` is the forward passes alone (all of the call's);
* ``vae_decode``: latents to frames; ``mp4_write``: H.264 encoding of the frames, after the call;
* ``other``: the rest of the call (tokenisation, checks, joint mode's final clean pass, detokenisation).

Each mode is called ``--warmup`` times untimed, then ``--repeats`` times; the table shows medians.

    python -m benchmarks.end_to_end --preset tiny --repeats 3
    python -m benchmarks.end_to_end --device cuda --wan /models/Wan2.1-T2V-1.3B-Diffusers \\
        --checkpoint /models/Uni-ViGU/model.pth --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
from benchmarks._timing import median, synchronize
from model.media import write_mp4
from model.pipeline import UniViGUPipeline

MODES = ("generate", "caption", "joint")
STAGES = ("text_encoding", "vae_encode", "denoising_loop", "transformer", "vae_decode", "mp4_write")
PROMPT = "a red ball rolls across a wooden table, seen from above"


class StageTimer:
    """Seconds spent per stage by the wrapped methods of one pipeline, and when the loop began and ended."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.first_forward: float | None = None
        self.last_progress: float | None = None

    def reset(self) -> None:
        self.seconds.clear()
        self.first_forward = self.last_progress = None

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        """Replace ``owner.name`` by a wrapper adding each call's duration to ``stage``."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            if stage == "transformer" and self.first_forward is None:
                self.first_forward = start
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds[stage] += time.perf_counter() - start

        setattr(owner, name, timed)

    def progress(self, step: int, total: int) -> None:
        synchronize(self.device)
        self.last_progress = time.perf_counter()


def instrument(pipe: UniViGUPipeline) -> StageTimer:
    timer = StageTimer(pipe.device)
    timer.wrap(pipe.text, "encode", "text_encoding")
    timer.wrap(pipe.vae, "encode", "vae_encode")
    timer.wrap(pipe.vae, "decode", "vae_decode")
    for name in ("forward", "forward_keeping_video", "forward_text"):  # a caption's passes with video reuse
        timer.wrap(pipe.transformer, name, "transformer")
    return timer


def timed_call(
    timer: StageTimer, call: Callable[[], Any], frames_of: Callable[[Any], np.ndarray | None], out_dir: Path
) -> dict[str, float]:
    """Run ``call`` once; seconds per stage (``frames_of(result)``, if any, is written as MP4)."""
    timer.reset()
    start = time.perf_counter()
    result = call()
    synchronize(timer.device)
    seconds = dict(timer.seconds)
    seconds["total_call"] = time.perf_counter() - start
    seconds["denoising_loop"] = timer.last_progress - timer.first_forward
    frames = frames_of(result)
    if frames is not None:
        begin = time.perf_counter()
        write_mp4(frames, out_dir / "bench.mp4", fps=result.fps)
        seconds["mp4_write"] = time.perf_counter() - begin
        (out_dir / "bench.mp4").unlink()
    accounted = sum(
        seconds.get(s, 0.0) for s in ("text_encoding", "vae_encode", "denoising_loop", "vae_decode")
    )
    seconds["other"] = seconds["total_call"] - accounted
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or load) the pipeline, time each mode; a JSON-ready dict with one row per mode."""
    pipe, model = load_pipeline(args)
    timer = instrument(pipe)
    d = pipe.defaults
    height, width = args.height or d.height, args.width or d.width
    num_frames, steps = args.frames or d.num_frames, args.steps or d.steps
    video = dict(height=height, width=width, num_frames=num_frames, steps=steps, seed=args.seed)
    clip = np.random.default_rng(args.seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    calls = {
        "generate": (lambda: pipe.generate(PROMPT, **video, progress=timer.progress), lambda r: r.frames),
        "caption": (
            lambda: pipe.caption(clip, steps=steps, seed=args.seed, progress=timer.progress),
            lambda r: None,
        ),
        "joint": (lambda: pipe.joint(PROMPT, **video, progress=timer.progress), lambda r: r.frames),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            call, frames_of = calls[mode]
            for _ in range(args.warmup):  # untimed: first-use caches (null prompt), allocator warm-up
                call()
            runs = [timed_call(timer, call, frames_of, Path(tmp)) for _ in range(args.repeats)]
            row: dict[str, Any] = {"mode": mode}
            for key in (*STAGES, "other", "total_call"):
                values = [r[key] for r in runs if key in r]
                row[f"{key}_s"] = median(values) if values else None
            row["runs"] = runs
            rows.append(row)
    return {
        "benchmark": "end_to_end",
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),
        "model": model,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "steps": steps,
        "guidance_scale": d.guidance_scale,
        "caption_tokens": d.caption_tokens,
        "repeats": args.repeats,
        "rows": rows,
    }


TABLE = {"mode": "mode", **{f"{s}_s": f"{s} s" for s in (*STAGES, "other", "total_call")}}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_model_args(p, default_preset="tiny")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="comma-separated")
    add_shape_args(p)
    add_run_args(p, repeats=3, warmup_help="untimed calls of each mode first")
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['model']} on {result['device']} ({result['threads']} threads), {result['dtype']}, "
        f"{result['width']}x{result['height']}, {result['num_frames']} frames, {result['steps']} steps, "
        f"guidance {result['guidance_scale']:g}, {result['caption_tokens']} caption tokens, "
        f"median of {result['repeats']}"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
