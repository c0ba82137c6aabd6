"""The rules every generation parameter must follow, torch-free so the gateway shares them.

Each check raises :class:`InvalidParameterError` naming the parameter, the value and what is allowed;
nothing is rounded silently.
"""

from __future__ import annotations

from model.errors import InvalidParameterError

SIDE_MULTIPLE = 16
"""Heights and widths are multiples of 16: the VAE downsamples 8x and the patch embedding 2x (the toy
model: 4x and 4x)."""
FRAME_STRIDE = 4
"""Frame counts are ``4k + 1``: the VAE keeps the first frame and compresses the rest 4x in time."""


def check_side(name: str, value: int, maximum: int) -> int:
    """A height or width: a multiple of 16 in ``[16, maximum]``."""
    if value < SIDE_MULTIPLE or value > maximum or value % SIDE_MULTIPLE:
        raise InvalidParameterError(
            f"{name} must be a multiple of {SIDE_MULTIPLE} between {SIDE_MULTIPLE} and {maximum}, got {value}",
            param=name,
        )
    return value


def check_frames(value: int, maximum: int, name: str = "num_frames") -> int:
    """A frame count of the form ``4k + 1`` in ``[1, maximum]``."""
    if value < 1 or value > maximum or (value - 1) % FRAME_STRIDE:
        nearest = max(1, round((value - 1) / FRAME_STRIDE) * FRAME_STRIDE + 1)
        raise InvalidParameterError(
            f"{name} must be of the form 4k+1 (1, 5, 9, ..., {maximum}), got {value}"
            + (f"; the nearest allowed value is {min(nearest, maximum)}" if value >= 1 else ""),
            param=name,
        )
    return value


def check_range(name: str, value: float, minimum: float, maximum: float) -> float:
    """Any number in ``[minimum, maximum]``."""
    if not minimum <= value <= maximum:
        raise InvalidParameterError(
            f"{name} must be between {minimum} and {maximum}, got {value}", param=name
        )
    return value


def latent_frames(num_frames: int) -> int:
    """Latent frames for ``num_frames`` pixel frames: ``(T - 1) / 4 + 1``."""
    return (num_frames - 1) // FRAME_STRIDE + 1
