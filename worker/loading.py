"""Which model a worker serves, and loading it once at start."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.config import VaeTiling
from model.errors import InvalidParameterError
from service.contract.schemas import ServedModel
from service.contract.settings import Settings

if TYPE_CHECKING:
    from model.pipeline import UniViGUPipeline
    from worker.group import GroupPipeline, WorkerGroup


WARMUP_PROMPT = "a red circle moving left"


class ModelSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """Exactly one source: a random-init preset, our saved folder, or Wan2.1 + a Uni-ViGU checkpoint."""

    device: str
    preset: str | None = None
    weights: Path | None = None
    wan: Path | None = None
    checkpoint: Path | None = None
    null_prompt: Path | None = None
    attention_backend: str | None = None
    video_sampler: str = "euler"
    compile: bool = False
    vae_tiling_min_pixels: int = VaeTiling.min_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        spec = cls(
            settings.device,
            settings.preset,
            settings.weights,
            settings.wan,
            settings.checkpoint,
            settings.null_prompt,
            settings.attention_backend,
            settings.video_sampler,
            settings.compile,
            settings.vae_tiling_min_pixels,
        )
        spec.check()
        return spec

    def check(self) -> None:
        sources = [name for name in ("preset", "weights", "wan") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ModelSpecError("give exactly one of --preset, --weights or --wan (with --checkpoint)")
        if (self.wan is None) != (self.checkpoint is None):
            raise ModelSpecError("--wan and --checkpoint go together")

    def describe(self) -> str:
        source = (
            f"preset {self.preset}"
            if self.preset
            else f"weights {self.weights}"
            if self.weights
            else f"wan {self.wan} + {self.checkpoint}"
        )
        return f"{source} on {self.device}" + (", blocks compiled" if self.compile else "")


def load_pipeline(spec: ModelSpec) -> UniViGUPipeline:
    from model.pipeline import UniViGUPipeline  # torch loads here, not at import

    return UniViGUPipeline.load(
        preset=spec.preset,
        weights=spec.weights,
        wan=spec.wan,
        checkpoint=spec.checkpoint,
        null_prompt=spec.null_prompt,
        device=spec.device,
        attention_backend=spec.attention_backend,
        video_sampler=spec.video_sampler,  # type: ignore[arg-type]  # checked by Settings
        compile=spec.compile,
        vae_tiling=VaeTiling(min_pixels=spec.vae_tiling_min_pixels),
    )


def warm_up(pipeline: UniViGUPipeline | GroupPipeline, steps: int) -> dict[str, float]:
    """Run each mode once at the model's default size with ``steps`` steps; seconds per mode.

    Compilation (with ``compile``), kernel selection and the allocator's growth then happen before the
    first request. A compiled graph is reused by requests of the same shapes: the default size, the
    default caption length, and (for ``generate``) a prompt of the warm-up prompt's token count.
    """
    d = pipeline.defaults
    blank = np.zeros((d.num_frames, d.height, d.width, 3), dtype=np.uint8)  # (T, H, W, 3)
    runs: dict[str, Callable[[], object]] = {
        "generate": lambda: pipeline.generate(WARMUP_PROMPT, steps=steps, seed=0),
        "joint": lambda: pipeline.joint(WARMUP_PROMPT, steps=steps, seed=0),
        "caption": lambda: pipeline.caption(blank, steps=steps, seed=0),
    }
    seconds = {}
    for mode, run in runs.items():
        started = time.monotonic()
        run()
        seconds[mode] = time.monotonic() - started
    return seconds


class LimitsExcludeDefaults(ValueError):
    """The request limits in the settings refuse a value the served model uses when a request leaves it
    out: every such request would fail, so the worker does not start."""


def cap_limits(pipeline: UniViGUPipeline, settings: Settings) -> None:
    """Narrow what the pipeline accepts to the operator's request limits, so that the limits the worker
    publishes are the ones its pipeline enforces. :class:`LimitsExcludeDefaults` if they refuse one of
    the model's defaults."""
    capped = {mode: settings.cap(limits) for mode, limits in pipeline.limits.items()}
    d = pipeline.defaults
    defaults = {
        "height": d.height,
        "width": d.width,
        "num_frames": d.num_frames,
        "fps": d.fps,
        "steps": d.steps,
        "guidance_scale": d.guidance_scale,
        "max_tokens": d.caption_tokens,
        "video_reuse": d.video_reuse,
    }
    for limits in capped.values():
        try:
            limits.check({name: value for name, value in defaults.items() if name in limits.rules})
        except InvalidParameterError as exc:
            name = str(exc.param)
            raise LimitsExcludeDefaults(
                f"the request limits leave out the served model's default {name} ({defaults[name]}): "
                f"{exc}; widen {' / '.join(settings.caps_of(name)) or 'them'} (docs/settings.md)"
            ) from exc
    pipeline.limits = capped


def served_tokenizer(pipeline: UniViGUPipeline) -> str | None:
    """The pipeline's ``tokenizer.json``, with which the gateway counts prompt tokens as the pipeline
    does (the ``tokenizers`` package, no torch); None for a tokenizer without one (a slow tokenizer)."""
    backend = getattr(pipeline.text.tokenizer, "backend_tokenizer", None)
    return None if backend is None else str(backend.to_str())


def describe_model(
    pipeline: UniViGUPipeline, group: WorkerGroup | None = None, tokenizer: str | None = None
) -> ServedModel:
    """What this worker (or the worker ``group`` it leads) serves, for the gateway's edge checks and
    ``GET /model``; ``tokenizer``: the published ``tokenizer.json`` (:func:`served_tokenizer`)."""
    return ServedModel(
        limits={mode: limits.to_json() for mode, limits in pipeline.limits.items()},
        tokenizer_sha256=None if tokenizer is None else hashlib.sha256(tokenizer.encode()).hexdigest(),
        devices=group.devices if group else [str(pipeline.device)],
        guidance_parallel=group.plan.guidance if group else 1,
        sequence_parallel=group.plan.sequence if group else 1,
        preset=pipeline.preset,
        weights_sha256=pipeline.weights_sha256,
        max_caption_tokens=pipeline.defaults.max_caption_tokens,
        defaults=dataclasses.asdict(pipeline.defaults),
        attention_backend=pipeline.transformer.attention_backend,
        compiled=pipeline.transformer.compiled,
    )
