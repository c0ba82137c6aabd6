"""Tests of model.media against the real ffmpeg shipped by imageio-ffmpeg (tiny clips, made on the fly)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from model.errors import InvalidParameterError, InvalidVideoError, VideoTooLargeError, VideoWriteError
from model.media import VideoLimits, first_frame_jpeg, images_to_mp4, probe_video, psnr, read_video, write_mp4

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
BACKGROUND = (20, 20, 80)
SQUARE = (220, 40, 40)


def ffmpeg(*args: str) -> None:
    """Run the real ffmpeg quietly (one thread, to be gentle with shared CPUs)."""
    subprocess.run([FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def lavfi_clip(path: Path, source: str, *codec: str) -> Path:
    """Encode an ffmpeg test source such as ``color=c=red:s=64x32:r=24:d=1`` into ``path``."""
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        source,
        *(codec or ("-c:v", "libx264", "-preset", "ultrafast")),
        "-threads",
        "1",
        str(path),
    )
    return path


def has_encoder(name: str) -> bool:
    out = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines())


def moving_square(count: int = 17, height: int = 64, width: int = 96) -> np.ndarray:
    """``count`` frames of a red 16x16 square moving 4 px right per frame over a dark blue background."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for t in range(count):
        frames[t, 24:40, 4 * t : 4 * t + 16] = SQUARE
    return frames


@pytest.fixture(scope="module")
def square_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mp4(moving_square(), tmp_path_factory.mktemp("clip") / "square.mp4", fps=8)


# ----------------------------------------------------------------------------- writing and reading


def test_module_imports_without_torch() -> None:
    code = "import sys, model.media; assert 'torch' not in sys.modules, 'model.media imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_write_mp4_is_browser_friendly_h264(square_clip: Path) -> None:
    info = probe_video(square_clip)
    assert (info.width, info.height, info.fps, info.codec) == (96, 64, 8.0, "h264")
    assert "mp4" in info.container
    assert info.duration_seconds == pytest.approx(17 / 8, abs=0.05)
    assert info.size_bytes == square_clip.stat().st_size
    data = square_clip.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "faststart: the index must precede the media data"
    log = subprocess.run(
        [FFMPEG, "-hide_banner", "-i", str(square_clip)], capture_output=True, text=True
    ).stderr
    assert "yuv420p" in log
    assert not [p for p in square_clip.parent.iterdir() if p.name.endswith(".part")]


def test_read_video_roundtrip_keeps_content(square_clip: Path) -> None:
    frames = read_video(square_clip, height=64, width=96, fps=8, max_frames=81)
    assert frames.dtype == np.uint8
    assert frames.shape == (17, 64, 96, 3)
    original = moving_square()
    assert np.abs(frames.astype(int) - original).mean() < 4
    for t in (0, 8, 16):
        red_columns = np.flatnonzero(frames[t, 32, :, 0] > 128)
        assert red_columns.min() == pytest.approx(4 * t, abs=1)
        assert red_columns.max() == pytest.approx(4 * t + 15, abs=1)


def test_read_video_trims_to_4k_plus_1_and_max_frames(square_clip: Path) -> None:
    assert read_video(square_clip, height=32, width=48, fps=8, max_frames=9).shape[0] == 9
    # 17 frames at 8 fps resampled to 6 fps: about 13 frames, trimmed to 13 (4 * 3 + 1).
    assert read_video(square_clip, height=32, width=48, fps=6, max_frames=81).shape[0] == 13


def test_fps_resampling_picks_the_right_frames(tmp_path: Path) -> None:
    levels = 5 * np.arange(48)  # frame i of the 24 fps input is uniformly grey at level 5 * i
    frames = np.broadcast_to(levels[:, None, None, None], (48, 32, 32, 3)).astype(np.uint8)
    clip = write_mp4(frames, tmp_path / "ramp.mp4", fps=24)
    at_12 = read_video(clip, height=32, width=32, fps=12, max_frames=81)
    assert at_12.shape[0] == 21  # 24 frames decoded, largest 4k + 1 is 21
    np.testing.assert_allclose(at_12.mean(axis=(1, 2, 3)), levels[0:42:2], atol=3)
    # 2 s at 24 fps -> 16 fps: ffmpeg's fps filter yields 32 frames, trimmed to 29 (4 * 7 + 1).
    assert read_video(clip, height=32, width=32, fps=16, max_frames=81).shape[0] == 29


def test_wide_clip_is_centre_cropped_not_squashed(tmp_path: Path) -> None:
    frames = np.zeros((5, 64, 128, 3), dtype=np.uint8)  # 2:1: red | green (centre half) | blue
    frames[:, :, :32] = (255, 0, 0)
    frames[:, :, 32:96] = (0, 255, 0)
    frames[:, :, 96:] = (0, 0, 255)
    clip = write_mp4(frames, tmp_path / "wide.mp4", fps=8)
    square = read_video(clip, height=32, width=32, fps=8, max_frames=5)
    assert square.shape == (5, 32, 32, 3)
    green = np.array([0, 255, 0])
    for column in (0, 16, 31):
        assert np.abs(square[2, 16, column].astype(int) - green).max() < 40, f"column {column} is not green"


@pytest.mark.parametrize(
    ("suffix", "encoder"), [("webm", "libvpx-vp9"), ("mov", "libx264"), ("avi", "mjpeg")]
)
def test_other_containers(tmp_path: Path, suffix: str, encoder: str) -> None:
    if not has_encoder(encoder):
        pytest.skip(f"this ffmpeg build has no {encoder} encoder")
    clip = lavfi_clip(tmp_path / f"clip.{suffix}", "color=c=0x00ff00:s=64x48:r=10:d=1", "-c:v", encoder)
    info = probe_video(clip)
    assert (info.width, info.height) == (64, 48)
    frames = read_video(clip, height=32, width=32, fps=10, max_frames=81)
    assert frames.shape == (9, 32, 32, 3)
    assert frames[..., 1].mean() > 200 and frames[..., 0].mean() < 40


def test_first_frame_jpeg_is_a_scaled_jpeg(square_clip: Path) -> None:
    jpeg = first_frame_jpeg(square_clip, max_side=48)
    assert jpeg.startswith(b"\xff\xd8") and jpeg.endswith(b"\xff\xd9")
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    height, width = int.from_bytes(jpeg[sof + 5 : sof + 7]), int.from_bytes(jpeg[sof + 7 : sof + 9])
    assert (width, height) == (48, 32)
    with pytest.raises(InvalidParameterError, match="max_side"):
        first_frame_jpeg(square_clip, max_side=0)


def encode_image(frame: np.ndarray, codec: str) -> bytes:
    """One ``(H, W, 3)`` frame as an image file's bytes (``png`` or ``mjpeg``), by the real ffmpeg."""
    height, width, _ = frame.shape
    decode = ("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-i", "pipe:0")
    encode = ("-frames:v", "1", "-c:v", codec, "-f", "image2pipe", "pipe:1")
    return subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", *decode, *encode],
        input=frame.tobytes(),
        capture_output=True,
        check=True,
    ).stdout


@pytest.mark.parametrize("codec", ["png", "mjpeg"])
def test_images_become_an_mp4_fitted_as_a_video_is(tmp_path: Path, codec: str) -> None:
    frames = moving_square(count=9)  # 96x64
    images = [encode_image(frame, codec) for frame in frames]
    clip = images_to_mp4(images, tmp_path / "frames.mp4", height=32, width=32, fps=8)
    from_images = read_video(clip, height=32, width=32, fps=8, max_frames=9)
    from_video = read_video(
        write_mp4(frames, tmp_path / "video.mp4", fps=8), height=32, width=32, fps=8, max_frames=9
    )
    assert from_images.shape == (9, 32, 32, 3)
    assert psnr(from_images, from_video) > 30


def test_images_at_another_rate_are_resampled_by_the_reader(tmp_path: Path) -> None:
    images = [encode_image(frame, "png") for frame in moving_square(count=5)]
    clip = images_to_mp4(images, tmp_path / "slow.mp4", height=32, width=32, fps=Fraction(40, 17))
    assert read_video(clip, height=32, width=32, fps=8, max_frames=17).shape[0] == 17  # 5 frames over 2.125 s


def test_images_to_mp4_refuses_what_is_not_one_kind_of_decodable_image(tmp_path: Path) -> None:
    frames = moving_square(count=2)
    png, jpeg = encode_image(frames[0], "png"), encode_image(frames[1], "mjpeg")
    target = tmp_path / "out.mp4"
    with pytest.raises(InvalidVideoError, match="image 1 is neither PNG nor JPEG"):
        images_to_mp4([png, b"GIF89a..."], target, height=32, width=32, fps=8)
    with pytest.raises(InvalidVideoError, match="mix PNG and JPEG"):
        images_to_mp4([png, jpeg], target, height=32, width=32, fps=8)
    with pytest.raises(InvalidVideoError, match="could not be decoded"):
        images_to_mp4([png, png[: len(png) // 2]], target, height=32, width=32, fps=8)
    with pytest.raises(InvalidVideoError, match="could not be decoded"):
        images_to_mp4([png], target, height=32, width=32, fps=8, limits=VideoLimits(max_pixels=96 * 64 - 1))
    with pytest.raises(InvalidVideoError, match="no images"):
        images_to_mp4([], target, height=32, width=32, fps=8)
    with pytest.raises(InvalidParameterError, match="height"):
        images_to_mp4([png], target, height=30, width=32, fps=8)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


# ----------------------------------------------------------------------------- parameter validation


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"height": 30}, "height"),
        ({"width": 0}, "width"),
        ({"max_frames": 80}, "max_frames"),
        ({"max_frames": 0}, "max_frames"),
        ({"fps": 0}, "fps"),
        ({"fps": float("nan")}, "fps"),
    ],
)
def test_read_video_rejects_bad_parameters(square_clip: Path, kwargs: dict, param: str) -> None:
    args = {"height": 32, "width": 32, "fps": 8, "max_frames": 9} | kwargs
    with pytest.raises(InvalidParameterError) as caught:
        read_video(square_clip, **args)
    assert caught.value.param == param
    assert param in str(caught.value) and "must be" in str(caught.value)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((3, 32, 32, 3), dtype=np.float32),
        np.zeros((32, 32, 3), dtype=np.uint8),
        np.zeros((3, 32, 32, 4), dtype=np.uint8),
        np.zeros((3, 31, 32, 3), dtype=np.uint8),
        np.zeros((0, 32, 32, 3), dtype=np.uint8),
        [[0]],
    ],
)
def test_write_mp4_rejects_bad_frames(tmp_path: Path, frames: object) -> None:
    with pytest.raises(InvalidParameterError, match=r"it must be|it needs"):
        write_mp4(frames, tmp_path / "out.mp4", fps=8)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad inputs


def test_rejects_empty_random_and_pdf_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
    pdf = tmp_path / "paper.mp4"
    pdf.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" * 50 + b"%%EOF\n")
    for bad in (empty, noise, pdf, tmp_path / "missing.mp4"):
        with pytest.raises(InvalidVideoError) as caught:
            probe_video(bad)
        assert not isinstance(caught.value, VideoTooLargeError)
        with pytest.raises(InvalidVideoError):
            read_video(bad, height=32, width=32, fps=8, max_frames=9)
    with pytest.raises(InvalidVideoError, match="empty"):
        probe_video(empty)


def test_rejects_truncated_mp4(tmp_path: Path, square_clip: Path) -> None:
    data = square_clip.read_bytes()  # faststart: the index comes first, the frames are cut off
    cut_frames = tmp_path / "cut_frames.mp4"
    cut_frames.write_bytes(data[: data.find(b"mdat") + 64])
    plain = lavfi_clip(tmp_path / "plain.mp4", "testsrc2=s=64x48:r=10:d=1")  # index at the end
    cut_index = tmp_path / "cut_index.mp4"
    cut_index.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
    for bad in (cut_frames, cut_index):
        with pytest.raises(InvalidVideoError, match=r"truncated|not a readable video"):
            probe_video(bad)


def test_rejects_audio_only(tmp_path: Path) -> None:
    audio = lavfi_clip(tmp_path / "audio.mp4", "sine=frequency=440:duration=1", "-c:a", "aac")
    with pytest.raises(InvalidVideoError, match="no video stream"):
        probe_video(audio)


def test_rejects_hls_playlist_and_concat_script_pointing_at_local_files(tmp_path: Path) -> None:
    segment = lavfi_clip(tmp_path / "segment.mp4", "testsrc2=s=64x48:r=10:d=1")
    playlist = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n"
    hls = tmp_path / "upload.m3u8"
    hls.write_text(playlist.format(segment))
    # Sanity check that the playlist is real: a plain ffmpeg opens it and follows it to the segment.
    log = subprocess.run([FFMPEG, "-hide_banner", "-i", str(hls)], capture_output=True, text=True).stderr
    assert "Input #0, hls" in log
    disguised = tmp_path / "upload.mp4"
    disguised.write_text(playlist.format(segment))
    concat = tmp_path / "concat.mp4"
    concat.write_text(f"ffconcat version 1.0\nfile {segment}\n")
    for bad in (hls, disguised, concat):
        with pytest.raises(InvalidVideoError):
            probe_video(bad)
        with pytest.raises(InvalidVideoError):
            read_video(bad, height=32, width=32, fps=8, max_frames=9)
        with pytest.raises(InvalidVideoError):
            first_frame_jpeg(bad)
    with pytest.raises(InvalidVideoError, match="not on whitelist"):
        probe_video(hls)


def test_rejects_too_long_video_even_with_a_spoofed_duration_in_metadata(tmp_path: Path) -> None:
    spoof = "x\n  Duration: 00:00:01.00, start: 0.000000, bitrate: 1 kb/s"
    codec = ("-c:v", "libx264", "-preset", "ultrafast", "-metadata", f"title={spoof}")
    long_clip = lavfi_clip(tmp_path / "long.mp4", "color=c=black:s=32x32:r=1:d=120", *codec)
    with pytest.raises(VideoTooLargeError, match=r"120\.0 s long; at most 60 s"):
        probe_video(long_clip)
    with pytest.raises(VideoTooLargeError):
        read_video(long_clip, height=32, width=32, fps=1, max_frames=9)
    assert probe_video(long_clip, VideoLimits(max_seconds=300)).duration_seconds == pytest.approx(120)


def test_rejects_too_large_resolution_from_the_header(tmp_path: Path) -> None:
    big = lavfi_clip(tmp_path / "big.mp4", "color=c=black:s=4352x2448:r=25:d=0.04")
    with pytest.raises(VideoTooLargeError, match="4352x2448; at most"):
        probe_video(big)
    with pytest.raises(VideoTooLargeError):
        first_frame_jpeg(big)
    assert probe_video(big, VideoLimits(max_pixels=4352 * 2448, max_side=4352)).width == 4352


def test_custom_limits(square_clip: Path) -> None:
    for limits, message in [
        (VideoLimits(max_bytes=100), "bytes"),
        (VideoLimits(max_pixels=96 * 64 - 1), "pixels"),
        (VideoLimits(max_side=95), "pixels per side"),
        (VideoLimits(max_frames=10), "frames"),
        (VideoLimits(max_seconds=1), "s long"),
    ]:
        with pytest.raises(VideoTooLargeError, match=message):
            probe_video(square_clip, limits)


# ----------------------------------------------------------------------------- storage failures


def test_write_failure_into_missing_directory_is_storage_error(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.mp4"
    with pytest.raises(VideoWriteError, match=re.escape(str(target))):
        write_mp4(moving_square(5), target, fps=8)
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "out.mp4").mkdir()  # os.replace of a file onto a directory fails after encoding
    with pytest.raises(VideoWriteError, match=r"out\.mp4"):
        write_mp4(moving_square(5), tmp_path / "out.mp4", fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_write_into_read_only_directory_is_storage_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(VideoWriteError, match=r"out\.mp4"):
            write_mp4(moving_square(5), tmp_path / "out.mp4", fps=8)
        assert list(tmp_path.iterdir()) == []
    finally:
        tmp_path.chmod(0o755)


def test_write_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    assert write_mp4(moving_square(5), target, fps=8) == target
    assert probe_video(target).width == 96
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
