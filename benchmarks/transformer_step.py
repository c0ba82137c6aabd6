"""One transformer step: our ``UniViGUTransformer`` against diffusers' ``WanTransformer3DModel``.

Both networks hold the same random weights (ours is built from the Wan state dict by
``wan_to_univigu``), see the same video latent ``(B, 16, f, h, w)``, time and umT5 condition
``(B, Lc, text_dim)``, run in the same dtype with the same attention backend, and are timed
interleaved (wall time, and on the CPU also process CPU time: see ``benchmarks/_timing.py``). Each is
cast as it is served: diffusers as ``from_pretrained(torch_dtype=...)`` does (its
``_keep_in_fp32_modules`` stay float32), ours by the pipeline's own cast. Ours runs once per
``--text-tokens`` value ``L``: with ``L = 0`` it does exactly diffusers' work (the velocities must
agree); with ``L > 0`` it also carries ``L`` text tokens through every block and computes both heads
(a joint-mode pass), so its ratio to diffusers is the price of the text stream. With
``--masked-prompt N`` only the first ``N`` text tokens are real and the rest is padding under a key
mask, as in text-to-video (a mask rules out flash-attention kernels).

FLOP count (``forward_flops``), ``2 * m * n * k`` per matmul, elementwise work (norms, rotary, GELU,
softmax) not counted; ``S = Nv + L`` tokens, ``Nv = f*h*w / (pt*ph*pw)``, ``D`` hidden, ``F`` FFN width,
``Lc`` condition tokens, ``N`` blocks, ``V`` vocabulary, ``P = C * pt*ph*pw``:

* per block: self-attention projections ``8 S D²``, its scores and weighted sum ``4 S² D``, cross-attention
  query/output ``4 S D²``, keys/values ``4 Lc D²``, scores and sum ``4 S Lc D``, FFN ``4 S D F``
  (video tokens through ``ffn``, text tokens through ``ffn_t``);
* once: patch embedding and video head ``2 Nv D P`` each, condition projection ``2 Lc D (text_dim + D)``,
  time embeddings ``2 (freq_dim D + 7 D²)`` per modality (diffusers: one), text head ``2 L D V``.

For Wan2.1-1.3B at 480x832, 81 frames (latent 21x60x104, ``Nv = 32760``), ``Lc = 512``, ``L = 0`` this is
283.0 TFLOP per forward pass, of which attention scores and sums are 200.9 TFLOP (71 %).

    python -m benchmarks.transformer_step --device cpu --size small --repeats 7
    python -m benchmarks.transformer_step --device cuda --size real --dtype bfloat16 --repeats 10

The fraction of peak is taken against the measured matrix peak of the device in the same dtype: the
best of a few ``n x n @ n x n`` products (``--peak-size``; 8192 suits an H200).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import WanTransformer3DModel

from benchmarks._cli import add_output_args, add_run_args, new_parser, run_main
from benchmarks._timing import median, mib, paired_ratio, parse_int_list, peak_memory, time_interleaved
from model.checkpoint import build_transformer, wan_to_univigu
from model.config import UniViGUConfig
from model.network import UniViGUTransformer
from model.pipeline import cast_transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchSize:
    """A transformer architecture and the input it is timed on."""

    config: UniViGUConfig
    latent: tuple[int, int, int]  # (f, h, w) of the VAE latent
    context_tokens: int  # Lc


SIZES = {
    "tiny": BenchSize(
        UniViGUConfig(
            num_attention_heads=2,
            attention_head_dim=32,
            num_layers=2,
            ffn_dim=128,
            text_dim=32,
            vocab_size=64,
        ),
        latent=(3, 8, 8),
        context_tokens=16,
    ),
    "small": BenchSize(
        UniViGUConfig(
            num_attention_heads=4,
            attention_head_dim=64,
            num_layers=2,
            ffn_dim=1024,
            text_dim=256,
            vocab_size=4096,
        ),
        latent=(3, 30, 52),
        context_tokens=64,
    ),
    "real": BenchSize(UniViGUConfig(), latent=(21, 60, 104), context_tokens=512),
}
"""``real`` is Wan2.1-1.3B with the umT5 vocabulary at 480x832, 81 frames."""


def add_device_args(
    parser: argparse.ArgumentParser,
    *,
    size_help: str | None = None,
    dtype_help: str = "default: float32 on the CPU, bfloat16 on CUDA",
) -> None:
    """``--device`` (default cpu), ``--size`` (of :data:`SIZES`, default small), ``--dtype`` (of
    :data:`DTYPES`; unset: as served, float32 on the CPU and bfloat16 on CUDA)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help=size_help)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=dtype_help)


def device_dtype_size(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, BenchSize]:
    """What ``--device``, ``--dtype`` and ``--size`` (see :func:`add_device_args`) ask for."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    return device, dtype, SIZES[args.size]


def video_tokens(config: UniViGUConfig, latent: tuple[int, int, int]) -> int:
    return math.prod(n // p for n, p in zip(latent, config.patch_size, strict=True))


def _block_flops(config: UniViGUConfig, queries: int, keys: int, context_tokens: int) -> tuple[int, int]:
    """``(all, attention scores and sums)`` FLOPs of one block whose ``queries`` tokens run and attend over
    ``keys`` self-attention keys (formula in the module docstring; a full pass has ``queries = keys = S``)."""
    d, f, lc = config.hidden_size, config.ffn_dim, context_tokens
    attention = 4 * queries * keys * d + 4 * queries * lc * d
    return 12 * queries * d * d + 4 * lc * d * d + 4 * queries * d * f + attention, attention


def _time_embedding_flops(config: UniViGUConfig) -> int:
    """One modality's sinusoidal features -> ``temb`` -> the ``(6, D)`` modulation."""
    d = config.hidden_size
    return 2 * (config.freq_dim * d + 7 * d * d)


def forward_flops(
    config: UniViGUConfig,
    latent: tuple[int, int, int],
    text_tokens: int,
    context_tokens: int,
    *,
    batch: int = 1,
    text_stream: bool = True,
    video_head: bool = True,
) -> dict[str, float]:
    """``{"total", "attention"}`` FLOPs of one forward pass (formula in the module docstring).

    Our network (``text_stream``) embeds both times even when ``L = 0``; diffusers' Wan is
    ``text_tokens=0, text_stream=False``. A captioning pass skips the video head (``video_head=False``).
    """
    d = config.hidden_size
    nv = video_tokens(config, latent)
    s, lc = nv + text_tokens, context_tokens
    patch = config.in_channels * math.prod(config.patch_size)
    block, attention = _block_flops(config, s, s, lc)
    once = (
        2 * nv * d * patch * (2 if video_head else 1)
        + 2 * lc * d * (config.text_dim + d)
        + (2 if text_stream else 1) * _time_embedding_flops(config)
        + 2 * text_tokens * d * config.vocab_size
    )
    return {
        "total": float(batch * (config.num_layers * block + once)),
        "attention": float(batch * config.num_layers * attention),
    }


def text_pass_flops(
    config: UniViGUConfig,
    latent: tuple[int, int, int],
    text_tokens: int,
    context_tokens: int,
    *,
    batch: int = 1,
) -> float:
    """FLOPs of one text-only pass (``UniViGUTransformer.forward_text``): the ``L`` text tokens through
    every block, their queries over the ``Nv + L`` kept video and current text keys, the condition
    projection, the text time embedding and the text head."""
    d, lc = config.hidden_size, context_tokens
    block, _ = _block_flops(config, text_tokens, video_tokens(config, latent) + text_tokens, lc)
    once = (
        2 * lc * d * (config.text_dim + d)
        + _time_embedding_flops(config)
        + 2 * text_tokens * d * config.vocab_size
    )
    return float(batch * (config.num_layers * block + once))


def cast_like_from_pretrained(wan: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast as ``from_pretrained(torch_dtype=dtype)`` does: ``_keep_in_fp32_modules`` stay float32."""
    keep = set(wan._keep_in_fp32_modules)
    for name, tensor in [*wan.named_parameters(), *wan.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return wan.eval().requires_grad_(False)


def build_pair(
    size: BenchSize, device: torch.device, dtype: torch.dtype, backend: str, seed: int
) -> tuple[WanTransformer3DModel, UniViGUTransformer]:
    """Diffusers' Wan with random weights and our network holding the same weights, both on ``device``,
    each cast the way it is served (diffusers' ``from_pretrained``, our pipeline)."""
    config = size.config
    torch.manual_seed(seed)
    with torch.device(device):
        wan = WanTransformer3DModel(**config.to_wan_config())
    state = wan_to_univigu(wan.state_dict(), config, torch.Generator().manual_seed(seed))
    ours = cast_transformer(build_transformer(config, state, "benchmark"), device, dtype)
    del state
    if backend != "native":  # both default to it
        wan.set_attention_backend(backend)
        ours.set_attention_backend(backend)
    return cast_like_from_pretrained(wan, dtype), ours


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The device's matrix peak in TFLOP/s: the fastest of ``repeats`` ``(n, n) @ (n, n)`` products."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    seconds = time_interleaved({"mm": lambda: a @ b}, device, repeats=repeats)["mm"]["wall"]
    return 2 * size**3 / min(seconds) / 1e12


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both networks, time them per text length; a JSON-ready dict with one row per length."""
    device, dtype, size = device_dtype_size(args)
    config = size.config
    wan, ours = build_pair(size, device, dtype, args.attention_backend, args.seed)

    generator = torch.Generator(device).manual_seed(args.seed)
    x_v = torch.randn(args.batch, config.in_channels, *size.latent, generator=generator, device=device)
    x_v = x_v.to(dtype)  # (B, C, f, h, w)
    cond = torch.randn(
        args.batch, size.context_tokens, config.text_dim, generator=generator, device=device
    ).to(dtype)  # (B, Lc, text_dim)
    time = torch.full((args.batch,), 500.0, device=device)  # (B,)

    def diffusers_step() -> torch.Tensor:
        return wan(hidden_states=x_v, timestep=time, encoder_hidden_states=cond, return_dict=False)[0]

    diffusers_flops = forward_flops(
        config, size.latent, 0, size.context_tokens, batch=args.batch, text_stream=False
    )
    rows = []
    with torch.inference_mode():
        for length in args.text_tokens:
            x_t = torch.randint(
                0, config.vocab_size, (args.batch, length), generator=generator, device=device
            )
            real = length if args.masked_prompt is None else min(args.masked_prompt, length)
            mask = (torch.arange(length, device=device) < real).expand(args.batch, -1)  # (B, L)

            def our_step(x_t: torch.Tensor = x_t, mask: torch.Tensor = mask) -> torch.Tensor:
                return ours(x_v, x_t, time, time, cond, mask, compute_logits=x_t.shape[1] > 0)[0]

            difference = None
            if length == 0:
                difference = (our_step().float() - diffusers_step().float()).abs().max().item()
            samples = time_interleaved(
                {"ours": our_step, "diffusers": diffusers_step},
                device,
                repeats=args.repeats,
                warmup=args.warmup,
            )
            ours_times, wan_times = samples["ours"], samples["diffusers"]
            our_flops = forward_flops(config, size.latent, length, size.context_tokens, batch=args.batch)
            ours_s, diffusers_s = median(ours_times["wall"]), median(wan_times["wall"])
            ratio, ratio_ci = paired_ratio(ours_times["wall"], wan_times["wall"])
            cpu_ratio, cpu_ratio_ci = paired_ratio(ours_times["cpu"], wan_times["cpu"])
            on_cpu = device.type == "cpu"  # on CUDA the host's CPU time says nothing about the step
            rows.append(
                {
                    "text_tokens": length,
                    "real_text_tokens": real,
                    "ours_s": ours_s,
                    "diffusers_s": diffusers_s,
                    "ratio": ratio,
                    "ratio_ci": ratio_ci,
                    "cpu_time_ratio": cpu_ratio if on_cpu else None,
                    "cpu_time_ratio_ci": cpu_ratio_ci if on_cpu else None,
                    "flop_ratio": our_flops["total"] / diffusers_flops["total"],
                    "ours_tflop": our_flops["total"] / 1e12,
                    "diffusers_tflop": diffusers_flops["total"] / 1e12,
                    "ours_tflops": our_flops["total"] / ours_s / 1e12,
                    "diffusers_tflops": diffusers_flops["total"] / diffusers_s / 1e12,
                    "ours_peak_bytes": peak_memory(our_step, device),
                    "diffusers_peak_bytes": peak_memory(diffusers_step, device),
                    "max_abs_diff": difference,
                    "ours_samples": ours_times,
                    "diffusers_samples": wan_times,
                }
            )
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peak_tflops = matmul_peak_tflops(device, dtype, peak_size)
    for row in rows:
        row["ours_peak_mib"] = mib(row["ours_peak_bytes"])
        row["diffusers_peak_mib"] = mib(row["diffusers_peak_bytes"])
        row["ours_fraction_of_peak"] = row["ours_tflops"] / peak_tflops
        row["diffusers_fraction_of_peak"] = row["diffusers_tflops"] / peak_tflops
    return {
        "benchmark": "transformer_step",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_backend": args.attention_backend,
        "matmul_peak_tflops": peak_tflops,
        "matmul_peak_size": peak_size,
        "batch": args.batch,
        "latent": list(size.latent),
        "video_tokens": video_tokens(config, size.latent),
        "context_tokens": size.context_tokens,
        "config": config.to_dict(),
        "repeats": args.repeats,
        "ours_weight_bytes": weight_bytes(ours),
        "diffusers_weight_bytes": weight_bytes(wan),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "rows": rows,
    }


TABLE = {
    "text_tokens": "text tokens",
    "real_text_tokens": "unmasked",
    "ours_s": "ours s/step",
    "diffusers_s": "diffusers s/step",
    "ratio": "ours/diffusers (wall)",
    "ratio_ci": "95% CI",
    "cpu_time_ratio": "ours/diffusers (CPU time)",
    "cpu_time_ratio_ci": "95% CI",
    "flop_ratio": "ours/diffusers (FLOP)",
    "ours_tflop": "ours TFLOP",
    "ours_tflops": "ours TFLOP/s",
    "diffusers_tflops": "diffusers TFLOP/s",
    "ours_fraction_of_peak": "ours / matmul peak",
    "diffusers_fraction_of_peak": "diffusers / matmul peak",
    "ours_peak_mib": "ours peak MiB",
    "diffusers_peak_mib": "diffusers peak MiB",
    "max_abs_diff": "max abs diff (velocity)",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_device_args(p)
    add_run_args(
        p,
        repeats=5,
        repeats_help="timed rounds (each runs both networks once)",
        warmup_help="untimed calls of each network first",
    )
    p.add_argument("--text-tokens", type=parse_int_list, default=[0, 256], help="comma-separated L values")
    p.add_argument(
        "--masked-prompt",
        type=int,
        metavar="N",
        help="only the first N text tokens are real, the rest padding under a key mask (as in t2v)",
    )
    p.add_argument("--batch", type=int, default=1, help="B (a guided step runs B=2)")
    p.add_argument("--attention-backend", default="native", help="diffusers dispatch backend for both")
    p.add_argument("--peak-size", type=int, help="n of the peak matmul (default 8192 on CUDA, 2048 on CPU)")
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['device_name']} ({result['threads']} threads), size {result['size']}, {result['dtype']}, "
        f"batch {result['batch']}, latent {result['latent']} ({result['video_tokens']} video tokens), "
        f"Lc {result['context_tokens']}, {result['repeats']} rounds, "
        f"attention {result['attention_backend']}; "
        f"matmul peak {result['matmul_peak_tflops']:.4g} TFLOP/s (n = {result['matmul_peak_size']})"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
