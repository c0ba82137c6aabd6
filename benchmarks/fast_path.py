"""Our transformer step in its fast-path variants, timed side by side in one run.

Variants (``--variants``, the first is the reference of every ratio and difference):

* ``eager``: the plain network with attention ``native`` (torch's SDPA, which picks its flash,
  memory-efficient or math kernel itself);
* ``math``: attention ``_native_math``, SDPA's reference math kernel only;
* ``auto``: attention ``auto`` (FlashAttention 3 or 2, else SageAttention, where installed on CUDA;
  ``native`` elsewhere);
* ``compiled``: ``native`` attention and the blocks compiled (``compile_blocks``, static shapes) with
  ``--compile-backend``.

Each variant is its own copy of the same random weights, cast as the pipeline serves them, and sees
the same input: by default a guided text-to-video step (batch 2, a 20-token prompt, no text head).
The first call of each variant is timed on its own (for ``compiled`` it includes compilation); then
``--warmup`` untimed calls and ``--repeats`` interleaved rounds (see ``benchmarks/_timing.py``).
The velocity of every variant is compared with the reference's (max abs difference).

    python -m benchmarks.fast_path --size small --variants eager,math,compiled --repeats 21
    python -m benchmarks.fast_path --device cuda --size real --variants eager,auto,compiled --repeats 10
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from benchmarks._cli import add_output_args, add_run_args, new_parser, run_main
from benchmarks._timing import median, paired_ratio, time_call, time_interleaved
from benchmarks.transformer_step import BenchSize, add_device_args, device_dtype_size
from model.network import UniViGUTransformer
from model.pipeline import cast_transformer

VARIANTS = {
    "eager": ("native", False),
    "math": ("_native_math", False),
    "auto": ("auto", False),
    "compiled": ("native", True),
}
"""``name: (attention backend, compiled blocks)``."""


def build_variant(
    base: UniViGUTransformer, name: str, device: torch.device, dtype: torch.dtype, compile_backend: str
) -> UniViGUTransformer:
    """A copy of ``base`` on ``device``, cast for serving, set up as variant ``name``."""
    backend, compiled = VARIANTS[name]
    network = cast_transformer(copy.deepcopy(base), device, dtype)
    network.set_attention_backend(backend)
    if compiled:
        network.compile_blocks(compile_backend)
    return network


def step_inputs(
    size: BenchSize, batch: int, text_tokens: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """``(x_v (B, C, f, h, w), x_t (B, L), time (B,), cond (B, Lc, text_dim))``."""
    config = size.config
    generator = torch.Generator(device).manual_seed(seed)
    x_v = torch.randn(batch, config.in_channels, *size.latent, generator=generator, device=device).to(dtype)
    x_t = torch.randint(0, config.vocab_size, (batch, text_tokens), generator=generator, device=device)
    cond = torch.randn(batch, size.context_tokens, config.text_dim, generator=generator, device=device)
    return x_v, x_t, torch.full((batch,), 500.0, device=device), cond.to(dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build every variant, time them interleaved; a JSON-ready dict with one row per variant."""
    device, dtype, size = device_dtype_size(args)
    torch.manual_seed(args.seed)
    base = UniViGUTransformer(size.config)
    networks = {
        name: build_variant(base, name, device, dtype, args.compile_backend) for name in args.variants
    }
    x_v, x_t, time, cond = step_inputs(size, args.batch, args.text_tokens, device, dtype, args.seed)

    def stepper(network: UniViGUTransformer) -> Any:
        return lambda: network(x_v, x_t, time, time, cond, compute_logits=False)[0]

    steps = {name: stepper(network) for name, network in networks.items()}
    reference_name = args.variants[0]
    with torch.inference_mode():
        first_call = {name: time_call(step, device)[0] for name, step in steps.items()}
        reference = steps[reference_name]().float()
        difference = {name: (step().float() - reference).abs().max().item() for name, step in steps.items()}
        samples = time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup)
    rows = []
    for name, network in networks.items():
        ratio, ratio_ci = paired_ratio(samples[name]["wall"], samples[reference_name]["wall"])
        cpu_ratio, cpu_ratio_ci = paired_ratio(samples[name]["cpu"], samples[reference_name]["cpu"])
        on_cpu = device.type == "cpu"
        rows.append(
            {
                "variant": name,
                "attention": network.attention_backend,
                "compiled": network.compiled,
                "first_call_s": first_call[name],
                "step_s": median(samples[name]["wall"]),
                "ratio": ratio,
                "ratio_ci": ratio_ci,
                "cpu_time_ratio": cpu_ratio if on_cpu else None,
                "cpu_time_ratio_ci": cpu_ratio_ci if on_cpu else None,
                "max_abs_diff": difference[name],
                "samples": samples[name],
            }
        )
    return {
        "benchmark": "fast_path",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "text_tokens": args.text_tokens,
        "latent": list(size.latent),
        "compile_backend": args.compile_backend,
        "reference": reference_name,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }


TABLE = {
    "variant": "variant",
    "attention": "attention",
    "compiled": "compiled",
    "first_call_s": "first call s",
    "step_s": "s/step",
    "ratio": "/ reference (wall)",
    "ratio_ci": "95% CI",
    "cpu_time_ratio": "/ reference (CPU time)",
    "cpu_time_ratio_ci": "95% CI",
    "max_abs_diff": "max abs diff (velocity)",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_device_args(p)
    p.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=["eager", "math", "compiled"],
        help=f"comma-separated, the first is the reference; from {sorted(VARIANTS)}",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled'")
    add_run_args(
        p,
        repeats=5,
        repeats_help="timed rounds (each runs every variant once)",
        warmup_help="untimed calls of each variant after the first",
    )
    p.add_argument("--batch", type=int, default=2, help="B (2: a guided step)")
    p.add_argument("--text-tokens", type=int, default=20, help="L, the prompt in the text stream")
    add_output_args(p)
    return p


def check_variants(args: argparse.Namespace) -> None:
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['device_name']} ({result['threads']} threads), size {result['size']}, {result['dtype']}, "
        f"batch {result['batch']}, L {result['text_tokens']}, latent {result['latent']}, "
        f"{result['repeats']} rounds, compile backend {result['compile_backend']}; "
        f"reference {result['reference']}"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE, check=check_variants)


if __name__ == "__main__":
    main()
