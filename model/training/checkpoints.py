"""Training checkpoints in our folder format, and the final model.

A checkpoint ``<out>/checkpoints/step-000100/`` holds

* ``model/``: a pipeline folder (:meth:`UniViGUPipeline.save_pretrained`: ``univigu.json``,
  ``transformer/`` safetensors, the frozen VAE and text side or a reference to the Wan folder), which
  a worker loads as it is;
* ``optimizer.safetensors``: the AdamW moments and step counts, keyed ``<parameter>/<name>``;
* ``trainer_state.json``: the step, the data-stream position, the stage, the config and the
  optimizer's parameter groups;
* ``ema.safetensors``, when the run averages its weights (``ema_decay > 0``): the moving average of
  the trainable parameters. ``model/`` holds the raw weights, which a resumed run continues from.

Folders are written under a temporary name and renamed, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import build_transformer
from model.errors import CheckpointError
from model.network import UniViGUTransformer
from model.pipeline import UniViGUPipeline
from model.training.ema import save_ema

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
STEP_PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    """Where a run stands after ``step`` optimizer steps."""

    step: int
    data_position: int  # stream positions consumed (the data-loader state)
    stage: str
    config: dict[str, Any]
    param_groups: list[dict[str, Any]]


@contextmanager
def _exporting(pipe: UniViGUPipeline, transformer: UniViGUTransformer):
    """Let ``pipe`` save ``transformer`` (an unsharded copy) in place of the one it trains."""
    training = pipe.transformer
    pipe.transformer = transformer
    try:
        yield pipe
    finally:
        pipe.transformer = training


def export_pipeline(pipe: UniViGUPipeline, full_state: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write a pipeline folder whose transformer holds ``full_state``; the other parts are ``pipe``'s."""
    transformer = build_transformer(pipe.transformer.config, full_state, "training state")
    with _exporting(pipe, transformer):
        pipe.save_pretrained(folder)
    return folder


def save_checkpoint(
    out: Path,
    pipe: UniViGUPipeline,
    full_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: TrainerState,
    keep: int,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``<out>/checkpoints/step-NNNNNN`` atomically and delete all but the newest ``keep``."""
    root = out / "checkpoints"
    final = root / f"{STEP_PREFIX}{state.step:06d}"
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    export_pipeline(pipe, full_state, partial / MODEL_DIR)
    tensors = {
        f"{name}/{key}": value.detach().cpu().contiguous()
        for name, entries in optimizer_state["state"].items()
        for key, value in entries.items()
    }
    save_file(tensors, partial / OPTIMIZER_FILE)
    if ema_state is not None:
        save_ema(ema_state, partial)
    (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file())


def read_trainer_state(folder: Path) -> TrainerState:
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError("trainer state not found", file=str(path))
    return TrainerState(**json.loads(path.read_text()))


def read_optimizer_state(folder: Path, state: TrainerState) -> dict[str, Any]:
    """The optimizer state dict saved with ``folder``, keyed by parameter name."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(folder / OPTIMIZER_FILE).items():
        name, entry = key.rsplit("/", 1)
        nested.setdefault(name, {})[entry] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state.param_groups]
    return {"state": nested, "param_groups": groups}
