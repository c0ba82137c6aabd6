"""``univigu toyworld train``: the whole toy recipe in one command.

Steps, each skipped when its output already exists (so an interrupted recipe continues):

1. ``data/``: ``train_clips`` rendered clips of the training pairs and their manifest;
2. ``vae/``: the toy preset's tiny Wan VAE trained to reconstruct them (``model/toyworld/vae.py``);
3. ``init/``: a pipeline folder of the toy preset carrying that VAE (random transformer);
4. ``recall/``: ``univigu train --stage recall`` from ``init/`` (resumed if it has checkpoints);
5. ``refine/``: ``univigu train --stage refine`` from ``recall/final``;
6. ``polish/``: ``univigu train --stage refine`` again from ``refine/final``, at half the peak rate;
7. the polished pipeline folder, optionally copied to ``ship`` (the repository ships ``model/assets/toy``).

The toy token limits: prompts are 6 tokens and captions 27, so prompts may have 0-8 tokens and
captions 24-32; the text stream is 8 tokens in recall and 32 in refine. Refine drops the prompt for
half of its noisy-text examples (the paper's refine always conditions on it) so that captioning
without a prompt, which the evaluation uses, produces the detailed caption.

The toy objective weighs text as much as video (``text_weight = 1``, against 0.2 by default) and
trains more captioning examples (recall 50% clean video and 20% clean text; refine 40% and 40%): the
text loss is a mean over every position of the stream, the three attribute words are a small share of
it, and at the default weights captioning starves. Both stages peak at a learning rate of 1e-3; the
``polish`` stage runs refine's objective again from refine's output, for 3000 steps at 5e-4, which is
where text-to-video's motion and shape improve. How these values were chosen, and what each probe
measured, is in docs/toyworld-history.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from model.errors import InvalidParameterError
from model.media import read_video
from model.pipeline import UniViGUPipeline
from model.toyworld.make import MANIFEST, make_dataset
from model.toyworld.vae import VAETrainConfig, refine_decoder, train_vae
from model.toyworld.world import FPS, FRAMES, SIDE
from model.training.config import DataConfig, ObjectiveConfig, OptimConfig, TrainConfig, config_from_dict
from model.training.trainer import FINAL_DIR, TrainRequest, train

logger = logging.getLogger(__name__)

PRESET = "toy"
TOY_DATA = DataConfig(max_prompt_tokens=8, min_caption_tokens=24, max_caption_tokens=32)


def _stage_config(
    steps: int, objective: ObjectiveConfig, *, lr: float = 1e-3, warmup_steps: int = 100
) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        global_batch_size=32,
        checkpoint_every=250,
        log_every=10,
        data=TOY_DATA,
        objective=objective,
        optim=OptimConfig(lr=lr, warmup_steps=warmup_steps, weight_decay=0.0),
    )


RECALL_OBJECTIVE = ObjectiveConfig(text_weight=1.0, clean_video_fraction=0.5, clean_text_fraction=0.2)
REFINE_OBJECTIVE = ObjectiveConfig(
    text_weight=1.0, clean_video_fraction=0.4, clean_text_fraction=0.4, refine_prompt_drop=0.5
)


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes of the toy recipe; the TOML file has the top-level fields and ``[vae]``, ``[recall]``,
    ``[refine]``, ``[polish]`` sections (the last three are :class:`TrainConfig` files)."""

    train_clips: int = 1200
    seed: int = 0
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    recall: TrainConfig = field(default_factory=lambda: _stage_config(1500, RECALL_OBJECTIVE))
    refine: TrainConfig = field(default_factory=lambda: _stage_config(2000, REFINE_OBJECTIVE))
    polish: TrainConfig = field(
        default_factory=lambda: _stage_config(3000, REFINE_OBJECTIVE, lr=5e-4, warmup_steps=50)
    )

    @classmethod
    def from_toml(cls, path: Path) -> RecipeConfig:
        """Values from ``path`` over the defaults; a stage section overrides single fields of it."""
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParameterError(f"cannot read recipe config {path}: {exc}", param="config") from exc
        defaults = cls()
        for name in ("vae", "recall", "refine", "polish"):
            default = getattr(defaults, name)
            values[name] = config_from_dict(type(default), _merge(asdict(default), values.get(name, {})))
        return config_from_dict(cls, values)


def _merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s values, section by section."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def _read_clips(manifest: Path) -> np.ndarray:
    """Every clip of the manifest decoded as serving decodes it: ``(N, 17, 64, 64, 3)`` uint8."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return np.stack(
        [
            read_video(manifest.parent / row["video"], height=SIDE, width=SIDE, fps=FPS, max_frames=FRAMES)
            for row in rows
        ]
    )


def run_recipe(config: RecipeConfig, out: Path, *, ship: Path | None = None) -> Path:
    """Run (or continue) the recipe in ``out``; returns the trained pipeline folder."""
    # 1. Data.
    manifest = out / "data" / MANIFEST
    if not manifest.is_file():
        make_dataset(config.train_clips, out / "data", seed=config.seed)
    # 2. The VAE.
    vae_dir = out / "vae"
    if not (vae_dir / "config.json").is_file():
        pipe = UniViGUPipeline.from_preset(PRESET, seed=config.seed)
        vae = pipe.vae
        losses = train_vae(vae, _read_clips(manifest), config.vae, _log_every(100, "vae"))
        logger.info("vae: loss %.4f -> %.4f", losses[0], losses[-1])
        vae.save_pretrained(vae_dir)
    # 3. The starting pipeline.
    init = out / "init"
    if not (init / "univigu.json").is_file():
        pipe = UniViGUPipeline.from_preset(PRESET, seed=config.seed)
        pipe.vae = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
        pipe.save_pretrained(init)
    # 4-6. The transformer stages: recall, refine, and refine again at a lower rate.
    start = init
    stages = (
        ("recall", "recall", config.recall),
        ("refine", "refine", config.refine),
        ("polish", "refine", config.polish),
    )
    for name, stage, stage_config in stages:
        run = out / name
        if not (run / FINAL_DIR / "univigu.json").is_file():
            resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
            train(TrainRequest(stage, manifest, str(start), run, stage_config, resume=resume))
        start = run / FINAL_DIR
    # 7. Ship.
    if ship is not None:
        shutil.rmtree(ship, ignore_errors=True)
        shutil.copytree(start, ship)
        return ship
    return start


def refine_model_decoder(model: Path, manifest: Path, config: VAETrainConfig) -> Path:
    """Phase 3 of the VAE stage alone (:func:`refine_decoder`) on the VAE of the trained pipeline folder
    ``model``, in place, on the clips of ``manifest``. The encoder, and so everything the transformer
    learned, stays as it was. Returns ``model``."""
    if not (model / "vae" / "config.json").is_file():
        raise InvalidParameterError(
            f"{model} has no vae/config.json; give a pipeline folder written by save_pretrained",
            param="model",
        )
    if config.decoder_steps < 1:
        raise InvalidParameterError("decoder_steps must be at least 1", param="decoder_steps")
    vae = AutoencoderKLWan.from_pretrained(model / "vae", torch_dtype=torch.float32)
    losses = refine_decoder(vae, _read_clips(manifest), config, on_step=_log_every(100, "decoder"))
    logger.info("decoder: loss %.4f -> %.4f", losses[0], losses[-1])
    vae.save_pretrained(model / "vae")
    return model


def _log_every(every: int, name: str):
    def log(step: int, loss: float) -> None:
        if step % every == 0:
            logger.info("%s step %d: loss %.4f", name, step, loss)

    return log
