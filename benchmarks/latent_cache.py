"""Filling the training latent cache: every video in one :meth:`LatentCache.ensure_all` call (batched
encoding, the trainer's way) against one call per video (one VAE call per video), interleaved.

``--clips`` toy clips are rendered once (``model.toyworld.make``); every timed fill starts from an
empty cache folder, so both ways decode and encode every clip. The VAE and the geometry are those of
``--weights`` or ``--preset`` (default: the ``toy`` preset, random weights).

    OMP_NUM_THREADS=2 python -m benchmarks.latent_cache --weights model/assets/toy --clips 64 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks._cli import add_model_args, add_output_args, add_run_args, load_pipeline, new_parser, run_main
from benchmarks._timing import median, paired_ratio, time_interleaved
from model.toyworld.make import make_dataset
from model.training.data import LatentCache, VideoGeometry

WAYS = ("one call per video", "one call for all")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fill an empty cache both ways, interleaved; a JSON-ready dict with one row per way."""
    pipe, model = load_pipeline(args)
    d = pipe.defaults
    geometry = VideoGeometry(d.height, d.width, d.num_frames, d.fps)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_dataset(args.clips, root / "data", seed=args.seed)
        videos = sorted((root / "data" / "videos").iterdir())

        def fill(batched: bool) -> None:
            folder = root / "cache"
            shutil.rmtree(folder, ignore_errors=True)
            cache = LatentCache(folder, pipe.vae, geometry)
            if batched:
                cache.ensure_all(videos)
            else:
                for video in videos:
                    cache.ensure_all([video])

        calls = {WAYS[0]: lambda: fill(False), WAYS[1]: lambda: fill(True)}
        samples = time_interleaved(calls, pipe.device, repeats=args.repeats, warmup=args.warmup)
    rows = []
    for name in WAYS:
        ratio, ratio_ci = paired_ratio(samples[name]["wall"], samples[WAYS[0]]["wall"])
        rows.append(
            {
                "way": name,
                "ms_per_clip": 1000.0 * median(samples[name]["wall"]) / args.clips,
                "ratio": ratio,
                "ratio_ci": ratio_ci,
            }
        )
    return {
        "benchmark": "latent_cache",
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),
        "model": model,
        "geometry": vars(geometry),
        "clips": args.clips,
        "repeats": args.repeats,
        "rows": rows,
    }


TABLE = {
    "way": "cache fill",
    "ms_per_clip": "ms/clip",
    "ratio": "/ one per video (wall)",
    "ratio_ci": "95% CI",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_model_args(p, default_preset="toy")
    p.add_argument("--clips", type=int, default=64, help="toy clips in the cache")
    add_run_args(p, repeats=3)
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    g = result["geometry"]
    return (
        f"{result['model']} VAE on {result['device']} ({result['threads']} threads), {g['width']}x"
        f"{g['height']}, {g['num_frames']} frames, {result['clips']} clips, median of {result['repeats']}"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
