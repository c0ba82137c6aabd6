"""``univigu train``: the training loop of the Knowledge Recall and Capability Refinement stages.

Numbered steps: (1) processes and devices, (2) the starting pipeline (a preset, a Wan2.1 folder,
one of our pipeline folders, or the latest checkpoint when resuming), (3) the data (validated
manifest and latent cache), (4) the trainable set, sharding and AdamW, (5) the loop: warm-up then
cosine learning rate, gradient accumulation, bfloat16 autocast on CUDA, clipping, a JSONL log, a
progress bar and optional TensorBoard, an optional moving average of the weights (``ema_decay``),
checkpoints every ``checkpoint_every`` steps, and (6) the final pipeline folder ``<out>/final`` that a
worker serves without conversion: the averaged weights when ``ema_decay > 0``, else the last ones.

The VAE and the umT5 encoder are frozen. A resumed run reproduces the uninterrupted one: the model,
the AdamW state, the weight average and the data position come from the checkpoint, the learning
rate and the average's decay are functions of the step, and every random draw is a function of the seed
and the example's stream position.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import PRESETS
from model.errors import CheckpointError, InvalidParameterError
from model.network import UniViGUTransformer
from model.pipeline import PIPELINE_FILE, UniViGUPipeline
from model.training import distributed
from model.training.batch import TrainBatch, build_batch
from model.training.checkpoints import (
    MODEL_DIR,
    TrainerState,
    export_pipeline,
    list_checkpoints,
    read_optimizer_state,
    read_trainer_state,
    save_checkpoint,
)
from model.training.config import OptimConfig, Stage, TrainConfig
from model.training.data import LatentCache, PreparedData, VideoGeometry, prepare_dataset
from model.training.distributed import DistContext
from model.training.ema import WeightEMA, read_ema
from model.training.objective import LossTerms, flow_matching_losses
from model.training.stream import ExampleStream, micro_batch_positions

logger = logging.getLogger(__name__)

TEXT_BRANCH = ("vocab_embed.", "time_embedding_t.", "scale_shift_table_t", "text_head.")
LOG_FILE = "log.jsonl"
FINAL_DIR = "final"


@dataclass(frozen=True)
class TrainRequest:
    """One invocation of ``univigu train``."""

    stage: Stage
    manifest: Path
    init: str  # a preset name, a Wan2.1 folder or one of our pipeline folders
    out: Path
    config: TrainConfig
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this step, to split a run
    device: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer steps done in total
    losses: list[float]  # the total loss of each step run by this invocation
    final: Path | None  # the final pipeline folder, when the run reached its last step


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at the end."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)


def load_initial_pipeline(init: str, seed: int, device: torch.device) -> UniViGUPipeline:
    """The starting model: our pipeline folder, a Wan2.1 folder (fresh text branch) or a preset."""
    folder = Path(init)
    if (folder / PIPELINE_FILE).is_file():
        return UniViGUPipeline.from_pretrained(folder, device=device, dtype=torch.float32)
    if (folder / "transformer" / "config.json").is_file():
        return UniViGUPipeline.from_wan(folder, device=device, dtype=torch.float32, seed=seed)
    if init in PRESETS:
        return UniViGUPipeline.from_preset(init, device=device, dtype=torch.float32, seed=seed)
    raise InvalidParameterError(
        f"--init {init!r} is neither a Uni-ViGU folder ({PIPELINE_FILE}), a Wan2.1 folder "
        f"(transformer/config.json) nor a preset ({sorted(PRESETS)})",
        param="init",
    )


def select_trainable(model: UniViGUTransformer, trainable: str) -> list[str]:
    """Set ``requires_grad`` for ``"all"`` or only the text branch; returns the trainable names."""
    names = []
    for name, parameter in model.named_parameters():
        wanted = trainable == "all" or name.startswith(TEXT_BRANCH) or ".ffn_t." in name
        parameter.requires_grad_(wanted)
        if wanted:
            names.append(name)
    return names


def _geometry(pipe: UniViGUPipeline) -> VideoGeometry:
    d = pipe.defaults
    return VideoGeometry(d.height, d.width, d.num_frames, d.fps)


def _prepare_data(request: TrainRequest, pipe: UniViGUPipeline, context: DistContext) -> PreparedData:
    """Validate the manifest and fill the cache on the main process first, then on the others."""
    cache_dir = request.config.data.cache_dir or request.manifest.parent / ".latent_cache"
    cache = LatentCache(Path(cache_dir), pipe.vae, _geometry(pipe))
    prepared = None
    for turn in (True, False):
        if context.is_main == turn:
            prepared = prepare_dataset(
                request.manifest, request.stage, pipe.text.token_count, cache, request.config.data
            )
        distributed.barrier(context)
    if context.is_main and prepared.rejections:
        logger.warning(prepared.report(request.manifest))
    return prepared


def _resume_point(request: TrainRequest) -> Path | None:
    """The latest checkpoint to continue from (checked against this run), or None."""
    checkpoints = list_checkpoints(request.out)
    if not request.resume:
        if checkpoints:
            raise InvalidParameterError(
                f"{request.out} already holds checkpoints; pass --resume to continue or use a new --out",
                param="out",
            )
        return None
    if not checkpoints:
        raise CheckpointError("--resume found no checkpoint", file=str(request.out / "checkpoints"))
    latest = checkpoints[-1]
    state = read_trainer_state(latest)
    if state.stage != request.stage or state.config != json.loads(json.dumps(request.config.to_dict())):
        raise InvalidParameterError(
            f"{latest} was written by a run with another stage or config; resume with the same ones",
            param="config",
        )
    return latest


class _Log:
    """The JSONL log (and TensorBoard) of the main process; a resumed run drops rows after its step."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / LOG_FILE
        self.writer = None
        if not enabled:
            return
        rows = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = [row for row in rows if json.loads(row)["step"] <= start_step]
        self.path.write_text("".join(row + "\n" for row in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise InvalidParameterError(
                    "tensorboard = true needs the tensorboard package (pip install tensorboard)",
                    param="tensorboard",
                ) from exc
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(request: TrainRequest) -> TrainResult:
    """Run (or continue) one stage; see the module docstring."""
    config = request.config
    # 1. Processes and devices.
    context = distributed.init_distributed(request.device)
    try:
        config.micro_batch_size(context.world_size)  # refuses a batch that does not split
        # 2. The starting model.
        resume_from = _resume_point(request)
        init = str(resume_from / MODEL_DIR) if resume_from else request.init
        pipe = load_initial_pipeline(init, config.seed, context.device)
        # 3. Data.
        data = _prepare_data(request, pipe, context)
        stream = ExampleStream(len(data.examples), config.seed)
        # 4. Trainable set, sharding, optimizer.
        model = pipe.transformer.train()
        trainable = select_trainable(model, config.trainable)
        model.gradient_checkpointing = config.gradient_checkpointing
        distributed.shard(model, context)
        parameters = [p for p in model.parameters() if p.requires_grad]
        o = config.optim
        optimizer = torch.optim.AdamW(parameters, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None
        start = 0
        if resume_from is not None:
            state = read_trainer_state(resume_from)
            distributed.load_optimizer_state(model, optimizer, read_optimizer_state(resume_from, state))
            if ema is not None:
                ema.load_full_state(read_ema(resume_from))
            start = state.step
        if context.is_main:
            request.out.mkdir(parents=True, exist_ok=True)
            (request.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            logger.info(
                "stage %s: %d examples, %d trainable tensors, steps %d-%d",
                request.stage,
                len(data.examples),
                len(trainable),
                start,
                config.steps,
            )
        # 5. The loop.
        log = _Log(request.out, start, config.tensorboard, context.is_main)
        losses = []
        servable = None  # what final/ would hold, as the newest checkpoint gathered it
        last = min(config.steps, request.stop_after or config.steps)
        bar = tqdm(
            total=config.steps,
            initial=start,
            desc=f"train {request.stage}",
            unit="step",
            disable=not (request.progress and context.is_main),
        )
        for step in range(start, last):
            lr = learning_rate(step, o, config.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = torch.zeros(3, device=context.device)  # total, video, text
            for positions in _micro_batches(step, config, context):
                batch = build_batch(
                    [data.examples[stream.index(p)] for p in positions],
                    positions,
                    seed=config.seed,
                    stage=request.stage,
                    text=pipe.text,
                    objective=config.objective,
                    text_tokens=config.data.text_tokens(request.stage),
                    vocab_size=model.config.vocab_size,
                    device=context.device,
                )
                loss_terms = _losses(model, batch, context.device, config.bf16)
                total_loss = loss_terms.total(config.objective)
                (total_loss / config.grad_accum).backward()
                terms += (
                    torch.stack([total_loss, loss_terms.video, loss_terms.text]).detach() / config.grad_accum
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, o.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(step)
            total, video, text = distributed.mean_over_processes(terms, context).tolist()
            losses.append(total)
            done = step + 1
            if done % config.log_every == 0 or done == last:
                log.write(
                    {
                        "step": done,
                        "loss": total,
                        "video_loss": video,
                        "text_loss": text,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "epoch": stream.epoch_of(done * config.global_batch_size),
                    }
                )
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
            if done % config.checkpoint_every == 0 or done == last:
                servable = _checkpoint(request, pipe, model, optimizer, ema, done, context)
        bar.close()
        log.close()
        # 6. The final model.
        final = None
        if last == config.steps:
            if servable is None:  # resumed at the last step: no step ran, so nothing was gathered
                average = None if ema is None else ema.full_state()
                servable = _servable(distributed.full_model_state(model), average)
            final = request.out / FINAL_DIR
            if context.is_main:
                export_pipeline(pipe, servable, final)
            distributed.barrier(context)
        return TrainResult(step=last, losses=losses, final=final)
    finally:
        distributed.shutdown(context)


def _micro_batches(step: int, config: TrainConfig, context: DistContext) -> Iterator[list[int]]:
    for micro in range(config.grad_accum):
        yield micro_batch_positions(
            step,
            micro,
            global_batch=config.global_batch_size,
            grad_accum=config.grad_accum,
            rank=context.rank,
            world_size=context.world_size,
        )


def _losses(model: UniViGUTransformer, batch: TrainBatch, device: torch.device, bf16: bool) -> LossTerms:
    """One forward pass (bfloat16 autocast on CUDA when ``bf16``) and its loss terms."""
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and bf16 else nullcontext()
    )
    with autocast:
        velocity, logits = model(
            batch.x_v, batch.x_t, batch.time_v, batch.time_t, batch.cond, batch.text_mask
        )
    return flow_matching_losses(
        velocity, logits, batch.video_target, batch.text_target, batch.video_on, batch.text_on
    )


def _checkpoint(
    request: TrainRequest,
    pipe: UniViGUPipeline,
    model: UniViGUTransformer,
    optimizer: torch.optim.Optimizer,
    ema: WeightEMA | None,
    step: int,
    context: DistContext,
) -> dict[str, torch.Tensor]:
    """Gather the full states on every process (collective), write them from the main one; returns
    the weights ``final/`` would hold at this step (:func:`_servable`), so the last step's export
    gathers nothing twice."""
    full_state = distributed.full_model_state(model)
    optimizer_state = distributed.full_optimizer_state(model, optimizer)
    ema_state = None if ema is None else ema.full_state()
    if context.is_main:
        state = TrainerState(
            step=step,
            data_position=step * request.config.global_batch_size,
            stage=request.stage,
            config=request.config.to_dict(),
            param_groups=optimizer_state["param_groups"],
        )
        save_checkpoint(
            request.out, pipe, full_state, optimizer_state, state, request.config.keep_checkpoints, ema_state
        )
    distributed.barrier(context)
    return _servable(full_state, ema_state)


def _servable(
    full_state: dict[str, torch.Tensor], average: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The weights ``final/`` holds: the average of the trainable ones where the run keeps one."""
    return full_state if average is None else {**full_state, **average}
