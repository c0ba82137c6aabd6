"""Typed configuration of ``univigu train``, read from a TOML file; every default is documented here.

A config file holds the top-level :class:`TrainConfig` fields and the sections ``[data]``,
``[objective]`` and ``[optim]``; anything left out keeps its default, an unknown key is an error::

    steps = 2000
    global_batch_size = 32
    trainable = "all"

    [objective]
    text_weight = 0.2

    [optim]
    lr = 3e-4
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from model.errors import InvalidParameterError

Stage = Literal["recall", "refine"]
Trainable = Literal["all", "text"]
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass(frozen=True)
class DataConfig:
    """Manifest rules. Token counts include the closing ``</s>``; the spec's limits are the defaults.

    ``text_tokens(stage)`` is the text-stream length: the longest prompt in ``recall`` (the target is
    the prompt), the longest caption in ``refine``.
    """

    min_prompt_tokens: int = 0
    max_prompt_tokens: int = 128
    min_caption_tokens: int = 128  # refine only: a detailed caption must be long
    max_caption_tokens: int = 256
    cache_dir: str | None = None  # latent cache; default ``<manifest folder>/.latent_cache``

    def text_tokens(self, stage: Stage) -> int:
        return self.max_prompt_tokens if stage == "recall" else self.max_caption_tokens


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective (``model/training/objective.py``).

    Defaults and why:

    * ``clean_video_fraction = clean_text_fraction = 0.3``: every inference mode gets a sizeable share of
      the batch. Clean-video examples (video time 0, text noisy) train captioning; clean-text examples
      (the prompt held clean in the text stream, video noisy) train text-to-video; the remaining 0.4 have
      both streams noisy at independent times and train the joint mode.
    * ``text_weight = 0.2``: the text cross-entropy starts at ``ln V`` (12.5 for umT5) while the velocity
      MSE starts near 2; at 1.0 the text gradient dominates early training, although captioning is the
      half that learns fastest (toy-world pilot).
    * ``recall_prompt_drop = 0.5``: in ``recall`` the target text is the prompt itself, so while the prompt
      conditions the model the text can be copied; half of the noisy-text examples get the all-zero
      condition that captioning without a prompt uses, so the text must come from the video.
      ``refine_prompt_drop = 0``: the paper's refine is conditioned on the prompt.
    * ``uncond_prob = 0.1``: classifier-free-guidance dropout on clean-text (t2v) examples. The condition
      becomes the empty-prompt encoding and the text stream keeps the clean prompt, exactly the
      unconditional pass our inference runs (spec §5). The prompt still reaches the video through the
      joint self-attention, so guidance amplifies the cross-attention path only (see the module doc).
    * ``shift = 3``: training noise levels follow the inference schedule's shift.
    """

    video_weight: float = 1.0
    text_weight: float = 0.2
    clean_video_fraction: float = 0.3
    clean_text_fraction: float = 0.3
    recall_prompt_drop: float = 0.5
    refine_prompt_drop: float = 0.0
    uncond_prob: float = 0.1
    shift: float = 3.0

    def prompt_drop(self, stage: Stage) -> float:
        return self.recall_prompt_drop if stage == "recall" else self.refine_prompt_drop


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``; global-norm clipping."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``global_batch_size`` examples per optimizer step, split over
    ``grad_accum`` micro-batches and the processes of a ``torchrun`` launch."""

    steps: int = 1000
    global_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    trainable: Trainable = "all"  # "text": only the text branch (embedding, ffn_t, text time, text head)
    gradient_checkpointing: bool = False
    bf16: bool = True  # bfloat16 autocast on CUDA; the CPU always runs float32
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # older step folders are deleted
    log_every: int = 1
    tensorboard: bool = False  # needs the ``tensorboard`` package
    # > 0: keep an exponential moving average of the trainable weights (``model/training/ema.py``) and
    # write it to ``final/``; checkpoints keep the raw weights a resumed run continues from. 0: off.
    ema_decay: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", "must be at least 1")
        _check(self.grad_accum >= 1, "grad_accum", "must be at least 1")
        _check(
            self.global_batch_size >= 1 and self.global_batch_size % self.grad_accum == 0,
            "global_batch_size",
            f"must be a positive multiple of grad_accum ({self.grad_accum})",
        )
        _check(self.trainable in get_args(Trainable), "trainable", "must be 'all' or 'text'")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        _check(self.log_every >= 1, "log_every", "must be at least 1")
        _check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 turns the average off)")
        objective = self.objective
        fractions = objective.clean_video_fraction + objective.clean_text_fraction
        _check(
            min(objective.clean_video_fraction, objective.clean_text_fraction) >= 0 and fractions <= 1,
            "objective.clean_video_fraction",
            "the clean-video and clean-text fractions must be >= 0 and sum to at most 1",
        )
        for name in ("recall_prompt_drop", "refine_prompt_drop", "uncond_prob"):
            _check(0 <= getattr(objective, name) <= 1, f"objective.{name}", "must be in [0, 1]")
        data = self.data
        _check(
            0 <= data.min_prompt_tokens <= data.max_prompt_tokens,
            "data.max_prompt_tokens",
            "must be >= min_prompt_tokens >= 0",
        )
        _check(
            0 <= data.min_caption_tokens <= data.max_caption_tokens,
            "data.max_caption_tokens",
            "must be >= min_caption_tokens >= 0",
        )
        _check(
            data.max_prompt_tokens <= data.max_caption_tokens,
            "data.max_prompt_tokens",
            "must not exceed max_caption_tokens (refine holds the prompt in the caption-length stream)",
        )

    def micro_batch_size(self, world_size: int) -> int:
        """Examples per forward pass on one process."""
        per_micro = self.global_batch_size // self.grad_accum
        if per_micro % world_size:
            raise InvalidParameterError(
                f"global_batch_size / grad_accum = {per_micro} does not split over {world_size} processes",
                param="global_batch_size",
            )
        return per_micro // world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, values, "")

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParameterError(f"cannot read training config {path}: {exc}", param="config") from exc
        return cls.from_dict(values)


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise InvalidParameterError(f"training config: {name} {rule}", param=name)


def config_from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """A (nested) config dataclass from plain values; unknown keys are refused with the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidParameterError(
            f"unknown training config keys {[prefix + k for k in unknown]}; known: {sorted(fields)}",
            param="config",
        )
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if callable(fields[name].default_factory) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = config_from_dict(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
