"""Typed configuration of the Uni-ViGU transformer, with named presets.

The field names follow diffusers' ``WanTransformer3DModel`` config where one exists, so that a Wan2.1
``transformer/config.json`` converts directly (:meth:`UniViGUConfig.from_wan_config`); ``vocab_size``
is the only addition (the umT5 vocabulary the text stream denoises over).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model.errors import CheckpointError, UnknownPresetError

UMT5_VOCAB_SIZE = 256384
"""Rows of ``vocab_embed`` in the released checkpoint (Wan's umT5 tokenizer)."""


@dataclass(frozen=True)
class UniViGUConfig:
    """Architecture of one Uni-ViGU transformer. ``D = num_attention_heads * attention_head_dim``."""

    num_attention_heads: int = 12
    attention_head_dim: int = 128
    num_layers: int = 30
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    vocab_size: int = UMT5_VOCAB_SIZE
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    text_rope_theta: float = 10000.0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UniViGUConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(
                f"unknown Uni-ViGU config fields {unknown}; known fields are {sorted(known)}"
            )
        values = dict(values)
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)

    @classmethod
    def from_wan_config(
        cls, wan: dict[str, Any], *, vocab_size: int, source: str = "config.json"
    ) -> UniViGUConfig:
        """Build from a diffusers ``WanTransformer3DModel`` config dict (``transformer/config.json``)."""
        if wan.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise CheckpointError(
                "Uni-ViGU needs qk_norm 'rms_norm_across_heads'", file=source, key="qk_norm"
            )
        if not wan.get("cross_attn_norm", True):
            raise CheckpointError("Uni-ViGU needs cross_attn_norm true", file=source, key="cross_attn_norm")
        for unsupported in ("image_dim", "added_kv_proj_dim"):
            if wan.get(unsupported) is not None:
                raise CheckpointError(
                    "image-conditioned Wan models are not supported; use a text-to-video Wan2.1 folder",
                    file=source,
                    key=unsupported,
                )
        defaults = cls()
        return cls(
            num_attention_heads=wan.get("num_attention_heads", defaults.num_attention_heads),
            attention_head_dim=wan.get("attention_head_dim", defaults.attention_head_dim),
            num_layers=wan.get("num_layers", defaults.num_layers),
            ffn_dim=wan.get("ffn_dim", defaults.ffn_dim),
            in_channels=wan.get("in_channels", defaults.in_channels),
            out_channels=wan.get("out_channels") or wan.get("in_channels", defaults.out_channels),
            text_dim=wan.get("text_dim", defaults.text_dim),
            freq_dim=wan.get("freq_dim", defaults.freq_dim),
            vocab_size=vocab_size,
            patch_size=tuple(wan.get("patch_size", defaults.patch_size)),
            eps=wan.get("eps", defaults.eps),
            rope_max_seq_len=wan.get("rope_max_seq_len", defaults.rope_max_seq_len),
        )

    def to_wan_config(self) -> dict[str, Any]:
        """The matching diffusers ``WanTransformer3DModel`` config (for the plain-Wan comparison and export)."""
        return {
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "rope_max_seq_len": self.rope_max_seq_len,
        }


@dataclass(frozen=True)
class TextEncoderConfig:
    """A umT5 encoder built in code (used by presets without a Wan folder)."""

    d_model: int = 32
    d_kv: int = 8
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass(frozen=True)
class VAEConfig:
    """Keyword arguments of diffusers' ``AutoencoderKLWan`` for presets built in code."""

    base_dim: int = 16
    z_dim: int = 4
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    scale_factor_spatial: int = 8  # 2 ** len(temperal_downsample): diffusers reads it, never derives it

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoencoderKLWan`` (it wants lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class VaeTiling:
    """When and how the VAE encodes and decodes in overlapping spatial tiles (diffusers' ``enable_tiling``).

    Tiles bound the VAE's activation memory at large sizes, for some extra time. Neighbouring tiles
    overlap by ``tile - stride`` pixels and are blended linearly, so the result is close to, not equal
    to, an untiled pass. Sizes are in pixels, multiples of 8 (the VAE's spatial compression).
    """

    min_pixels: int = 1280 * 720
    """Tiles are used when ``height * width`` exceeds this (above 720p by default); 0: always."""
    tile: int = 256
    stride: int = 192

    def applies(self, height: int, width: int) -> bool:
        return height * width > self.min_pixels


@dataclass(frozen=True)
class SamplingDefaults:
    """What a call uses when the caller leaves a parameter out."""

    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    steps: int = 50
    guidance_scale: float = 5.0
    caption_tokens: int = 256
    max_caption_tokens: int = 256
    max_prompt_tokens: int = 256
    context_tokens: int = 512
    video_reuse: int = 50
    """Captioning's refresh interval: a full pass over the video every this many steps, text-only passes
    between (:mod:`model.video_reuse`); 1 is the exact sampler. Each preset sets its default steps: one
    full pass per caption, which kept the toy model's caption accuracy exactly at exact's (BENCHMARKS.md)."""


@dataclass(frozen=True)
class Preset:
    """A whole model: transformer architecture, how its text side and VAE are built, and defaults.

    ``text_encoder``/``vae`` are ``None`` for presets whose text encoder and VAE come from a Wan folder.
    """

    name: str
    transformer: UniViGUConfig
    defaults: SamplingDefaults
    text_encoder: TextEncoderConfig | None = None
    vae: VAEConfig | None = None
    description: str = ""


PRESETS: dict[str, Preset] = {
    "wan2.1-1.3b": Preset(
        name="wan2.1-1.3b",
        transformer=UniViGUConfig(),
        defaults=SamplingDefaults(),
        description="The released Uni-ViGU size (Wan2.1-T2V-1.3B plus the text branch); needs real weights.",
    ),
    "tiny": Preset(
        name="tiny",
        transformer=UniViGUConfig(
            num_attention_heads=2,
            attention_head_dim=32,
            num_layers=2,
            ffn_dim=128,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            vocab_size=0,  # set from the built-in word tokenizer when the preset is built
        ),
        defaults=SamplingDefaults(
            height=64,
            width=64,
            num_frames=17,
            fps=8,
            steps=8,
            guidance_scale=3.0,
            caption_tokens=24,
            max_caption_tokens=48,
            max_prompt_tokens=24,
            context_tokens=32,
            video_reuse=8,
        ),
        text_encoder=TextEncoderConfig(),
        vae=VAEConfig(),
        description="CPU-sized, randomly initialised; a whole job takes seconds. For tests and trying the API.",
    ),
    "toy": Preset(
        name="toy",
        transformer=UniViGUConfig(
            num_attention_heads=3,
            attention_head_dim=64,
            num_layers=4,
            ffn_dim=512,
            in_channels=8,
            out_channels=8,
            patch_size=(1, 4, 4),  # with the 4x VAE: a token covers 16x16 pixels, as in Wan
            text_dim=32,
            vocab_size=0,  # set from the built-in word tokenizer when the preset is built
        ),
        defaults=SamplingDefaults(
            height=64,
            width=64,
            num_frames=17,
            fps=8,
            steps=20,
            guidance_scale=3.0,
            caption_tokens=32,
            max_caption_tokens=32,
            max_prompt_tokens=16,
            context_tokens=16,
            video_reuse=20,
        ),
        text_encoder=TextEncoderConfig(),
        # 4x spatial compression (two downsampling stages, both also halving time): with Wan's 8x, a
        # 12-20 px object covered two latent pixels and the reconstructions lost its shape.
        vae=VAEConfig(z_dim=8, dim_mult=(1, 2, 2), temperal_downsample=(True, True), scale_factor_spatial=4),
        description="The toy-world size (hidden 192, 4 layers, a 4x VAE with 8 latent channels, 4x4 patches): what `univigu toyworld train` trains.",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`UnknownPresetError` lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)}", param="preset"
        ) from None
