"""The options a request may carry and the rules each must follow, torch-free so the gateway shares them.

:data:`OPTIONS` declares every option once (name, type, help); :data:`MODE_OPTIONS` says which modes
take which. The pipeline's signatures, the API's request schemas and the Python client are checked
against it (``tests/test_options.py``), and both command lines build their flags from it
(:func:`add_option_flags`).

Each check raises :class:`InvalidParameterError` naming the parameter, the value and what is allowed;
nothing is rounded silently.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from model.errors import InvalidParameterError

Mode = Literal["generate", "joint", "caption"]


@dataclass(frozen=True)
class RequestOption:
    """One option of a request: the same name in the API, the client, the pipeline and (dashed) on the
    command line. Every option may be omitted; the served model's default applies."""

    name: str
    type: type[int] | type[float] | type[str]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: dict[str, RequestOption] = {
    option.name: option
    for option in (
        RequestOption("negative_prompt", str, "what the video should not show (the unconditional prompt)"),
        RequestOption("height", int, "pixels, a multiple of 16"),
        RequestOption("width", int, "pixels, a multiple of 16"),
        RequestOption("num_frames", int, "frames, 4k+1"),
        RequestOption("fps", int, "frame rate of the MP4"),
        RequestOption("steps", int, "denoising steps"),
        RequestOption("guidance_scale", float, "classifier-free guidance scale"),
        RequestOption("seed", int, "random seed; drawn (and reported) when omitted"),
        RequestOption("step_cache", float, "opt-in first-block step cache threshold, e.g. 0.1 (default off)"),
        RequestOption("max_tokens", int, "caption length, in tokens"),
        RequestOption("prompt", str, "optional text that conditions the caption"),
        RequestOption(
            "video_reuse",
            int,
            "captioning: a full pass over the video every this many steps, text-only passes between "
            "(1: exact; at least the steps: one full pass)",
        ),
    )
}

VIDEO_OPTIONS = (
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "fps",
    "steps",
    "guidance_scale",
    "seed",
    "step_cache",
)
"""The options of every mode that makes a video (``generate``, and ``joint`` with ``max_tokens``)."""

MODE_OPTIONS: dict[Mode, tuple[str, ...]] = {
    "generate": VIDEO_OPTIONS,
    "joint": (*VIDEO_OPTIONS, "max_tokens"),
    "caption": ("prompt", "steps", "max_tokens", "seed", "video_reuse"),
}
"""Which options each mode takes, besides its input (the prompt of a video mode, the caption's video)."""


def add_option_flags(parser: argparse.ArgumentParser, mode: Mode) -> None:
    """One flag per option of ``mode`` (``--num-frames``, ...), each defaulting to None (omitted)."""
    for name in MODE_OPTIONS[mode]:
        option = OPTIONS[name]
        parser.add_argument(option.flag, dest=name, type=option.type, help=option.help)


def option_values(args: argparse.Namespace, mode: Mode) -> dict[str, object]:
    """The options of ``mode`` given on a command line parsed with :func:`add_option_flags`."""
    return {name: getattr(args, name) for name in MODE_OPTIONS[mode]}


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
