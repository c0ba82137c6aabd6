"""The Uni-ViGU transformer: Wan2.1's DiT extended with a text stream (spec §3-§4).

One network denoises two streams at once. Video latents become patch tokens, text ids become
embeddings, and every block runs one self-attention over ``[video | text]`` followed by a
cross-attention to the umT5 prompt and a feed-forward expert per modality. Each modality has its
own timestep embedding; the block's modulation table is shared.

The building blocks are diffusers' Wan classes (``WanAttention``, ``WanRotaryPosEmbed``,
``FeedForward``, ``Timesteps``/``TimestepEmbedding``, ``PixArtAlphaTextProjection``,
``FP32LayerNorm``); parameter names equal the released checkpoint's. The network knows nothing
about sampling: it maps noisy inputs and times to a video velocity and text logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)
from diffusers.models.embeddings import (
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    Timesteps,
    apply_rotary_emb,
)
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import UniViGUConfig
from model.errors import AttentionBackendError, InvalidParameterError
from model.parallel import ParallelPlan, check_degrees

MASKED_ATTENTION_BACKENDS = frozenset(
    {"native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers"}
)
"""Attention backends that honour a key padding mask; the flash and sage kernels do not."""

AUTO_ATTENTION_CANDIDATES = ("_flash_3", "flash", "sage")
"""What ``auto`` tries on CUDA, in order: FlashAttention 3, FlashAttention 2, SageAttention (installed
packages only; diffusers' ``*_hub`` kernels would need a download at run time)."""

RotaryTable = tuple[torch.Tensor, torch.Tensor]
"""``(cos, sin)``, each ``(S, head_dim)``."""


@dataclass(frozen=True)
class PassState:
    """What every block and the heads of one forward pass share, computed once by ``embed``."""

    context: torch.Tensor  # (B, Lc, D) projected umT5 prompt
    modulation_v: torch.Tensor  # (B, 6, D)
    modulation_t: torch.Tensor  # (B, 6, D)
    num_video: int  # Nv
    video_rope: RotaryTable  # each (Nv, head_dim)
    text_rope: RotaryTable  # each (L, head_dim)
    key_mask: torch.Tensor | None  # (B, 1, 1, Nv + L) bool, None when nothing is padded
    temb_v: torch.Tensor  # (B, D)
    temb_t: torch.Tensor  # (B, D)
    grid: tuple[int, int, int]  # (f, h, w) in patches


@dataclass(frozen=True)
class VideoKeyValues:
    """Every block's self-attention keys and values over ``[video | text]``, kept from one full pass.

    The video rows are what text queries read from the clean video; a text-only pass
    (:meth:`UniViGUTransformer.forward_text`) writes its own text keys and values into the text rows, in
    place, so one buffer per block serves every later step without copying the video rows again.
    """

    keys: tuple[torch.Tensor, ...]  # per block (B, Nv + L, H, hd), after RMSNorm and the rotary embedding
    values: tuple[torch.Tensor, ...]  # per block (B, Nv + L, H, hd)
    num_video: int  # Nv

    def select(self, rows: torch.Tensor) -> VideoKeyValues:
        """Only the batch rows ``rows (B',)`` (int64 indices), in that order."""
        return VideoKeyValues(
            tuple(keys.index_select(0, rows) for keys in self.keys),
            tuple(values.index_select(0, rows) for values in self.values),
            self.num_video,
        )


def _backend_name(backend: str) -> AttentionBackendName:
    """diffusers' enum member for ``backend``; :class:`AttentionBackendError` listing the choices otherwise."""
    try:
        return AttentionBackendName(backend.lower())
    except ValueError:
        allowed = sorted(b.value for b in AttentionBackendName if not b.value.startswith("_"))
        raise AttentionBackendError(
            f"unknown attention backend {backend!r}; choose one of {allowed} or auto"
        ) from None


def _missing_requirement(backend: AttentionBackendName) -> str | None:
    """Why diffusers cannot run ``backend`` here (a missing or too old package), or None."""
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as error:
        return str(error)
    return None


def resolve_attention_backend(backend: str, device: torch.device, *, context_parallel: bool = False) -> str:
    """``auto`` -> the first usable of :data:`AUTO_ATTENTION_CANDIDATES` on CUDA, else ``native`` (torch's
    SDPA, which picks its own flash/memory-efficient/math kernel); any other name is returned checked.
    With ``context_parallel``, ``auto`` skips kernels that diffusers cannot split across devices.

    Raises :class:`AttentionBackendError` for an unknown name or one whose package is missing.
    """
    if backend.lower() == "auto":
        usable = [
            name
            for name in AUTO_ATTENTION_CANDIDATES
            if device.type == "cuda"
            and _missing_requirement(AttentionBackendName(name)) is None
            and (
                not context_parallel
                or _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))
            )
        ]
        return usable[0] if usable else AttentionBackendName.NATIVE.value
    name = _backend_name(backend)
    problem = _missing_requirement(name)
    if problem is not None:
        raise AttentionBackendError(
            f"attention backend {name.value!r} is not usable here ({problem}); use auto or native"
        )
    return name.value


class ModalityTimeEmbedding(nn.Module):
    """Sinusoidal time features -> ``temb (B, D)`` and the block modulation ``proj (B, 6, D)``."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.timesteps_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``time (B,)`` on the 0..1000 scale -> ``(temb (B, D), proj (B, 6, D))``."""
        features = self.timesteps_proj(time).to(self.time_embedder.linear_1.weight.dtype)  # (B, freq_dim)
        temb = self.time_embedder(features)  # (B, D)
        proj = self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6, D)
        return temb, proj


class TextRotaryEmbedding(nn.Module):
    """1-D rotary table for the text stream: rotate-half convention over the full head dimension."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=True)  # (head_dim / 2,)

    def forward(self, length: int) -> RotaryTable:
        """Positions ``0..length-1`` -> ``(cos, sin)``, each ``(length, head_dim)`` in float32."""
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())  # (L, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # dimension i pairs with i + head_dim / 2
        return angles.cos(), angles.sin()


class VideoHead(nn.Module):
    """Final modulated LayerNorm and projection of video tokens back to patch channels."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_features)

    def forward(self, video: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``video (B, Nv, D)``, ``shift/scale (B, 1, D)`` -> ``(B, Nv, pt*ph*pw*C)``."""
        normed = (self.norm_out(video.float()) * (1 + scale) + shift).type_as(video)
        return self.proj_out(normed)


class TextHead(nn.Module):
    """Final modulated LayerNorm (weight, no bias, eps 1e-5) and projection to vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-5, bias=False)
        self.linear = nn.Linear(dim, vocab_size)

    def forward(self, text: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``text (B, L, D)``, ``shift/scale (B, 1, D)`` -> logits ``(B, L, V)``."""
        normed = F.layer_norm(
            text.float(), self.norm_final.normalized_shape, self.norm_final.weight.float(), None, 1e-5
        )
        return self.linear((normed * (1 + scale) + shift).type_as(text))


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in float32, returned in ``x``'s dtype. ``x (B, N, D)``."""
    return (norm(x.float()) * (1 + scale) + shift).type_as(x)


def _gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + update * gate`` in float32, returned in ``x``'s dtype."""
    return (x.float() + update.float() * gate).type_as(x)


class UniViGUBlock(nn.Module):
    """One Wan block with a joint video+text self-attention and a text feed-forward expert."""

    def __init__(self, config: UniViGUConfig) -> None:
        super().__init__()
        dim, heads, head_dim, eps = (
            config.hidden_size,
            config.num_attention_heads,
            config.attention_head_dim,
            config.eps,
        )
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, head_dim, eps, processor=WanAttnProcessor())
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = WanAttention(
            dim, heads, head_dim, eps, cross_attention_dim_head=head_dim, processor=WanAttnProcessor()
        )
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.norm3_t = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, inner_dim=config.ffn_dim, activation_fn="gelu-approximate")
        self.ffn_t = FeedForward(dim, inner_dim=config.ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def _rotated_qkv(
        self,
        hidden: torch.Tensor,
        num_video: int,
        video_rope: RotaryTable | None,
        text_rope: RotaryTable,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden (B, S, D)``, its first ``num_video`` tokens video -> query, key, value ``(B, S, H, hd)``,
        query and key RMS-normed and rotated with each modality's table."""
        attn = self.attn1
        query = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1))  # (B, S, H, hd)
        key = attn.norm_k(attn.to_k(hidden)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden).unflatten(2, (attn.heads, -1))

        def rotate(x: torch.Tensor) -> torch.Tensor:
            if num_video == 0:  # a text-only pass
                return apply_rotary_emb(x, text_rope, use_real_unbind_dim=-2, sequence_dim=1)
            video = apply_rotary_emb(x[:, :num_video], video_rope, use_real_unbind_dim=-1, sequence_dim=1)
            if x.shape[1] == num_video:  # empty text stream
                return video
            text = apply_rotary_emb(x[:, num_video:], text_rope, use_real_unbind_dim=-2, sequence_dim=1)
            return torch.cat([video, text], dim=1)

        return rotate(query), rotate(key), value

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``query (B, Sq, H, hd)`` over ``key, value (B, Sk, H, hd)``, then ``to_out`` -> ``(B, Sq, D)``."""
        attn = self.attn1
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=key_mask,
            backend=attn.processor._attention_backend,
            parallel_config=attn.processor._parallel_config,  # Ulysses under sequence parallelism
        )
        out = out.flatten(2, 3).type_as(query)  # (B, Sq, D)
        return attn.to_out[1](attn.to_out[0](out))

    def _modulation(self, modulation: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``modulation (B, 6, D)`` plus the block's table -> shift, scale, gate, c_shift, c_scale, c_gate,
        each ``(B, 1, D)`` float32."""
        return (self.scale_shift_table + modulation.float()).chunk(6, dim=1)

    def _cross_attention(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``hidden (B, N, D)`` plus its cross-attention to ``context (B, Lc, D)``; a plain residual."""
        return hidden + self.attn2(self.norm2(hidden.float()).type_as(hidden), context)

    def _text_feed_forward(
        self, text: torch.Tensor, c_shift: torch.Tensor, c_scale: torch.Tensor, c_gate: torch.Tensor
    ) -> torch.Tensor:
        """``text (B, L, D)`` through the text expert ``ffn_t`` with its gated residual."""
        return _gated_residual(text, self.ffn_t(_modulate(self.norm3_t, text, c_shift, c_scale)), c_gate)

    def forward(
        self,
        hidden: torch.Tensor,
        context: torch.Tensor,
        modulation_v: torch.Tensor,
        modulation_t: torch.Tensor,
        num_video: int,
        video_rope: RotaryTable,
        text_rope: RotaryTable,
        key_mask: torch.Tensor | None,
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """One block.

        Args:
            hidden: ``(B, Nv + L, D)`` video tokens then text tokens.
            context: ``(B, Lc, D)`` projected umT5 prompt.
            modulation_v, modulation_t: ``(B, 6, D)`` time projections of each modality.
            num_video: ``Nv``.
            video_rope: ``(cos, sin)`` each ``(Nv, head_dim)``, interleaved pairs.
            text_rope: ``(cos, sin)`` each ``(L, head_dim)``, rotate-half.
            key_mask: ``(B, 1, 1, Nv + L)`` bool, True where a key may be attended; None for no padding.
            kept: when given, the self-attention's key and value ``(B, Nv + L, H, hd)`` are appended to it.
        Returns:
            ``(B, Nv + L, D)``.
        """
        shift_v, scale_v, gate_v, c_shift_v, c_scale_v, c_gate_v = self._modulation(modulation_v)
        shift_t, scale_t, gate_t, c_shift_t, c_scale_t, c_gate_t = self._modulation(modulation_t)
        video, text = hidden[:, :num_video], hidden[:, num_video:]

        # 1. Joint self-attention, each modality modulated and gated with its own values.
        normed = torch.cat(
            [_modulate(self.norm1, video, shift_v, scale_v), _modulate(self.norm1, text, shift_t, scale_t)],
            dim=1,
        )
        query, key, value = self._rotated_qkv(normed, num_video, video_rope, text_rope)
        if kept is not None:
            kept.append((key, value))
        attn_out = self._attend(query, key, value, key_mask)
        hidden = torch.cat(
            [
                _gated_residual(video, attn_out[:, :num_video], gate_v),
                _gated_residual(text, attn_out[:, num_video:], gate_t),
            ],
            dim=1,
        )

        # 2. Cross-attention of the whole sequence to the prompt; plain residual.
        hidden = self._cross_attention(hidden, context)

        # 3. Feed-forward routed by modality.
        video, text = hidden[:, :num_video], hidden[:, num_video:]
        video = _gated_residual(video, self.ffn(_modulate(self.norm3, video, c_shift_v, c_scale_v)), c_gate_v)
        text = self._text_feed_forward(text, c_shift_t, c_scale_t, c_gate_t)
        return torch.cat([video, text], dim=1)

    def forward_text(
        self,
        text: torch.Tensor,
        context: torch.Tensor,
        modulation_t: torch.Tensor,
        text_rope: RotaryTable,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """The text tokens alone through this block, reading the video from a full pass's keys and values.

        Args:
            text: ``(B, L, D)``, no padding.
            context, modulation_t, text_rope: as in :meth:`forward`.
            keys, values: ``(B, Nv + L, H, hd)`` this block kept in a full pass; the text rows are
                overwritten with this pass's own.
        Returns:
            ``(B, L, D)``: what :meth:`forward` gives the text tokens when the video rows of ``keys`` and
            ``values`` are those of the same step.
        """
        shift, scale, gate, c_shift, c_scale, c_gate = self._modulation(modulation_t)
        num_video = keys.shape[1] - text.shape[1]
        query, key, value = self._rotated_qkv(_modulate(self.norm1, text, shift, scale), 0, None, text_rope)
        keys[:, num_video:] = key
        values[:, num_video:] = value
        text = _gated_residual(text, self._attend(query, keys, values, None), gate)
        text = self._cross_attention(text, context)
        return self._text_feed_forward(text, c_shift, c_scale, c_gate)


class UniViGUTransformer(nn.Module):
    """The whole network: ``(x_v, x_t, time_v, time_t, cond) -> (velocity, logits)``."""

    def __init__(self, config: UniViGUConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise InvalidParameterError(f"vocab_size must be positive, got {config.vocab_size}")
        self.config = config
        dim = config.hidden_size
        self.vocab_embed = nn.Embedding(config.vocab_size, dim)
        self.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
        self.rotary_emb_text = TextRotaryEmbedding(config.attention_head_dim, config.text_rope_theta)
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cond_text_embedder = PixArtAlphaTextProjection(config.text_dim, dim, act_fn="gelu_tanh")
        self.time_embedding_v = ModalityTimeEmbedding(dim, config.freq_dim)
        self.time_embedding_t = ModalityTimeEmbedding(dim, config.freq_dim)
        self.blocks = nn.ModuleList(UniViGUBlock(config) for _ in range(config.num_layers))
        self.scale_shift_table_v = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.scale_shift_table_t = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.video_head = VideoHead(dim, config.out_channels * math.prod(config.patch_size), config.eps)
        self.text_head = TextHead(dim, config.vocab_size)
        self.gradient_checkpointing = False
        self.compiled = False
        self._attention_backend: str = AttentionBackendName.NATIVE.value
        self.parallel: ParallelPlan | None = None

    @property
    def device(self) -> torch.device:
        return self.vocab_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vocab_embed.weight.dtype

    @property
    def attention_backend(self) -> str:
        """The diffusers dispatch backend every attention uses ("native" unless set)."""
        return self._attention_backend

    def set_attention_backend(self, backend: str, *, context_parallel: bool = False) -> None:
        """Route every attention through diffusers' dispatch ``backend`` ("native", "flash", "sage", ...);
        ``auto`` picks one for this network's device (:func:`resolve_attention_backend`)."""
        name = AttentionBackendName(
            resolve_attention_backend(backend, self.device, context_parallel=context_parallel)
        )
        for module in self.modules():
            if isinstance(module, WanAttention):
                module.processor._attention_backend = name
        self._attention_backend = name.value

    def enable_parallelism(self, plan: ParallelPlan) -> None:
        """Run every later pass on ``plan``'s group of devices (see :mod:`model.parallel`); inference only.

        Call it on every rank, after :meth:`set_attention_backend`. Raises
        :class:`InvalidParameterError` for a sequence degree that does not divide the head count and
        :class:`AttentionBackendError` for a backend without diffusers' context-parallel support.
        """
        check_degrees(plan.guidance, plan.sequence, self.config.num_attention_heads)
        backend = AttentionBackendName(self._attention_backend)
        if plan.attention is not None and not _AttentionBackendRegistry._is_context_parallel_available(
            backend
        ):
            supported = sorted(_AttentionBackendRegistry._supports_context_parallel)
            raise AttentionBackendError(
                f"attention backend {backend.value!r} cannot split the sequence across devices; use one of "
                f"{supported} or sequence_parallel 1"
            )
        for block in self.blocks:
            block.attn1.processor._parallel_config = plan.attention
        self.parallel = plan

    def _key_mask(self, text_mask: torch.Tensor | None, num_video: int) -> torch.Tensor | None:
        """``text_mask (B, L)`` -> key padding mask ``(B, 1, 1, Nv + L)``, or None when nothing is padded."""
        if text_mask is None or bool(text_mask.bool().all()):
            return None
        if self._attention_backend not in MASKED_ATTENTION_BACKENDS:
            raise AttentionBackendError(
                f"attention backend {self._attention_backend!r} cannot apply a text padding mask; use one of "
                f"{sorted(MASKED_ATTENTION_BACKENDS)} or pass unpadded text"
            )
        video_keys = text_mask.new_ones(text_mask.shape[0], num_video, dtype=torch.bool)
        return torch.cat([video_keys, text_mask.bool()], dim=1)[:, None, None, :]

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Regional compilation: ``torch.compile`` each block with static shapes (``dynamic=False``).

        Every block runs the same code on inputs of the same shapes, so all of them share one compiled
        graph (parameters are graph inputs, not constants): compiling costs about one block, and a
        later call with the same shapes reuses the graph. A new sequence length, batch size or
        padding mask compiles once more. Meant for CUDA; on the CPU inductor needs a C++ compiler.
        """
        for block in self.blocks:
            block.compile(dynamic=False, backend=backend)
        self.compiled = True

    def embed(
        self,
        x_v: torch.Tensor,
        x_t: torch.Tensor,
        time_v: torch.Tensor,
        time_t: torch.Tensor,
        cond: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PassState]:
        """Tokens and everything the blocks and heads share -> ``(hidden (B, Nv + L, D), state)``.

        Inputs as in :meth:`forward`.
        """
        _, _, frames, height, width = x_v.shape
        p_t, p_h, p_w = self.config.patch_size

        # 1. Tokens and rotary tables.
        video_cos, video_sin = self.rope(x_v)  # each (1, Nv, 1, hd)
        video = self.patch_embedding(x_v.to(self.dtype)).flatten(2).transpose(1, 2)  # (B, Nv, D)
        text = self.vocab_embed(x_t)  # (B, L, D)
        num_video = video.shape[1]
        hidden = torch.cat([video, text], dim=1).contiguous()  # (B, Nv + L, D)

        # 2. Prompt projection and per-modality time embeddings.
        temb_v, modulation_v = self.time_embedding_v(time_v)  # (B, D), (B, 6, D)
        temb_t, modulation_t = self.time_embedding_t(time_t)
        state = PassState(
            context=self.cond_text_embedder(cond.to(self.dtype)),  # (B, Lc, D)
            modulation_v=modulation_v,
            modulation_t=modulation_t,
            num_video=num_video,
            video_rope=(video_cos[0, :, 0], video_sin[0, :, 0]),
            text_rope=self.rotary_emb_text(x_t.shape[1]),
            key_mask=self._key_mask(text_mask, num_video),
            temb_v=temb_v,
            temb_t=temb_t,
            grid=(frames // p_t, height // p_h, width // p_w),
        )
        return hidden, state

    def run_blocks(
        self,
        hidden: torch.Tensor,
        state: PassState,
        blocks: Iterable[UniViGUBlock] | None = None,
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``hidden (B, Nv + L, D)`` through ``blocks`` (default: all of them, in order) -> the same shape.

        With ``kept``, every block appends its self-attention key and value ``(B, Nv + L, H, hd)``. Under
        :meth:`enable_parallelism` each rank runs the blocks on its share of rows and tokens, and every
        rank returns the whole result; it keeps no keys and values (a rank holds only its share of them).
        """
        blocks = self.blocks if blocks is None else blocks
        if self.parallel is None:
            return self._run_blocks(hidden, state, blocks, kept)
        if kept is not None:
            raise InvalidParameterError(
                "video_reuse needs the whole job on one device; this network is split across several",
                param="video_reuse",
            )
        local = self.parallel.split(hidden, state)
        return self.parallel.join(self._run_blocks(local.hidden, local.state, blocks), local)

    def _run_blocks(
        self,
        hidden: torch.Tensor,
        state: PassState,
        blocks: Iterable[UniViGUBlock],
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        for block in blocks:
            args = (
                hidden,
                state.context,
                state.modulation_v,
                state.modulation_t,
                state.num_video,
                state.video_rope,
                state.text_rope,
                state.key_mask,
            )
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden = block(*args, kept=kept)
        return hidden

    def heads(
        self,
        hidden: torch.Tensor,
        state: PassState,
        *,
        compute_velocity: bool = True,
        compute_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The last blocks' ``hidden (B, Nv + L, D)`` -> ``(velocity (B, C, f, h, w), logits (B, L, V))``."""
        velocity = logits = None
        num_video = state.num_video
        if compute_velocity:
            shift, scale = (self.scale_shift_table_v + state.temb_v.float()[:, None]).chunk(
                2, dim=1
            )  # (B, 1, D)
            patches = self.video_head(hidden[:, :num_video], shift, scale)  # (B, Nv, pt*ph*pw*C)
            patches = patches.reshape(hidden.shape[0], *state.grid, *self.config.patch_size, -1)
            velocity = patches.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if compute_logits:
            logits = self._text_logits(hidden[:, num_video:], state.temb_t)
        return velocity, logits

    def _text_logits(self, text: torch.Tensor, temb_t: torch.Tensor) -> torch.Tensor:
        """The text head: ``text (B, L, D)``, ``temb_t (B, D)`` -> logits ``(B, L, V)`` float32."""
        shift, scale = (self.scale_shift_table_t + temb_t.float()[:, None]).chunk(2, dim=1)  # (B, 1, D)
        return self.text_head(text, shift, scale).float()

    def forward(
        self,
        x_v: torch.Tensor,
        x_t: torch.Tensor,
        time_v: torch.Tensor,
        time_t: torch.Tensor,
        cond: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        compute_velocity: bool = True,
        compute_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One denoising pass over both streams: :meth:`embed`, :meth:`run_blocks`, :meth:`heads`.

        Args:
            x_v: ``(B, C, f, h, w)`` noisy video latent.
            x_t: ``(B, L)`` token ids in ``[0, V)``.
            time_v, time_t: ``(B,)`` times on the 0..1000 scale (1000 = pure noise, 0 = clean).
            cond: ``(B, Lc, text_dim)`` umT5 encoder output.
            text_mask: optional ``(B, L)``, 1 for real tokens, 0 for padding.
            compute_velocity, compute_logits: skip a head whose output the caller does not need.
        Returns:
            ``(velocity (B, C, f, h, w), logits (B, L, V) float32)``; a skipped head gives None.
        """
        hidden, state = self.embed(x_v, x_t, time_v, time_t, cond, text_mask)
        hidden = self.run_blocks(hidden, state)
        return self.heads(hidden, state, compute_velocity=compute_velocity, compute_logits=compute_logits)

    def forward_keeping_video(
        self,
        x_v: torch.Tensor,
        x_t: torch.Tensor,
        time_v: torch.Tensor,
        time_t: torch.Tensor,
        cond: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, VideoKeyValues]:
        """A full pass, as :meth:`forward` with ``compute_velocity=False``, that also keeps every block's
        self-attention keys and values for :meth:`forward_text`.

        Returns ``(logits (B, L, V) float32, keys and values)``. They hold ``2 * layers * B * (Nv + L) * D``
        numbers: 5.7 GiB per video for Wan2.1-1.3B at 480x832, 81 frames, 256 caption tokens in bfloat16.
        """
        hidden, state = self.embed(x_v, x_t, time_v, time_t, cond, text_mask)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = self.run_blocks(hidden, state, kept=kept)
        keys, values = zip(*kept, strict=True)
        logits = self._text_logits(hidden[:, state.num_video :], state.temb_t)
        return logits, VideoKeyValues(keys, values, state.num_video)

    def forward_text(
        self,
        x_t: torch.Tensor,
        time_t: torch.Tensor,
        cond: torch.Tensor,
        video: VideoKeyValues,
    ) -> torch.Tensor:
        """Only the text stream, over the video keys and values ``video`` of an earlier full pass.

        Text queries attend to ``[video's keys | the current text keys]``; cross-attention, the text
        feed-forward and the text head run as in :meth:`forward`. The video tokens are not run, so what
        they read from the text stays as it was in that full pass: with the full pass at the same inputs
        the logits equal :meth:`forward`'s up to float rounding, otherwise they approximate them.
        The text rows of ``video`` are overwritten.

        Args:
            x_t: ``(B, L)`` token ids, ``L`` as in the full pass, none of them padding.
            time_t: ``(B,)`` text times on the 0..1000 scale.
            cond: ``(B, Lc, text_dim)`` umT5 encoder output.
            video: what :meth:`forward_keeping_video` kept, for the same ``B`` and ``L``.
        Returns:
            logits ``(B, L, V)`` float32.
        """
        text = self.vocab_embed(x_t)  # (B, L, D)
        temb_t, modulation_t = self.time_embedding_t(time_t)  # (B, D), (B, 6, D)
        context = self.cond_text_embedder(cond.to(self.dtype))  # (B, Lc, D)
        text_rope = self.rotary_emb_text(x_t.shape[1])
        for block, keys, values in zip(self.blocks, video.keys, video.values, strict=True):
            text = block.forward_text(text, context, modulation_t, text_rope, keys, values)
        return self._text_logits(text, temb_t)
