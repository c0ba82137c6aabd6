"""``univigu toyworld make``: render toy clips as MP4 files and write their training manifest."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from model.media import write_mp4
from model.toyworld.world import FPS, MOTIONS, Scene, caption_of, pairs, prompt_of, random_scene, render

MANIFEST = "manifest.jsonl"


def scenes(n: int, *, held_out: bool, seed: int) -> list[Scene]:
    """``n`` scenes cycling through every (pair, motion) of the split, so each appears equally often."""
    rng = random.Random(seed)
    combos = list(itertools.product(pairs(held_out), MOTIONS))
    picked: list[tuple] = []
    while len(picked) < n:
        rng.shuffle(combos)
        picked += combos
    return [random_scene(rng, pair, motion) for pair, motion in picked[:n]]


def make_dataset(n: int, out: Path, *, held_out: bool = False, seed: int = 0) -> Path:
    """Write ``out/videos/NNNNN.mp4`` and ``out/manifest.jsonl`` (rows carry the ground-truth scene)."""
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, scene in enumerate(scenes(n, held_out=held_out, seed=seed)):
        path = write_mp4(render(scene), videos / f"{index:05d}.mp4", fps=FPS)
        rows.append(
            {
                "video": str(path.relative_to(out)),
                "prompt": prompt_of(scene),
                "caption": caption_of(scene),
                "scene": scene.to_dict(),
            }
        )
    manifest = out / MANIFEST
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
