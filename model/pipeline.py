"""The three inference modes of one Uni-ViGU network: ``generate`` (t2v), ``caption`` (v2t), ``joint``.

A pipeline owns the transformer, the Wan VAE and the text side, all loaded once. Each call reads as
numbered steps (check inputs, encode text, prepare the state, denoise, decode), takes a
``progress(step, total)`` callback and a ``should_cancel()`` check that stops it between steps, and
is deterministic for a given seed on a given device.

Conventions of the authors' inference (spec §5-§6): raw VAE latents (no mean/std normalisation),
guidance on video only with the null-prompt embedding as the unconditional condition and the text
stream unchanged, and an all-zero condition when a caption has no conditioning prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from model import limits
from model.checkpoint import (
    build_transformer,
    load_transformer_folder,
    read_safetensors,
    read_univigu_pth,
    read_wan_config,
    read_wan_weights,
    save_transformer,
    wan_to_univigu,
    weights_sha256,
)
from model.config import SamplingDefaults, UniViGUConfig, VaeTiling, get_preset
from model.errors import Canceled, CheckpointError, InvalidParameterError
from model.network import UniViGUTransformer
from model.pixels import frames_to_pixels, pixels_to_frames
from model.samplers import (
    VIDEO_SHIFT,
    MixturePathTextSampler,
    VideoSamplerName,
    classifier_free_guidance,
    joint_text_update,
    make_video_sampler,
    uniform_tokens,
)
from model.step_cache import FirstBlockCache
from model.text import TextSide, build_tiny_encoder, build_tiny_tokenizer, load_encoder, load_tokenizer
from model.video_reuse import VideoReuse

ProgressCallback = Callable[[int, int], None]
Denoiser = UniViGUTransformer | FirstBlockCache
"""What a denoising loop calls: the transformer itself or a step cache around it (same signature)."""
CancelCheck = Callable[[], bool]
TextUpdate = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""How joint mode moves the text after a step: ``(logits (1, L, V), step index, tokens (1, L)) -> tokens``."""

PIPELINE_FILE = "univigu.json"
NULL_PROMPT_FILE = "null_prompt.safetensors"
FORMAT_VERSION = 1
FP32_PARAMETERS = ("time_embedding_v.", "time_embedding_t.", "scale_shift_table")
"""Kept in float32 when the rest of the transformer runs in bfloat16 (as diffusers does for Wan)."""


Options = dict[str, Any]
"""Every option of a mode (:data:`model.limits.MODE_OPTIONS`) as a call ran it: the model's defaults
filled in, the seed actually used, None where an option is off (``step_cache``) or absent
(``negative_prompt``). Passed back to the same mode of the same model on the same device, they give the
same output."""


@dataclass(frozen=True)
class VideoResult:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: int
    seed: int
    options: Options
    skipped_steps: int = 0  # steps whose later blocks the step cache replaced


@dataclass(frozen=True)
class CaptionResult:
    text: str
    tokens: list[int]
    seed: int
    options: Options
    full_passes: int = 0  # steps that ran the whole network over video and text
    text_only_passes: int = 0  # steps that ran only the text over reused video keys and values


@dataclass(frozen=True)
class CaptionSettings:
    """Checked sampling settings of a caption, defaults filled in; captions run as one batch share them."""

    steps: int
    length: int  # caption tokens L
    video_reuse: int  # refresh interval of the video keys and values (1: exact)


@dataclass(frozen=True)
class PreparedCaption:
    """One caption ready for its denoising loop (:meth:`UniViGUPipeline.prepare_caption`)."""

    settings: CaptionSettings
    prompt: str | None  # the conditioning text, if any
    latent: torch.Tensor  # (1, C, f, h, w) clean video latent
    cond: torch.Tensor  # (1, Lc, text_dim)
    tokens: torch.Tensor  # (1, L) the uniform source
    seed: int
    generator: torch.Generator  # this caption's random stream, after the latent and the source
    progress: ProgressCallback | None = None
    should_cancel: CancelCheck | None = None

    @property
    def options(self) -> Options:
        """The caption's options as it runs (see :data:`Options`)."""
        settings = self.settings
        return {
            "prompt": self.prompt,
            "steps": settings.steps,
            "max_tokens": settings.length,
            "seed": self.seed,
            "video_reuse": settings.video_reuse,
        }

    @property
    def batch_key(self) -> tuple[CaptionSettings, tuple[int, ...]]:
        """Captions with equal keys can be denoised as one batch: the same settings and latent size."""
        return self.settings, tuple(self.latent.shape)


@dataclass(frozen=True)
class JointResult:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: int
    text: str
    tokens: list[int]
    seed: int
    options: Options
    skipped_steps: int = 0  # steps whose later blocks the step cache replaced


@dataclass(frozen=True)
class VideoRequest:
    """Checked video options of one call, defaults filled in."""

    height: int
    width: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    step_cache: float | None = None  # first-block cache threshold; None: off

    def options(self, negative_prompt: str | None, seed: int) -> Options:
        """The video options of a call that ran this request (see :data:`Options`)."""
        return {"negative_prompt": negative_prompt, **dataclasses.asdict(self), "seed": seed}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_transformer(
    model: UniViGUTransformer, device: torch.device, dtype: torch.dtype
) -> UniViGUTransformer:
    """Move to ``device`` and cast the parameters to ``dtype`` for inference.

    The time embeddings and modulation tables stay float32; buffers (the rotary tables) keep the
    precision they were built in.
    """
    model.to(device=device)
    for name, parameter in model.named_parameters():
        keep = name.startswith(FP32_PARAMETERS) or name.endswith("scale_shift_table")
        parameter.data = parameter.data.to(torch.float32 if keep else dtype)
    return model.eval().requires_grad_(False)


class UniViGUPipeline:
    """Transformer + VAE + text side with the three modes. Build one with a ``from_*`` constructor."""

    def __init__(
        self,
        transformer: UniViGUTransformer,
        vae: AutoencoderKLWan,
        text: TextSide,
        defaults: SamplingDefaults,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        video_sampler: VideoSamplerName = "euler",
        base_wan_dir: str | None = None,
        preset: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.transformer = cast_transformer(transformer, self.device, self.dtype)
        self.vae = vae.to(self.device).eval().requires_grad_(False)  # float32 throughout
        text.encoder.to(self.device, self.dtype).eval().requires_grad_(False)
        self.text = text
        self.defaults = defaults
        # What each mode accepts (model.limits): the hard bounds within this model's text and caption
        # lengths; a worker narrows them further by its operator's caps.
        self.limits = {
            mode: limits.model_limits(
                mode,
                limits.ModelCaps(
                    max_prompt_tokens=defaults.max_prompt_tokens,
                    context_tokens=defaults.context_tokens,
                    max_caption_tokens=defaults.max_caption_tokens,
                ),
            )
            for mode in limits.MODES
        }
        self.video_sampler: VideoSamplerName = video_sampler
        self.base_wan_dir = base_wan_dir
        self.preset = preset
        self.vae_tiling = VaeTiling()
        # False on the followers of a worker group: the leader decodes and writes the video, a follower's
        # result is dropped, so its VAE decode would be wasted (its frames come back empty).
        self.decode_video = True
        if len(text.tokenizer) > transformer.config.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {len(text.tokenizer)} tokens but the transformer's vocabulary has "
                f"{transformer.config.vocab_size}; they must come from the same model",
                key="vocab_embed.weight",
            )

    @functools.cached_property
    def weights_sha256(self) -> str:
        """sha256 of the served weights (transformer, VAE, text encoder); computed on first use."""
        return weights_sha256(self.transformer, self.vae, self.text.encoder)

    def identity(self) -> dict[str, Any]:
        """What, besides a call's options, decides its output: the model (preset and weights' hash), the
        video sampler and its shift, the device and the transformer's dtype."""
        return {
            "preset": self.preset,
            "weights_sha256": self.weights_sha256,
            "video_sampler": self.video_sampler,
            "shift": VIDEO_SHIFT,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls,
        *,
        preset: str | None = None,
        weights: str | Path | None = None,
        wan: str | Path | None = None,
        checkpoint: str | Path | None = None,
        null_prompt: str | Path | None = None,
        device: str | torch.device = "cpu",
        attention_backend: str | None = None,
        video_sampler: VideoSamplerName = "euler",
        compile: bool = False,
        vae_tiling: VaeTiling | None = None,
    ) -> UniViGUPipeline:
        """Exactly one source: a ``preset``, our ``weights`` folder, or a ``wan`` folder (+ ``checkpoint``).

        ``compile`` compiles the transformer's blocks (:meth:`UniViGUTransformer.compile_blocks`);
        ``vae_tiling`` replaces the default :class:`VaeTiling`.
        """
        given = [name for name, value in (("preset", preset), ("weights", weights), ("wan", wan)) if value]
        if len(given) != 1:
            raise InvalidParameterError(
                f"give exactly one model source (preset, weights or wan); got {given or 'none'}",
                param="model",
            )
        if checkpoint is not None and wan is None:
            raise InvalidParameterError("a checkpoint goes with a wan folder", param="checkpoint")
        if preset:
            pipe = cls.from_preset(preset, device=device)
        elif weights:
            pipe = cls.from_pretrained(weights, device=device)
        else:
            pipe = cls.from_wan(wan, checkpoint=checkpoint, null_prompt=null_prompt, device=device)
        if attention_backend:
            pipe.transformer.set_attention_backend(attention_backend)
        make_video_sampler(video_sampler, 1)  # rejects an unknown name now rather than at the first job
        pipe.video_sampler = video_sampler
        if compile:
            pipe.transformer.compile_blocks()
        if vae_tiling is not None:
            pipe.vae_tiling = vae_tiling
        return pipe

    @classmethod
    def from_preset(
        cls, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
    ) -> UniViGUPipeline:
        """A randomly initialised pipeline of a preset built in code (``tiny``); reproducible from ``seed``."""
        preset = get_preset(name)
        if preset.text_encoder is None or preset.vae is None:
            raise InvalidParameterError(
                f"preset {name!r} has no built-in weights; load real ones with "
                "UniViGUPipeline.from_wan(wan_dir, checkpoint=...) or from_pretrained(folder)",
                param="preset",
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokenizer = build_tiny_tokenizer()
            config = dataclasses.replace(preset.transformer, vocab_size=len(tokenizer))
            transformer = UniViGUTransformer(config)
            vae = AutoencoderKLWan(**preset.vae.to_kwargs())
            encoder = build_tiny_encoder(preset.text_encoder, len(tokenizer))
        text = TextSide(tokenizer, encoder, preset.defaults.context_tokens)
        return cls(transformer, vae, text, preset.defaults, device=device, dtype=dtype, preset=preset.name)

    @classmethod
    def from_wan(
        cls,
        wan_dir: str | Path,
        *,
        checkpoint: str | Path | None = None,
        null_prompt: str | Path | None = None,
        preset: str = "wan2.1-1.3b",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> UniViGUPipeline:
        """A Wan2.1 diffusers folder plus the released Uni-ViGU ``.pth``.

        Without ``checkpoint`` the transformer is a fresh Uni-ViGU initialised from Wan (spec §7), the
        starting point of training. ``null_prompt`` is an optional ``(1, 512, 4096)`` tensor file.
        ``preset`` names the sampling defaults (sizes, steps, text lengths) of the model in the folder.
        """
        wan_dir = Path(wan_dir)
        wan_config = read_wan_config(wan_dir / "transformer")
        if checkpoint is not None:
            state, source = read_univigu_pth(checkpoint), str(checkpoint)
            if "vocab_embed.weight" not in state:
                raise CheckpointError("missing parameter", file=source, key="vocab_embed.weight")
            vocab = state["vocab_embed.weight"].shape[0]
        else:
            vocab, source = _umt5_vocab(wan_dir), str(wan_dir / "transformer")
        config = UniViGUConfig.from_wan_config(
            wan_config, vocab_size=vocab, source=str(wan_dir / "transformer")
        )
        if checkpoint is None:  # only a fresh Uni-ViGU needs Wan's own transformer weights
            wan_state = read_wan_weights(wan_dir / "transformer")
            state = wan_to_univigu(wan_state, config, torch.Generator().manual_seed(seed))
            del wan_state
        transformer = build_transformer(config, state, source)
        defaults = get_preset(preset).defaults
        pipe = cls._with_wan_components(transformer, wan_dir, defaults, device, dtype, preset)
        if null_prompt is not None:
            pipe.text.set_null_condition(_read_tensor(Path(null_prompt)), str(null_prompt))
        return pipe

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> UniViGUPipeline:
        """A folder written by :meth:`save_pretrained` (what training writes and workers read)."""
        folder = Path(folder)
        manifest_path = folder / PIPELINE_FILE
        if not manifest_path.is_file():
            raise CheckpointError(
                f"not a Uni-ViGU pipeline folder ({PIPELINE_FILE} is missing); for a Wan folder plus a .pth use from_wan",
                file=str(manifest_path),
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"unsupported format_version {manifest.get('format_version')!r}; this build reads {FORMAT_VERSION}",
                file=str(manifest_path),
                key="format_version",
            )
        defaults = SamplingDefaults(**manifest["defaults"])
        transformer = load_transformer_folder(folder / "transformer")
        components = folder if (folder / "vae").is_dir() else Path(manifest.get("base_wan_dir") or folder)
        pipe = cls._with_wan_components(
            transformer, components, defaults, device, dtype, manifest.get("preset")
        )
        if (folder / NULL_PROMPT_FILE).is_file():
            pipe.text.set_null_condition(
                _read_tensor(folder / NULL_PROMPT_FILE), str(folder / NULL_PROMPT_FILE)
            )
        return pipe

    @classmethod
    def _with_wan_components(
        cls,
        transformer: UniViGUTransformer,
        folder: Path,
        defaults: SamplingDefaults,
        device: str | torch.device,
        dtype: torch.dtype | None,
        preset: str | None = None,
    ) -> UniViGUPipeline:
        """Attach the VAE, tokenizer and umT5 encoder found in ``folder`` (a Wan or pipeline folder)."""
        device = torch.device(device)
        if not (folder / "vae" / "config.json").is_file():
            raise CheckpointError("VAE folder not found", file=str(folder / "vae"))
        vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32)
        encoder = load_encoder(folder / "text_encoder", dtype or default_dtype(device))
        text = TextSide(load_tokenizer(folder / "tokenizer"), encoder, defaults.context_tokens)
        base = (
            str(folder) if (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists() else None
        )
        return cls(
            transformer, vae, text, defaults, device=device, dtype=dtype, base_wan_dir=base, preset=preset
        )

    def save_pretrained(self, folder: str | Path, *, reference_wan_dir: bool = True) -> Path:
        """Write our folder format: ``univigu.json``, ``transformer/`` and the other components.

        When the pipeline came from a Wan folder and ``reference_wan_dir`` is set, the VAE and umT5 are
        not copied (11 GB); the manifest names the Wan folder instead.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_transformer(self.transformer, folder / "transformer")
        referenced = reference_wan_dir and self.base_wan_dir is not None
        if not referenced:
            self.vae.save_pretrained(folder / "vae")
            self.text.encoder.save_pretrained(folder / "text_encoder")
            self.text.tokenizer.save_pretrained(folder / "tokenizer")
        manifest = {
            "format_version": FORMAT_VERSION,
            "preset": self.preset,
            "base_wan_dir": self.base_wan_dir if referenced else None,
            "defaults": dataclasses.asdict(self.defaults),
        }
        (folder / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    # ------------------------------------------------------------------ the three modes

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        step_cache: float | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> VideoResult:
        """Text-to-video: the prompt is held clean in the text stream; the video is denoised with guidance.

        ``step_cache``: opt-in threshold of the first-block step cache (:mod:`model.step_cache`); None is off.
        """
        # 1. Check inputs.
        self._check_texts("generate", prompt=prompt, negative_prompt=negative_prompt)
        request = self._video_request(
            "generate", height, width, num_frames, fps, steps, guidance_scale, step_cache
        )
        seed, generator = self._seeded("generate", seed)
        # 2. Encode the prompt: the clean text stream, the condition and the unconditional condition.
        # The authors pad the stream to a fixed length under a key mask; padding is then invisible to
        # every other token, so dropping it gives the same velocity for less work and mask-free kernels.
        padded, mask = self.text.tokenize([prompt], self.defaults.max_prompt_tokens)
        tokens = padded[:, : int(mask.sum())]  # (1, real tokens)
        cond, uncond = self._conditions(prompt, negative_prompt, request.guidance_scale)
        # 3. The initial latent.
        latent = self._initial_latent(request, generator)
        network = self._denoiser(request)
        # 4. Denoise the video; the prompt stays clean.
        latent, _ = self._denoise(network, request, latent, tokens, cond, uncond, progress, should_cancel)
        # 5. Decode.
        return VideoResult(
            self._decode(latent),
            request.fps,
            seed,
            options=request.options(negative_prompt, seed),
            skipped_steps=_skipped_steps(network),
        )

    @torch.inference_mode()
    def caption(
        self,
        video: str | Path | np.ndarray,
        *,
        prompt: str | None = None,
        steps: int | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        video_reuse: int | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> CaptionResult:
        """Video-to-text: the video latent is held clean; text is denoised from uniform random tokens.

        ``video`` is a file (decoded, resampled to the model fps, scaled, centre-cropped and trimmed to
        4k+1 frames) or uint8 frames ``(T, H, W, 3)`` already at a valid size. ``video_reuse``: a full
        pass over the video every this many steps and text-only passes between (:mod:`model.video_reuse`);
        1 is exact; None takes the model's default.
        """
        job = self.prepare_caption(
            video,
            prompt=prompt,
            steps=steps,
            max_tokens=max_tokens,
            seed=seed,
            video_reuse=video_reuse,
            progress=progress,
            should_cancel=should_cancel,
        )
        (result,) = self.caption_batch([job])
        if result is None:
            raise Canceled("canceled between denoising steps")
        return result

    def caption_settings(
        self, steps: int | None = None, max_tokens: int | None = None, video_reuse: int | None = None
    ) -> CaptionSettings:
        """The checked sampling settings of a caption, the model's defaults filled in."""
        d = self.defaults
        rules = self.limits["caption"].rules
        return CaptionSettings(
            steps=int(rules["steps"].check(d.steps if steps is None else steps)),
            length=self._caption_length("caption", max_tokens),
            video_reuse=int(
                rules["video_reuse"].check(d.video_reuse if video_reuse is None else video_reuse)
            ),
        )

    @torch.inference_mode()
    def prepare_caption(
        self,
        video: str | Path | np.ndarray,
        *,
        prompt: str | None = None,
        steps: int | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        video_reuse: int | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> PreparedCaption:
        """Everything of one caption before its denoising loop (arguments as in :meth:`caption`): checked
        options, the clean video latent, the condition and the first tokens. Run the loop with
        :meth:`caption_batch`, alone or together with other captions of the same :attr:`~PreparedCaption.batch_key`."""
        # 1. Check inputs and fit the video.
        self._check_texts("caption", prompt=prompt)
        settings = self.caption_settings(steps, max_tokens, video_reuse)
        frames = self._fit_video(video)
        seed, generator = self._seeded("caption", seed)
        # 2. Encode the condition (all zeros without a prompt) and the clean video latent.
        cond = self.text.encode([prompt]) if prompt else self._zero_condition()
        latent = self._encode_video(frames, generator)
        # 3. The discrete source.
        tokens = uniform_tokens(
            1, settings.length, self.transformer.config.vocab_size, self.device, generator
        )
        return PreparedCaption(
            settings, prompt, latent, cond, tokens, seed, generator, progress, should_cancel
        )

    @torch.inference_mode()
    def caption_batch(self, jobs: Sequence[PreparedCaption]) -> list[CaptionResult | None]:
        """Denoise the captions of ``jobs`` together: one transformer pass per step for the whole batch.

        Each caption draws from its own generator and reports to its own ``progress``, so it equals the
        caption run alone; one whose ``should_cancel`` answers True leaves the batch before the next step
        (None in its place) and the others go on. All jobs must share one ``batch_key``.
        """
        # 1. Check that the jobs fit one batch.
        keys = {job.batch_key for job in jobs}
        if len(keys) != 1:
            raise InvalidParameterError(
                f"captions of one batch need the same settings and video size; got {sorted(keys, key=str)}",
                param="video",
            )
        settings = jobs[0].settings
        # 2. Stack the rows; the clock and the reuse schedule are shared.
        sampler = MixturePathTextSampler(settings.steps)
        network = VideoReuse(self.transformer, settings.video_reuse, settings.steps)
        latent = torch.cat([job.latent for job in jobs])  # (B, C, f, h, w)
        cond = torch.cat([job.cond for job in jobs])  # (B, Lc, text_dim)
        tokens = torch.cat([job.tokens for job in jobs])  # (B, L)
        running = list(range(len(jobs)))  # the jobs still in the batch, in row order
        # 3. Denoise the text; canceled rows leave between steps.
        for index, time in enumerate(sampler.timesteps):
            staying = [row for row, j in enumerate(running) if not _cancel_requested(jobs[j].should_cancel)]
            if len(staying) < len(running):
                rows = torch.tensor(staying, dtype=torch.long, device=self.device)
                latent, cond, tokens = latent[rows], cond[rows], tokens[rows]
                network.keep_rows(rows)
                running = [running[row] for row in staying]
            if not running:
                break
            time_t = time.to(self.device).expand(len(running))  # (B,)
            logits = network(index, latent, tokens, time_t, cond)
            tokens = sampler.step_rows(logits, index, tokens, [jobs[j].generator for j in running])
            for j in running:
                _report(jobs[j].progress, index + 1, settings.steps)
        # 4. Detokenize.
        results: list[CaptionResult | None] = [None] * len(jobs)
        for row, j in enumerate(running):
            ids = tokens[row].tolist()
            passes = network.passes
            results[j] = CaptionResult(
                self.text.decode(ids),
                ids,
                jobs[j].seed,
                options=jobs[j].options,
                full_passes=passes.full,
                text_only_passes=passes.text_only,
            )
        return results

    @torch.inference_mode()
    def reconstruct(self, video: str | Path | np.ndarray, *, seed: int | None = None) -> np.ndarray:
        """The VAE's round trip: ``video`` (taken as :meth:`caption` takes it) encoded to a posterior
        sample and decoded again, uint8 ``(T, H, W, 3)``. The best any generated video can look; the
        toy evaluation reads it as the ceiling of text-to-video."""
        frames = self._fit_video(video)
        _, generator = self._seeded("caption", seed)
        return self._decode(self._encode_video(frames, generator))

    @torch.inference_mode()
    def joint(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        step_cache: float | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> JointResult:
        """A video and its description together: both streams start from noise and share one clock.

        ``step_cache`` as in :meth:`generate`; the final clean pass always runs every block.
        """
        # 1. Check inputs.
        self._check_texts("joint", prompt=prompt, negative_prompt=negative_prompt)
        request = self._video_request(
            "joint", height, width, num_frames, fps, steps, guidance_scale, step_cache
        )
        length = self._caption_length("joint", max_tokens)
        seed, generator = self._seeded("joint", seed)
        # 2. Encode the prompt.
        cond, uncond = self._conditions(prompt, negative_prompt, request.guidance_scale)
        # 3. The initial latent and the initial tokens.
        latent = self._initial_latent(request, generator)
        tokens = uniform_tokens(1, length, self.transformer.config.vocab_size, self.device, generator)
        network = self._denoiser(request)

        # 4. Denoise both streams; the text time is the video time of the step.
        def update_text(logits: torch.Tensor, index: int, tokens: torch.Tensor) -> torch.Tensor:
            return joint_text_update(logits, index, request.steps, tokens, generator)

        latent, tokens = self._denoise(
            network, request, latent, tokens, cond, uncond, progress, should_cancel, update_text
        )
        # 5. One clean pass for the final tokens, then decode both.
        zero = torch.zeros(1, device=self.device)
        _, logits = self.transformer(latent, tokens, zero, zero, cond, compute_velocity=False)
        ids = logits.argmax(dim=-1)[0].tolist()
        return JointResult(
            self._decode(latent),
            request.fps,
            self.text.decode(ids),
            ids,
            seed,
            options={**request.options(negative_prompt, seed), "max_tokens": length},
            skipped_steps=_skipped_steps(network),
        )

    # ------------------------------------------------------------------ steps shared by the modes

    def _video_request(
        self,
        mode: limits.Mode,
        height: int | None,
        width: int | None,
        num_frames: int | None,
        fps: int | None,
        steps: int | None,
        guidance_scale: float | None,
        step_cache: float | None = None,
    ) -> VideoRequest:
        d = self.defaults
        rules = self.limits[mode].rules
        return VideoRequest(
            height=int(rules["height"].check(d.height if height is None else height)),
            width=int(rules["width"].check(d.width if width is None else width)),
            num_frames=int(rules["num_frames"].check(d.num_frames if num_frames is None else num_frames)),
            fps=int(rules["fps"].check(d.fps if fps is None else fps)),
            steps=int(rules["steps"].check(d.steps if steps is None else steps)),
            guidance_scale=rules["guidance_scale"].check(
                d.guidance_scale if guidance_scale is None else guidance_scale
            ),
            step_cache=None if step_cache is None else rules["step_cache"].check(step_cache),
        )

    def _check_texts(self, mode: limits.Mode, **texts: str | None) -> None:
        """Each text within ``mode``'s token limits, counted as :meth:`TextSide.token_count` counts."""
        self.limits[mode].check(texts, self.text.token_count)

    def _denoiser(self, request: VideoRequest) -> Denoiser:
        """The transformer, or a fresh step cache around it when the request asks for one."""
        if request.step_cache is None:
            return self.transformer
        return FirstBlockCache(self.transformer, request.step_cache)

    def _caption_length(self, mode: limits.Mode, max_tokens: int | None) -> int:
        length = self.defaults.caption_tokens if max_tokens is None else max_tokens
        return int(self.limits[mode].rules["max_tokens"].check(length))

    def _seeded(self, mode: limits.Mode, seed: int | None) -> tuple[int, torch.Generator]:
        """The seed actually used (drawn when None) and a generator on the pipeline's device."""
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        self.limits[mode].rules["seed"].check(seed)
        return seed, torch.Generator(self.device).manual_seed(seed)

    def _conditions(
        self, prompt: str, negative_prompt: str | None, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cond, uncond)``, each ``(1, Lc, text_dim)``; no unconditional pass when the scale is 1."""
        cond = self.text.encode([prompt])
        if guidance_scale == 1.0:
            return cond, None
        if negative_prompt:
            return cond, self.text.encode([negative_prompt], param="negative_prompt")
        return cond, self.text.null_condition()

    def _zero_condition(self) -> torch.Tensor:
        config = self.transformer.config
        return torch.zeros(
            1, self.defaults.context_tokens, config.text_dim, device=self.device, dtype=self.dtype
        )

    def _initial_latent(self, request: VideoRequest, generator: torch.Generator) -> torch.Tensor:
        """Standard normal ``(1, C, f, H/s, W/s)``; ``s`` is the VAE's spatial compression (8 for Wan's,
        4 for the toy model's)."""
        scale = self.vae.spatial_compression_ratio
        shape = (
            1,
            self.transformer.config.in_channels,
            limits.latent_frames(request.num_frames),
            request.height // scale,
            request.width // scale,
        )
        return torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)

    def _denoise(
        self,
        network: Denoiser,
        request: VideoRequest,
        latent: torch.Tensor,
        tokens: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        update_text: TextUpdate | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The video loop of ``generate`` and ``joint``: ``latent (1, C, f, h, w)`` from noise to clean.

        Without ``update_text`` the text stream ``tokens (1, L)`` is held clean (time 0); with it, the
        text shares the video's clock and ``update_text`` moves it after every step. Returns the clean
        latent and the final tokens.
        """
        sampler = make_video_sampler(self.video_sampler, request.steps)
        clean = torch.zeros(1, device=self.device)
        for index, time in enumerate(sampler.timesteps):
            _check_cancel(should_cancel)
            time_v = time.view(1)
            time_t = clean if update_text is None else time_v
            velocity, logits = self._guided(
                network, latent, tokens, time_v, time_t, cond, uncond, request, update_text is not None
            )
            latent = sampler.step(velocity, index, latent)
            if update_text is not None:
                tokens = update_text(logits, index, tokens)
            _report(progress, index + 1, request.steps)
        return latent, tokens

    def _guided(
        self,
        network: Denoiser,
        latent: torch.Tensor,
        tokens: torch.Tensor,
        time_v: torch.Tensor,
        time_t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        request: VideoRequest,
        want_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Velocity with guidance on video (one batched pass of two) and the conditional logits.

        ``latent (1, C, f, h, w)``, ``tokens (1, L)`` -> ``(velocity (1, C, f, h, w), logits (1, L, V) | None)``.
        """
        if uncond is None:
            return network(latent, tokens, time_v, time_t, cond, compute_logits=want_logits)
        velocity, logits = network(
            latent.expand(2, -1, -1, -1, -1),
            tokens.expand(2, -1),
            time_v.expand(2),
            time_t.expand(2),
            torch.cat([cond, uncond]),
            compute_logits=want_logits,
        )
        guided = classifier_free_guidance(velocity[:1], velocity[1:], request.guidance_scale)
        return guided, None if logits is None else logits[:1]

    def _fit_video(self, video: str | Path | np.ndarray) -> np.ndarray:
        """Frames ``(T, H, W, 3)`` uint8 at a size the model takes."""
        d = self.defaults
        if isinstance(video, np.ndarray):
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
                raise InvalidParameterError(
                    f"video frames must be uint8 of shape (T, H, W, 3), got {video.dtype} {video.shape}",
                    param="video",
                )
            limits.RULES["num_frames"].check(video.shape[0], name="video frame count")
            limits.RULES["height"].check(video.shape[1], name="video height")
            limits.RULES["width"].check(video.shape[2], name="video width")
            return video
        from model.media import read_video

        return read_video(video, height=d.height, width=d.width, fps=d.fps, max_frames=d.num_frames)

    def _set_vae_tiling(self, height: int, width: int) -> None:
        """Tile the next VAE pass when a ``height x width`` video is above :attr:`vae_tiling`'s threshold."""
        tiling = self.vae_tiling
        if tiling.applies(height, width):
            self.vae.enable_tiling(tiling.tile, tiling.tile, tiling.stride, tiling.stride)
        else:
            self.vae.disable_tiling()

    def _encode_video(self, frames: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> a posterior sample of the raw VAE latent ``(1, C, f, H/s, W/s)``."""
        pixels = frames_to_pixels(frames[None], self.device)  # (1, 3, T, H, W)
        self._set_vae_tiling(pixels.shape[-2], pixels.shape[-1])
        return self.vae.encode(pixels).latent_dist.sample(generator)

    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        """Raw latent ``(1, C, f, h, w)`` -> uint8 frames ``(T, H, W, 3)``; ``(0, 0, 0, 3)`` without
        :attr:`decode_video`."""
        if not self.decode_video:
            return np.empty((0, 0, 0, 3), dtype=np.uint8)
        scale = self.vae.spatial_compression_ratio
        self._set_vae_tiling(scale * latent.shape[-2], scale * latent.shape[-1])
        return pixels_to_frames(self.vae.decode(latent.float()).sample[0])


def _skipped_steps(network: Denoiser) -> int:
    return network.stats.skipped if isinstance(network, FirstBlockCache) else 0


def _cancel_requested(should_cancel: CancelCheck | None) -> bool:
    return should_cancel is not None and should_cancel()


def _check_cancel(should_cancel: CancelCheck | None) -> None:
    if _cancel_requested(should_cancel):
        raise Canceled("canceled between denoising steps")


def _report(progress: ProgressCallback | None, step: int, total: int) -> None:
    if progress is not None:
        progress(step, total)


def _read_tensor(path: Path) -> torch.Tensor:
    """The single tensor of a safetensors or torch file."""
    if not path.is_file():
        raise CheckpointError("file not found", file=str(path))
    tensors = read_safetensors(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    if isinstance(tensors, dict):
        if len(tensors) != 1:
            raise CheckpointError(f"expected exactly one tensor, found {len(tensors)}", file=str(path))
        tensors = next(iter(tensors.values()))
    return tensors


def _umt5_vocab(wan_dir: Path) -> int:
    """Rows of the umT5 embedding, from ``text_encoder/config.json``."""
    config = wan_dir / "text_encoder" / "config.json"
    if not config.is_file():
        raise CheckpointError("text encoder config not found", file=str(config))
    return int(json.loads(config.read_text())["vocab_size"])
