"""VAE decoding with and without tiles: time, peak memory, and PSNR of the tiled frames against the
untiled ones.

The pipeline tiles when ``height * width`` exceeds ``VaeTiling.min_pixels`` (``UNIVIGU_VAE_TILING_MIN_PIXELS``);
this script decodes one random latent ``(1, z, f, H/8, W/8)`` both ways with ``--tile``/``--stride``
(pixels), interleaved. Peak memory is the extra memory of one decode (``benchmarks/_timing.py``):
on the CPU the resident-set growth, which only roughly tracks what a GPU would need; the memory
figures that matter are the CUDA ones.

    python -m benchmarks.vae_tiling --preset tiny --height 256 --width 256 --frames 17 --repeats 3
    python -m benchmarks.vae_tiling --device cuda --wan /models/Wan2.1-T2V-1.3B-Diffusers \\
        --height 720 --width 1280 --frames 81 --repeats 2
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from benchmarks._cli import add_model_args, add_output_args, add_run_args, load_pipeline, new_parser, run_main
from benchmarks._timing import median, mib, paired_ratio, peak_memory, time_interleaved
from model.config import VaeTiling
from model.media import psnr
from model.pixels import pixels_to_frames


def decode_frames(vae: AutoencoderKLWan, latent: torch.Tensor, tiling: VaeTiling | None) -> np.ndarray:
    """``latent (1, z, f, h, w)`` -> uint8 frames ``(T, H, W, 3)``, in tiles when ``tiling`` is given."""
    if tiling is None:
        vae.disable_tiling()
    else:
        vae.enable_tiling(tiling.tile, tiling.tile, tiling.stride, tiling.stride)
    return pixels_to_frames(vae.decode(latent).sample[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Decode untiled and tiled, interleaved; a JSON-ready dict with one row per way."""
    pipe, model = load_pipeline(args)
    vae, device = pipe.vae, pipe.device
    scale = vae.spatial_compression_ratio
    shape = (1, vae.config.z_dim, (args.frames - 1) // 4 + 1, args.height // scale, args.width // scale)
    latent = torch.randn(shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
    ways = {"untiled": None, "tiled": VaeTiling(min_pixels=0, tile=args.tile, stride=args.stride)}
    with torch.inference_mode():
        frames = {name: decode_frames(vae, latent, tiling) for name, tiling in ways.items()}
        calls = {name: (lambda t=tiling: decode_frames(vae, latent, t)) for name, tiling in ways.items()}
        peaks = {name: peak_memory(call, device) for name, call in calls.items()}
        samples = time_interleaved(calls, device, repeats=args.repeats, warmup=0)
    rows = []
    for name in ways:
        ratio, ratio_ci = paired_ratio(samples[name]["wall"], samples["untiled"]["wall"])
        rows.append(
            {
                "way": name,
                "decode_s": median(samples[name]["wall"]),
                "ratio": ratio,
                "ratio_ci": ratio_ci,
                "peak_mib": mib(peaks[name]),
                "psnr_db": psnr(frames[name], frames["untiled"]),
            }
        )
    return {
        "benchmark": "vae_tiling",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": model,
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "tile": args.tile,
        "stride": args.stride,
        "repeats": args.repeats,
        "rows": rows,
    }


TABLE = {
    "way": "decode",
    "decode_s": "s/decode",
    "ratio": "/ untiled (wall)",
    "ratio_ci": "95% CI",
    "peak_mib": "peak extra MiB",
    "psnr_db": "PSNR vs untiled (dB)",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_model_args(p, default_preset="tiny")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17, help="4k+1")
    p.add_argument("--tile", type=int, default=VaeTiling.tile, help="tile side in pixels (multiple of 8)")
    p.add_argument(
        "--stride", type=int, default=VaeTiling.stride, help="tile stride in pixels (multiple of 8)"
    )
    add_run_args(p, repeats=3, warmup=False)
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['model']} VAE on {result['device']} ({result['threads']} threads), {result['width']}x"
        f"{result['height']}, {result['frames']} frames, tile {result['tile']} stride {result['stride']}, "
        f"median of {result['repeats']}"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
