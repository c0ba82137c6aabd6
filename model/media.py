"""Video probing, decoding and MP4 writing with the ffmpeg binary shipped by imageio-ffmpeg.

Torch-free on purpose: the gateway imports this module to probe uploads. Frames are numpy ``uint8``
arrays of shape ``(T, H, W, 3)`` in RGB order.

Safety of untrusted input: every ffmpeg call that reads a user file passes ``-protocol_whitelist file``
and a ``-format_whitelist`` of real container demuxers (MP4/MOV, Matroska/WebM, AVI), so HLS playlists,
concat scripts and other formats that reference further files or URLs are refused before they are
opened. Size, resolution, duration and frame count are checked from the container header before any
frame is decoded, and decoders additionally refuse frames above the pixel limit (``-max_pixels``).

ffmpeg is run directly rather than through ``imageio_ffmpeg.read_frames``/``write_frames``: the
former reports metadata only after the first frame has been decoded and logs a warning whenever the
output is scaled, the latter ignores ffmpeg's exit status, so a failed write would go unnoticed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from model.errors import InvalidParameterError, InvalidVideoError, VideoTooLargeError, VideoWriteError

#: Demuxers accepted for input files (ffmpeg names): ISO-BMFF/QuickTime, Matroska/WebM and AVI.
ALLOWED_DEMUXERS = "mov,mp4,matroska,webm,avi"
_ALLOWED_HINT = "accepted containers are MP4/MOV, Matroska/WebM and AVI with a video track"
_PROBE_TIMEOUT_S = 30.0

# Anchored at line starts: ffmpeg prints user metadata on lines that begin with "<spaces>: ", so a
# crafted title cannot pose as a Duration or Stream line.
_INPUT = re.compile(r"^Input #0, ([\w,]+), from", re.M)
_DURATION = re.compile(r"^[ \t]*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", re.M)
_VIDEO_STREAM = re.compile(r"^[ \t]*Stream #0:\d+.*?: Video: (\w+)(.*)$", re.M)
_LOG_TAG = re.compile(r"^\[[^\]]* @ [^\]]*\] ")
_SIZE = re.compile(r", (\d+)x(\d+)[ ,]")
_RATE = re.compile(r"(\d+(?:\.\d+)?)(k?) (fps|tbr)")


@dataclass(frozen=True)
class VideoLimits:
    """Upper bounds for an input video; the defaults accept up to 60 s of 4K (UHD or DCI) video.

    Resolution limits are orientation-free: ``max_pixels`` bounds width * height and ``max_side`` the
    longer side, so a portrait 2160x3840 phone clip passes exactly like a landscape one.
    """

    max_bytes: int = 200 * 1024 * 1024
    max_seconds: float = 60.0
    max_pixels: int = 4096 * 2160
    max_side: int = 4096
    max_frames: int = 7200  # 60 s at 120 fps


@dataclass(frozen=True)
class VideoInfo:
    """What the container header declares about the first video stream.

    ``width``/``height`` are the coded size (before any display rotation); ``fps`` and
    ``duration_seconds`` are None when the container does not declare them (e.g. live WebM).
    """

    width: int
    height: int
    fps: float | None
    duration_seconds: float | None
    codec: str
    container: str
    size_bytes: int


DEFAULT_LIMITS = VideoLimits()


def _ffmpeg_input(path: Path, limits: VideoLimits, *options: str) -> list[str]:
    """An ffmpeg command line up to ``-i path`` that opens ``path`` as untrusted input.

    ``options`` go before ``-i``; the whitelists and the decoder pixel cap are always there.
    """
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-hide_banner", "-nostdin", *options),
        *("-protocol_whitelist", "file", "-format_whitelist", ALLOWED_DEMUXERS),
        *("-max_pixels", str(limits.max_pixels), "-i", f"file:{path.resolve()}"),
    ]


def _ffmpeg_error(log: str, path: Path, label: str) -> str:
    """ffmpeg's last few complaints (its ``[component @ 0x...]`` lines), for error messages; ``path``
    called ``label`` in them."""
    for spelling in dict.fromkeys((str(path.resolve()), str(path))):
        log = log.replace(spelling, label)
    tagged = (_LOG_TAG.sub("", line).strip() for line in log.splitlines() if _LOG_TAG.match(line))
    reasons = list(dict.fromkeys(line.removeprefix("Error opening input: ") for line in tagged if line))
    lines = log.strip().splitlines()
    return "; ".join(reasons[-3:]) or (lines[-1] if lines else "ffmpeg failed without a message")


def probe_video(
    path: str | os.PathLike[str], limits: VideoLimits = DEFAULT_LIMITS, *, name: str | None = None
) -> VideoInfo:
    """Read the container header of ``path`` and check it against ``limits`` without decoding frames.

    Errors call the video ``name`` (e.g. the quoted file name a client uploaded it as; default the file's
    own name, quoted), never by its path.

    Raises InvalidVideoError for a missing, empty, truncated or undecodable file, a non-video or
    disallowed format (playlists, scripts, images, PDFs) and audio-only files; VideoTooLargeError when
    the file size, resolution, duration or estimated frame count exceeds ``limits``.
    """
    path = Path(path)
    label = repr(path.name) if name is None else name
    if not path.is_file():
        raise InvalidVideoError(f"video {label} does not exist or is not a regular file")
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        raise InvalidVideoError(f"video {label} is empty (0 bytes); {_ALLOWED_HINT}")
    if size_bytes > limits.max_bytes:
        raise VideoTooLargeError(
            f"video is {size_bytes} bytes; at most {limits.max_bytes} bytes are accepted"
        )
    try:
        proc = subprocess.run(
            _ffmpeg_input(path, limits),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise InvalidVideoError(f"probing {label} took over {_PROBE_TIMEOUT_S:.0f} s") from exc
    log = proc.stderr.decode("utf-8", "replace")

    container = _INPUT.search(log)
    if container is None:
        raise InvalidVideoError(
            f"{label} is not a readable video ({_ffmpeg_error(log, path, label)}); {_ALLOWED_HINT}"
        )
    stream = next((m for m in _VIDEO_STREAM.finditer(log) if "(attached pic)" not in m.group(2)), None)
    if stream is None:
        raise InvalidVideoError(f"{label} has no video stream (audio-only?); {_ALLOWED_HINT}")
    size = _SIZE.search(stream.group(2))
    width, height = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
    if width <= 0 or height <= 0:
        raise InvalidVideoError(f"{label} declares no valid frame size; {_ALLOWED_HINT}")
    rate = _RATE.search(stream.group(2))
    fps = float(rate.group(1)) * (1000 if rate.group(2) else 1) if rate else None
    duration = _DURATION.search(log)
    seconds = int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]) if duration else None

    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise VideoTooLargeError(
            f"video is {width}x{height}; at most {limits.max_pixels} pixels per frame and "
            f"{limits.max_side} pixels per side are accepted"
        )
    if seconds is not None and seconds > limits.max_seconds:
        raise VideoTooLargeError(
            f"video is {seconds:.1f} s long; at most {limits.max_seconds:g} s is accepted"
        )
    if seconds is not None and fps and seconds * fps > limits.max_frames:
        raise VideoTooLargeError(
            f"video has about {seconds * fps:.0f} frames; at most {limits.max_frames} are accepted"
        )
    if "Could not find codec parameters" in log:
        raise InvalidVideoError(f"the video stream of {label} cannot be decoded (truncated or corrupt)")
    return VideoInfo(width, height, fps, seconds, stream.group(1), container.group(1), size_bytes)


def _check_multiple_of_16(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 16:
        raise InvalidParameterError(f"{name} is {value!r}; it must be a positive multiple of 16", param=name)


def _check_fps(fps: float) -> None:
    if (
        isinstance(fps, bool)
        or not isinstance(fps, int | float)
        or not math.isfinite(fps)
        or not 0 < fps <= 240
    ):
        raise InvalidParameterError(f"fps is {fps!r}; it must be a number in (0, 240]", param="fps")


def read_video(
    path: str | os.PathLike[str],
    *,
    height: int,
    width: int,
    fps: float,
    max_frames: int,
    limits: VideoLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Decode ``path`` into RGB frames of shape ``(T, height, width, 3)``, dtype uint8.

    The video is probed first (see ``probe_video``), then resampled to ``fps``, scaled preserving its
    aspect ratio until it covers ``height`` x ``width`` and centre-cropped to exactly that size.
    ``T`` is the largest ``4k + 1`` not above ``min(decoded frames, max_frames)``; decoding stops
    after ``max_frames`` output frames (and after ``limits.max_seconds`` of input), so memory stays
    bounded by ``max_frames * height * width * 3`` bytes. ``height``/``width`` must be positive
    multiples of 16 and ``max_frames`` of the form ``4k + 1`` (InvalidParameterError otherwise).
    """
    _check_multiple_of_16("height", height)
    _check_multiple_of_16("width", width)
    _check_fps(fps)
    if not isinstance(max_frames, int) or max_frames < 1 or max_frames % 4 != 1:
        raise InvalidParameterError(
            f"max_frames is {max_frames!r}; it must be of the form 4k + 1 (1, 5, 9, ..., 81, ...)",
            param="max_frames",
        )
    path = Path(path)
    probe_video(path, limits)

    scale = f"scale={width}:{height}:force_original_aspect_ratio=increase"
    cmd = [
        *_ffmpeg_input(path, limits, "-loglevel", "error", "-t", f"{limits.max_seconds:g}"),
        *("-map", "0:v:0", "-an", "-sn", "-dn"),
        *("-vf", f"fps={fps:g},{scale},crop={width}:{height}", "-frames:v", str(max_frames)),
        *("-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"),
    ]
    frames = np.empty((max_frames, height, width, 3), dtype=np.uint8)
    buffer = memoryview(frames.reshape(-1))
    received = 0
    with tempfile.TemporaryFile() as errors:
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors) as proc:
            while received < len(buffer) and (chunk := proc.stdout.readinto(buffer[received:])):
                received += chunk
        errors.seek(0)
        log = errors.read().decode("utf-8", "replace")
    decoded = received // (height * width * 3)
    if proc.returncode != 0 or decoded < 1:
        label = repr(path.name)
        raise InvalidVideoError(f"could not decode any frame of {label} ({_ffmpeg_error(log, path, label)})")
    return frames[: (decoded - 1) // 4 * 4 + 1]


def write_mp4(frames: np.ndarray, path: str | os.PathLike[str], *, fps: float) -> Path:
    """Encode RGB ``frames`` (uint8, shape ``(T, H, W, 3)``, H and W even) as H.264 MP4 at ``path``.

    The file is yuv420p with ``+faststart`` (plays and seeks in browsers). It is written to a
    temporary name in the same directory and renamed into place, so ``path`` never holds a partial
    file. Raises InvalidParameterError for bad frames or fps, VideoWriteError when writing fails.
    Returns ``path`` as a Path.
    """
    if not isinstance(frames, np.ndarray):
        raise InvalidParameterError(
            f"frames is a {type(frames).__name__}; it must be a numpy uint8 array", param="frames"
        )
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidParameterError(
            f"frames is a {frames.dtype} array of shape {frames.shape}; it must be uint8 of shape (T, H, W, 3)",
            param="frames",
        )
    count, height, width, _ = frames.shape
    if count < 1 or height < 2 or width < 2 or height % 2 or width % 2:
        raise InvalidParameterError(
            f"frames has shape {frames.shape}; it needs T >= 1 and even H, W >= 2 (yuv420p)", param="frames"
        )
    _check_fps(fps)
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-hide_banner", "-nostdin", "-loglevel", "error", "-n"),
        *("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}"),
        *("-r", str(Fraction(fps).limit_denominator(1001)), "-i", "pipe:0"),
        *("-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p"),
        *("-movflags", "+faststart", "-f", "mp4", str(temp)),
    ]
    try:
        with tempfile.TemporaryFile() as errors:
            with subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors
            ) as proc:
                # A broken pipe means ffmpeg stopped early; its exit status and log below say why.
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(memoryview(np.ascontiguousarray(frames).reshape(-1)))
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            errors.seek(0)
            log = errors.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise VideoWriteError(f"could not write video {path}: {_ffmpeg_error(log, temp, str(path))}")
        os.replace(temp, path)
    except OSError as exc:
        raise VideoWriteError(f"could not write video {path}: {exc.strerror or exc}") from exc
    finally:
        temp.unlink(missing_ok=True)
    return path


#: The still-image formats :func:`images_to_mp4` takes, by their first bytes, with ffmpeg's demuxer.
IMAGE_FORMATS = {b"\x89PNG\r\n\x1a\n": ("PNG", "png_pipe"), b"\xff\xd8\xff": ("JPEG", "jpeg_pipe")}


def _image_format(image: bytes, index: int) -> tuple[str, str]:
    for magic, image_format in IMAGE_FORMATS.items():
        if image.startswith(magic):
            return image_format
    raise InvalidVideoError(f"image {index} is neither PNG nor JPEG; send frames as PNG or JPEG")


def images_to_mp4(
    images: Sequence[bytes],
    path: str | os.PathLike[str],
    *,
    height: int,
    width: int,
    fps: float | Fraction,
    limits: VideoLimits = DEFAULT_LIMITS,
) -> Path:
    """Encode still images (PNG or JPEG files' bytes, all one format), in order, as an H.264 MP4 at
    ``fps``: each image scaled preserving its aspect ratio until it covers ``height`` x ``width`` and
    centre-cropped to exactly that size, as :func:`read_video` fits a video.

    The images are untrusted input: ffmpeg reads them from a pipe with only the PNG or JPEG demuxer
    allowed, refuses frames above ``limits.max_pixels`` and stops at the first one it cannot decode.
    Raises InvalidVideoError for an image that is neither PNG nor JPEG, a mix of the two, or one that
    does not decode; InvalidParameterError for bad sizes or fps; VideoWriteError when writing fails.
    """
    _check_multiple_of_16("height", height)
    _check_multiple_of_16("width", width)
    _check_fps(float(fps))
    if not images:
        raise InvalidVideoError("no images to make a video of")
    formats = [_image_format(image, index) for index, image in enumerate(images)]
    name, demuxer = formats[0]
    if any(found != formats[0] for found in formats):
        raise InvalidVideoError(f"the frames mix PNG and JPEG; send every frame as {name}")
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-hide_banner", "-nostdin", "-loglevel", "error", "-xerror", "-n"),
        *("-protocol_whitelist", "pipe", "-format_whitelist", demuxer, "-max_pixels", str(limits.max_pixels)),
        *("-framerate", str(rate), "-f", demuxer, "-i", "pipe:0"),
        *("-vf", f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height}"),
        *("-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p"),
        *("-movflags", "+faststart", "-f", "mp4", str(temp)),
    ]
    try:
        proc = subprocess.run(cmd, input=b"".join(images), capture_output=True, timeout=_PROBE_TIMEOUT_S)
        if proc.returncode != 0:
            log = proc.stderr.decode("utf-8", "replace")
            raise InvalidVideoError(
                f"the {name} frames could not be decoded ({_ffmpeg_error(log, temp, 'the video')})"
            )
        os.replace(temp, path)
    except subprocess.TimeoutExpired as exc:
        raise InvalidVideoError(f"encoding {len(images)} frames took over {_PROBE_TIMEOUT_S:.0f} s") from exc
    except OSError as exc:
        raise VideoWriteError(f"could not write video {path}: {exc.strerror or exc}") from exc
    finally:
        temp.unlink(missing_ok=True)
    return path


def first_frame_jpeg(
    path: str | os.PathLike[str], *, max_side: int = 512, limits: VideoLimits = DEFAULT_LIMITS
) -> bytes:
    """JPEG bytes of the first frame of ``path``, scaled down (aspect kept) to at most ``max_side``.

    The video is probed first (see ``probe_video``); raises InvalidVideoError when no frame decodes.
    """
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise InvalidParameterError(
            f"max_side is {max_side!r}; it must be an integer >= 16", param="max_side"
        )
    path = Path(path)
    probe_video(path, limits)
    fit = f"w='min(iw,{max_side})':h='min(ih,{max_side})':force_original_aspect_ratio=decrease"
    cmd = [
        *_ffmpeg_input(path, limits, "-loglevel", "error"),
        *("-map", "0:v:0", "-frames:v", "1"),
        *("-vf", f"scale={fit}", "-c:v", "mjpeg", "-q:v", "3", "-f", "image2pipe", "pipe:1"),
    ]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=_PROBE_TIMEOUT_S)
    if proc.returncode != 0 or not proc.stdout.startswith(b"\xff\xd8"):
        log = proc.stderr.decode("utf-8", "replace")
        label = repr(path.name)
        raise InvalidVideoError(
            f"could not decode the first frame of {label} ({_ffmpeg_error(log, path, label)})"
        )
    return proc.stdout


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 frames ``(T, H, W, 3)`` against a reference; inf when equal."""
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)
