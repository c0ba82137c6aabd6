"""Captions of clips sent as an evaluation harness's frames, against the same clips sent as MP4s, by the
frame rate the gateway assumes for the frames.

For ``--n`` fresh toy-world scenes (the seen split), each clip is captioned three ways, every way with
the scene's seed (``--seed`` + index):

- ``mp4``: the clip as an MP4, read as the worker reads a ``video_url``;
- ``spread``: the ``--frames`` frames lmms-eval samples from that MP4 (``np.linspace`` over the clip,
  the last frame kept, PNG), made a clip by the gateway's ``images_to_mp4`` at its default rate
  (frames x fps / num_frames: the frames span one clip of the model's default length) and read back;
- ``model_fps``: the same frames at the model's fps (what ``frames_fps`` = fps asks for): consecutive
  frames, trimmed to 4k+1.

Per way: the share of captions whose shape, colour and motion all match the scene (``accuracy``) and,
for the two frame ways, the share naming the same three as the ``mp4`` caption (``agreement``).

    python -m benchmarks.chat_frames --weights model/assets/toy --n 30
"""

from __future__ import annotations

import argparse
import io
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks._cli import add_model_args, add_output_args, load_pipeline, new_parser, run_main
from model.media import images_to_mp4, read_video, write_mp4
from model.toyworld.describe import Attributes, parse_description
from model.toyworld.make import scenes
from model.toyworld.world import render

WAYS = ("mp4", "spread", "model_fps")


def lmms_eval_frames(frames: np.ndarray, count: int) -> list[bytes]:
    """lmms-eval's ``OpenAICompatible.encode_video`` sampling on ``(T, H, W, 3)`` frames, as PNG bytes."""
    indices = np.linspace(0, len(frames) - 1, count, dtype=int)
    if len(frames) - 1 not in indices:
        indices = np.append(indices, len(frames) - 1)
    images = []
    for index in indices.tolist():
        buffer = io.BytesIO()
        Image.fromarray(frames[index]).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe, model = load_pipeline(args)
    d = pipe.defaults
    size = {"height": d.height, "width": d.width}

    def clip(path: Path) -> np.ndarray:
        return read_video(path, **size, fps=d.fps, max_frames=d.num_frames)

    said: dict[str, list[Attributes]] = {way: [] for way in WAYS}
    truths, lengths = [], {way: 0 for way in WAYS}
    with tempfile.TemporaryDirectory() as folder:
        for index, scene in enumerate(scenes(args.n, held_out=False, seed=args.scenes_seed)):
            mp4 = write_mp4(render(scene), Path(folder) / f"{index}.mp4", fps=d.fps)
            decoded = clip(mp4)
            images = lmms_eval_frames(decoded, args.frames)
            rates = {"spread": Fraction(len(images) * d.fps, d.num_frames), "model_fps": Fraction(d.fps)}
            clips = {"mp4": decoded} | {
                way: clip(images_to_mp4(images, Path(folder) / f"{index}-{way}.mp4", **size, fps=rate))
                for way, rate in rates.items()
            }
            for way, frames in clips.items():
                lengths[way] = len(frames)
                caption = pipe.caption(frames, steps=args.steps, seed=args.seed + index).text
                said[way].append(parse_description(caption))
            truths.append(Attributes.of(scene))

    def share(hits: list[bool]) -> float:
        return round(sum(hits) / len(hits), 4)

    rows = [
        {
            "way": way,
            "clip_frames": lengths[way],
            "accuracy": share(
                [found.matches(truth)["all"] for found, truth in zip(said[way], truths, strict=True)]
            ),
            "agreement": None
            if way == "mp4"
            else share([found == mp4 for found, mp4 in zip(said[way], said["mp4"], strict=True)]),
        }
        for way in WAYS
    ]
    return {
        "benchmark": "chat_frames",
        "model": model,
        "n": args.n,
        "frames_sent": args.frames,
        "steps": args.steps or d.steps,
        "seed": args.seed,
        "scenes_seed": args.scenes_seed,
        "rows": rows,
    }


TABLE = {
    "way": "sent as",
    "clip_frames": "clip frames",
    "accuracy": "all three right",
    "agreement": "same three as mp4",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_model_args(p, default_preset="toy")
    p.add_argument("--n", type=int, default=30, help="scenes")
    p.add_argument("--frames", type=int, default=10, help="lmms-eval's max_frames_num (default 10)")
    p.add_argument("--steps", type=int, help="caption steps; default: the model's")
    p.add_argument("--scenes-seed", type=int, default=2026)
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['model']}: {result['n']} toy clips, {result['frames_sent']} frames sent, "
        f"{result['steps']} caption steps"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
