"""An analytic detector that reads a toy clip's attributes off its pixels.

Foreground: pixels whose brightest channel exceeds :data:`FOREGROUND` (the background is black).
Colour: the palette entry nearest to the mean foreground colour. Motion: the displacement of the
foreground centroid from the first to the last frame; under :data:`STILL_PIXELS` it is "still",
otherwise its dominant axis. Shape: the median over frames of the fill ratio (foreground area over
bounding-box area): about 1 for a square, pi/4 for a circle and 1/2 for a triangle.
"""

from __future__ import annotations

import numpy as np

from model.toyworld.describe import Attributes
from model.toyworld.world import COLOURS

FOREGROUND = 60
STILL_PIXELS = 6.0  # the slowest real motion covers 16 px over a clip
SQUARE_FILL, CIRCLE_FILL = 0.89, 0.64  # thresholds between 1.0 / 0.785 / 0.5
MIN_PIXELS = 12  # a frame with fewer foreground pixels shows no object


def detect(frames: np.ndarray) -> Attributes:
    """``frames (T, H, W, 3)`` uint8 -> the attributes it shows (None where unreadable)."""
    mask = frames.max(axis=-1) > FOREGROUND  # (T, H, W)
    visible = mask.reshape(mask.shape[0], -1).sum(1) >= MIN_PIXELS
    if not visible.any():
        return Attributes(None, None, None)
    return Attributes(_shape(mask[visible]), _colour(frames[mask]), _motion(mask, visible))


def _colour(pixels: np.ndarray) -> str:
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(0)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - mean) ** 2)))


def _shape(mask: np.ndarray) -> str:
    ratios = []
    for frame in mask:
        ys, xs = np.nonzero(frame)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        ratios.append(len(ys) / box)
    fill = float(np.median(ratios))
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def _motion(mask: np.ndarray, visible: np.ndarray) -> str:
    frames = np.nonzero(visible)[0]
    first, last = (np.argwhere(mask[i]).mean(0) for i in (frames[0], frames[-1]))  # (y, x)
    dy, dx = last - first
    if max(abs(dx), abs(dy)) < STILL_PIXELS:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
