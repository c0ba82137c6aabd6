"""The toy world: one flat-coloured shape on black, moving in a straight line or staying still.

Ground truth is a :class:`Scene`; :func:`render` draws it as ``(17, 64, 64, 3)`` uint8 frames
(8 fps), :func:`prompt_of` and :func:`caption_of` describe it. Three colour+shape pairs are held out
of training in every motion (:data:`HELD_OUT`) to measure generalisation.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np

FRAMES = 17
FPS = 8
SIDE = 64
SHAPES = ("square", "circle", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
}
MOTIONS = ("left", "right", "up", "down", "still")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}
HELD_OUT = frozenset({("purple", "triangle"), ("yellow", "circle"), ("white", "square")})
MIN_SIZE, MAX_SIZE = 12, 20


@dataclass(frozen=True)
class Scene:
    """Ground truth of one clip. ``x, y``: the object's centre in the first frame, in pixels."""

    shape: str
    colour: str
    motion: str
    size: int  # side, diameter or base, 12-20 px
    speed: int  # px per frame: 1-2 when moving, 0 when still
    x: float
    y: float

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.motion]
        return self.x + dx * self.speed * frame, self.y + dy * self.speed * frame

    def to_dict(self) -> dict:
        return asdict(self)


def pairs(held_out: bool) -> list[tuple[str, str]]:
    """The colour+shape pairs of the training split (``held_out=False``) or the held-out ones."""
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def random_scene(rng: random.Random, pair: tuple[str, str], motion: str) -> Scene:
    """A scene of ``pair`` and ``motion`` with a random size, speed and a start that keeps it inside."""
    colour, shape = pair
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    speed = 0 if motion == "still" else rng.randint(1, 2)
    dx, dy = DIRECTIONS[motion]
    travel = speed * (FRAMES - 1)
    half = size / 2

    def start(direction: int) -> float:
        low, high = half, SIDE - half  # the centre's allowed range over the whole clip
        low, high = (low + travel, high) if direction < 0 else (low, high - travel if direction else high)
        return float(rng.randint(int(np.ceil(low)), int(np.floor(high))))

    return Scene(shape, colour, motion, size, speed, start(dx), start(dy))


def _mask(shape: str, size: int, cx: float, cy: float) -> np.ndarray:
    """``(64, 64)`` bool: pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    half = size / 2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    depth = ys - (cy - half)  # 0 at the apex, size at the base
    return (depth >= 0) & (depth <= size) & (np.abs(xs - cx) <= depth / 2)


def render(scene: Scene) -> np.ndarray:
    """``(17, 64, 64, 3)`` uint8 frames of ``scene`` on a black background."""
    frames = np.zeros((FRAMES, SIDE, SIDE, 3), dtype=np.uint8)
    for index in range(FRAMES):
        frames[index][_mask(scene.shape, scene.size, *scene.centre(index))] = COLOURS[scene.colour]
    return frames


def prompt_of(scene: Scene) -> str:
    """``a red circle moving left`` / ``a red circle staying still``."""
    action = "staying still" if scene.motion == "still" else f"moving {scene.motion}"
    return f"a {scene.colour} {scene.shape} {action}"


def _third(value: float, names: tuple[str, str, str]) -> str:
    return names[min(2, int(value // (SIDE / 3)))]


def caption_of(scene: Scene) -> str:
    """A detailed caption: the prompt's facts plus size, start, speed and background (26 words)."""
    where = f"{_third(scene.y, ('top', 'middle', 'bottom'))} {_third(scene.x, ('left', 'center', 'right'))}"
    action = "stays still at 0" if scene.motion == "still" else f"moves {scene.motion} at {scene.speed}"
    return (
        f"a {scene.colour} {scene.shape} {scene.size} pixels wide starts near the {where} of the frame "
        f"and {action} pixels per frame on a black background"
    )
