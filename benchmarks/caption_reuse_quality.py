"""Reusing the video's keys and values in captioning: what it costs in caption quality on a trained model.

On the shipped toy model (``--weights``, default ``model/assets/toy``), ``--n`` fresh clips each of the
seen and the held-out colour+shape pairs (the scenes, seeds and parser of ``univigu toyworld eval``) are
captioned at the model's default steps and length, clip ``i`` with seed ``--seed + i``, once per variant:

* ``k=K`` for every refresh interval of ``--intervals`` (``video_reuse``; 1 is the exact sampler, the
  steps or more one full pass only); the full passes see the current tokens;
* ``video alone``: one pass in which the video sees no text at all (the text keys masked out), then
  text-only passes at every step, the other choice of what a full pass shows the video as text;
* ``exact, other seeds``: the exact sampler with seeds ``--seed + --n + i``: how far a caption moves with
  nothing but its randomness, the noise every other row is read against.

Per split and variant: the share of captions with shape, colour and motion all right, its paired
difference from exact (the same clips and seeds) with a 95 % interval, the share of caption tokens equal
to exact's position by position, and the share of captions identical to exact's. Variants share each
clip's video latent and random stream (a copy of the generator per variant), and captions run in
batches (``caption_batch``), which give every caption the tokens it gets alone.

Also the logits' relative deviation from the exact pass per step on the first ``--deviation-clips`` seen
clips (``benchmarks.caption_reuse.logit_deviation``). The toy model has 80 video tokens against 32 text
tokens, so the text weighs far more in what the video offers than at the real shape: its worst case.

    nice python -m benchmarks.caption_reuse_quality --n 200 --intervals 1,2,4,10,20 --json reuse_quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import torch

from benchmarks._cli import add_output_args, new_parser, run_main
from benchmarks._timing import parse_int_list
from benchmarks.caption_reuse import check_intervals, logit_deviation
from model.pipeline import PreparedCaption, UniViGUPipeline
from model.samplers import MixturePathTextSampler
from model.toyworld.describe import Attributes, parse_description
from model.toyworld.make import scenes
from model.toyworld.world import Scene, render

EXACT = "k=1"
VIDEO_ALONE = "video alone"
RESEEDED = "exact, other seeds"


def copied(job: PreparedCaption, interval: int) -> PreparedCaption:
    """``job`` with the refresh interval ``interval`` and its own copy of the random stream."""
    generator = torch.Generator(job.generator.device)
    generator.set_state(job.generator.get_state())
    settings = dataclasses.replace(job.settings, video_reuse=interval)
    return dataclasses.replace(job, settings=settings, generator=generator)


def caption_video_alone(pipe: UniViGUPipeline, jobs: list[PreparedCaption]) -> list[list[int]]:
    """The variant whose one full pass shows the video no text: the kept keys and values come from a pass
    with every text key masked out, and every step is a text-only pass."""
    network, steps = pipe.transformer, jobs[0].settings.steps
    sampler = MixturePathTextSampler(steps)
    latent = torch.cat([job.latent for job in jobs])  # (B, C, f, h, w)
    cond = torch.cat([job.cond for job in jobs])  # (B, Lc, text_dim)
    tokens = torch.cat([job.tokens for job in jobs])  # (B, L)
    generators = [copied(job, steps).generator for job in jobs]
    zero = torch.zeros(len(jobs))
    _, video = network.forward_keeping_video(latent, tokens, zero, zero, cond, torch.zeros_like(tokens))
    for index, time in enumerate(sampler.timesteps):
        logits = network.forward_text(tokens, time.expand(len(jobs)), cond, video)
        tokens = sampler.step_rows(logits, index, tokens, generators)
    return tokens.tolist()


def caption_tokens(
    pipe: UniViGUPipeline, jobs: list[PreparedCaption], variant: str, batch: int
) -> list[list[int]]:
    """The tokens of every job's caption under ``variant``, in batches of ``batch``."""
    found: list[list[int]] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        if variant == VIDEO_ALONE:
            found += caption_video_alone(pipe, chunk)
            continue
        interval = 1 if variant == RESEEDED else int(variant.removeprefix("k="))
        results = pipe.caption_batch([copied(job, interval) for job in chunk])
        found += [result.tokens for result in results if result is not None]
    return found


def paired_difference(right: list[bool], reference: list[bool]) -> tuple[float, list[float]]:
    """Difference of two accuracies on the same clips and its 95 % interval (normal approximation of the
    paired difference, as in McNemar's test)."""
    n = len(right)
    gained = sum(a and not b for a, b in zip(right, reference, strict=True))
    lost = sum(b and not a for a, b in zip(right, reference, strict=True))
    difference = (gained - lost) / n
    spread = 1.96 * math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    return difference, [difference - spread, difference + spread]


def score(
    pipe: UniViGUPipeline, test: list[Scene], tokens: list[list[int]], exact: list[list[int]]
) -> dict[str, Any]:
    matches = [
        parse_description(pipe.text.decode(ids)).matches(Attributes.of(scene))
        for scene, ids in zip(test, tokens, strict=True)
    ]
    exact_right = [
        parse_description(pipe.text.decode(ids)).matches(Attributes.of(scene))["all"]
        for scene, ids in zip(test, exact, strict=True)
    ]
    difference, interval = paired_difference([m["all"] for m in matches], exact_right)
    equal = [
        sum(a == b for a, b in zip(ids, ref, strict=True)) / len(ref)
        for ids, ref in zip(tokens, exact, strict=True)
    ]
    identical = [
        pipe.text.decode(ids) == pipe.text.decode(ref) for ids, ref in zip(tokens, exact, strict=True)
    ]
    return {
        **{
            name: sum(m[name] for m in matches) / len(matches)
            for name in ("all", "shape", "colour", "motion")
        },
        "difference": difference,
        "difference_ci": interval,
        "token_agreement": sum(equal) / len(equal),
        "identical_captions": sum(identical) / len(identical),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Caption every clip under every variant; a JSON-ready dict with one row per split and variant."""
    pipe = UniViGUPipeline.from_pretrained(args.weights)
    steps = pipe.defaults.steps
    variants = [f"k={k}" for k in args.intervals] + [VIDEO_ALONE, RESEEDED]
    rows = []
    deviation: dict[int, dict[str, list[float]]] = {}
    with torch.inference_mode():
        for split, held_out in (("seen", False), ("held_out", True)):
            test = scenes(args.n, held_out=held_out, seed=args.seed + int(held_out))
            jobs = [pipe.prepare_caption(render(scene), seed=args.seed + i) for i, scene in enumerate(test)]
            reseeded = [
                pipe.prepare_caption(render(scene), seed=args.seed + args.n + i)
                for i, scene in enumerate(test)
            ]
            exact = caption_tokens(pipe, jobs, EXACT, args.batch)
            for variant in variants:
                source = reseeded if variant == RESEEDED else jobs
                tokens = exact if variant == EXACT else caption_tokens(pipe, source, variant, args.batch)
                full = {EXACT: steps, VIDEO_ALONE: 1, RESEEDED: steps}.get(variant)
                if full is None:
                    full = math.ceil(steps / int(variant.removeprefix("k=")))
                rows.append(
                    {
                        "split": split,
                        "variant": variant,
                        "full_passes": full,
                        **score(pipe, test, tokens, exact),
                    }
                )
            if not held_out:
                clips = jobs[: args.deviation_clips]
                deviation = logit_deviation(
                    pipe.transformer,
                    torch.cat([job.latent for job in clips]),
                    torch.cat([job.cond for job in clips]),
                    torch.cat([job.tokens for job in clips]),
                    steps,
                    args.intervals,
                    torch.Generator().manual_seed(args.seed),
                )
    for row in rows:
        if row["variant"].startswith("k=") and row["split"] == "seen":
            found = deviation[int(row["variant"].removeprefix("k="))]["deviation"]
            row["mean_deviation"] = sum(found) / len(found)
            row["max_deviation"] = max(found)
    return {
        "benchmark": "caption_reuse_quality",
        "model": args.weights,
        "clips_per_split": args.n,
        "seed": args.seed,
        "steps": steps,
        "caption_tokens": pipe.defaults.caption_tokens,
        "video_tokens": math.prod(
            n // patch
            for n, patch in zip(jobs[0].latent.shape[2:], pipe.transformer.config.patch_size, strict=True)
        ),
        "deviation_clips": args.deviation_clips,
        "deviation_per_step": {str(k): found for k, found in deviation.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }


TABLE = {
    "split": "pairs",
    "variant": "variant",
    "full_passes": "full passes",
    "all": "all three right",
    "difference": "minus exact",
    "difference_ci": "95% CI",
    "token_agreement": "tokens equal to exact's",
    "identical_captions": "captions identical to exact's",
    "shape": "shape",
    "colour": "colour",
    "motion": "motion",
    "mean_deviation": "logit deviation, mean over steps",
    "max_deviation": "largest",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("--weights", default="model/assets/toy", help="a trained pipeline folder")
    p.add_argument("--n", type=int, default=200, help="fresh clips per split")
    p.add_argument("--intervals", type=parse_int_list, default=[1, 2, 4, 10, 20], help="k values; 1 first")
    p.add_argument("--batch", type=int, default=50, help="captions denoised together")
    p.add_argument("--deviation-clips", type=int, default=50, help="seen clips whose logits are compared")
    add_output_args(p)
    p.set_defaults(seed=1234)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['model']}: {result['clips_per_split']} clips per split, seeds from {result['seed']}, "
        f"{result['steps']} steps, {result['video_tokens']} video and {result['caption_tokens']} caption "
        f"tokens; logit deviation on {result['deviation_clips']} seen clips"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE, check=check_intervals)


if __name__ == "__main__":
    main()
