"""Training data: the JSONL manifest, its validation, and the on-disk latent cache.

A manifest row is ``{"video": path, "prompt": str, "caption": str}`` (``caption`` is needed by
``refine`` only); relative video paths are relative to the manifest's folder. Every row is checked
once at start: JSON, fields, token limits, then the video, which is decoded and fitted to the model
size exactly as serving fits a captioning input (:func:`model.media.read_video`), must give the
model's full frame count, and is encoded by the frozen VAE. Bad rows are skipped and reported with
a reason each; text is never truncated. A manifest without usable rows is a :class:`ManifestError`.

The cache stores the VAE posterior (mean and log-variance, ``(C, f, h, w)`` float32) of every video
in one safetensors file named by a hash of the video file (path, size, mtime), the fitted geometry
and the VAE weights, so it is reused across epochs and runs and never reused for a different VAE.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from model.errors import InvalidVideoError, ManifestError
from model.media import read_video
from model.pixels import frames_to_pixels
from model.training.config import DataConfig, Stage

TokenCounter = Callable[[str], int]
ENCODE_BATCH_PIXELS = 1 << 21
"""The latent cache encodes at most this many pixels (frames x height x width) per VAE call."""


@dataclass(frozen=True)
class ManifestRow:
    line: int
    video: Path
    prompt: str
    caption: str | None


@dataclass(frozen=True)
class Rejection:
    line: int
    reason: str


@dataclass(frozen=True)
class VideoGeometry:
    """The size every training video is fitted to (the model's sampling defaults)."""

    height: int
    width: int
    num_frames: int
    fps: int


@dataclass(frozen=True)
class TrainingExample:
    """One usable row: its cached latent posterior, its prompt and its text target."""

    latent: Path
    prompt: str
    target: str  # the prompt in recall, the detailed caption in refine


@dataclass(frozen=True)
class PreparedData:
    examples: list[TrainingExample]
    rejections: list[Rejection]

    def report(self, manifest: Path) -> str:
        """One line per skipped row, after a count."""
        total = len(self.examples) + len(self.rejections)
        lines = [f"{manifest}: {len(self.rejections)} of {total} rows skipped"]
        lines += [f"  line {r.line}: {r.reason}" for r in self.rejections]
        return "\n".join(lines)


def read_manifest(path: Path) -> tuple[list[ManifestRow], list[Rejection]]:
    """Parse the JSONL manifest: well-formed rows, and the rejected ones with a reason each."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found", param="data")
    rows: list[ManifestRow] = []
    rejections: list[Rejection] = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rejections.append(Rejection(line_number, f"not valid JSON ({exc.msg})"))
            continue
        problem = _field_problem(record)
        if problem:
            rejections.append(Rejection(line_number, problem))
            continue
        video = Path(record["video"])
        video = video if video.is_absolute() else path.parent / video
        rows.append(ManifestRow(line_number, video, record["prompt"], record.get("caption")))
    return rows, rejections


def _field_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "a row must be a JSON object"
    for name in ("video", "prompt"):
        if not isinstance(record.get(name), str):
            return f"{name!r} is missing or not a string"
    if record.get("caption") is not None and not isinstance(record["caption"], str):
        return "'caption' is not a string"
    return None


def text_problem(row: ManifestRow, stage: Stage, count: TokenCounter, limits: DataConfig) -> str | None:
    """Why the row's text breaks the stage's token limits, or None."""
    prompt_tokens = count(row.prompt)
    if not limits.min_prompt_tokens <= prompt_tokens <= limits.max_prompt_tokens:
        return (
            f"prompt is {prompt_tokens} tokens; {limits.min_prompt_tokens}-{limits.max_prompt_tokens} allowed"
        )
    if stage == "refine":
        if row.caption is None:
            return "refine needs a 'caption'"
        caption_tokens = count(row.caption)
        if not limits.min_caption_tokens <= caption_tokens <= limits.max_caption_tokens:
            return (
                f"caption is {caption_tokens} tokens; "
                f"{limits.min_caption_tokens}-{limits.max_caption_tokens} allowed"
            )
    return None


class LatentCache:
    """VAE posteriors of fitted videos, one safetensors file per video and geometry and VAE."""

    def __init__(self, folder: Path, vae: AutoencoderKLWan, geometry: VideoGeometry) -> None:
        self.folder = folder
        self.vae = vae
        self.geometry = geometry
        digest = hashlib.sha256(repr(geometry).encode())
        for name, tensor in sorted(vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    def path_for(self, video: Path) -> Path:
        stat = video.stat()
        key = f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.fingerprint}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def ensure_all(self, videos: Sequence[Path]) -> list[Path | InvalidVideoError]:
        """The cache file of each of ``videos``, or the :class:`InvalidVideoError` that makes it unusable.

        Missing latents are encoded in batches of up to :data:`ENCODE_BATCH_PIXELS` pixels (frames x
        height x width), at least one video each: on 2 CPU cores a toy clip costs 105 ms this way against
        200 ms one video at a time, decoding included (``benchmarks/latent_cache.py``), and the bound
        keeps full-size videos to one per batch."""
        paths = [self.path_for(video) for video in videos]
        results: list[Path | InvalidVideoError] = list(paths)
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        g = self.geometry
        batch_size = max(1, ENCODE_BATCH_PIXELS // (g.num_frames * g.height * g.width))
        for start in range(0, len(missing), batch_size):
            readable: list[int] = []
            clips: list[np.ndarray] = []
            for i in missing[start : start + batch_size]:
                try:
                    clips.append(self._read(videos[i]))
                    readable.append(i)
                except InvalidVideoError as exc:
                    results[i] = exc
            if clips:
                self._store([paths[i] for i in readable], np.stack(clips))
        return results

    def _read(self, video: Path) -> np.ndarray:
        """``video`` fitted to the geometry: uint8 ``(T, H, W, 3)``. Raises InvalidVideoError."""
        g = self.geometry
        frames = read_video(video, height=g.height, width=g.width, fps=g.fps, max_frames=g.num_frames)
        if frames.shape[0] != g.num_frames:
            raise InvalidVideoError(
                f"video gives {frames.shape[0]} frames at {g.fps} fps; training needs {g.num_frames}"
            )
        return frames

    def _store(self, targets: list[Path], clips: np.ndarray) -> None:
        """Encode uint8 ``clips (B, T, H, W, 3)`` and write the i-th posterior to ``targets[i]`` atomically."""
        device = next(self.vae.parameters()).device
        with torch.no_grad():
            posterior = self.vae.encode(frames_to_pixels(clips, device)).latent_dist  # (B, C, f, h, w)
        self.folder.mkdir(parents=True, exist_ok=True)
        for target, mean, logvar in zip(targets, posterior.mean, posterior.logvar, strict=True):
            tensors = {"mean": mean.float().cpu().contiguous(), "logvar": logvar.float().cpu().contiguous()}
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            save_file(tensors, partial)
            os.replace(partial, target)


def load_posterior(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, logvar)``, each ``(C, f, h, w)`` float32."""
    tensors = load_file(path)
    return tensors["mean"], tensors["logvar"]


def prepare_dataset(
    manifest: Path,
    stage: Stage,
    count: TokenCounter,
    cache: LatentCache,
    limits: DataConfig,
) -> PreparedData:
    """Validate every row and make sure its latent is cached; report what was skipped and why."""
    rows, rejections = read_manifest(manifest)
    usable: list[ManifestRow] = []
    for row in rows:
        problem = text_problem(row, stage, count, limits)
        if problem is None and not row.video.is_file():
            problem = f"video file not found: {row.video}"
        if problem is None:
            usable.append(row)
        else:
            rejections.append(Rejection(row.line, problem))
    examples: list[TrainingExample] = []
    for row, latent in zip(usable, cache.ensure_all([row.video for row in usable]), strict=True):
        if isinstance(latent, InvalidVideoError):
            rejections.append(Rejection(row.line, f"unusable video {row.video}: {latent}"))
            continue
        target = row.prompt if stage == "recall" else row.caption
        examples.append(TrainingExample(latent, row.prompt, target))
    rejections.sort(key=lambda r: r.line)
    prepared = PreparedData(examples, rejections)
    if not examples:
        raise ManifestError(f"no usable rows for stage {stage!r}. {prepared.report(manifest)}", param="data")
    return prepared
