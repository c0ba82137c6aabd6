"""The captioning text update: our ``MixturePathTextSampler.step`` against the authors' naive solver step.

Both take logits ``(B, L, V)`` and tokens ``(B, L)`` and sample the same distribution (spec §5): every
position draws ``x1 ~ softmax(logits)`` and, when ``x1`` differs from its token, jumps to it with
probability ``1 - exp(-h * kappa'(t) / (1 - kappa(t)))``. :func:`naive_mixture_step` does it the way the
authors' solver does, with one-hot ``(B, L, V)`` float64 rate tensors; ours never builds them.

Each update is timed interleaved (wall and process CPU time, see ``benchmarks/_timing.py``) with a
captioning forward pass of our transformer (``--size``, with the vocabulary set to ``V``; clean video,
``L`` text tokens, logits only), so the table also gives the share of a captioning step (forward +
update) spent in the update. The update is timed at a middle step (``--index``): the last step skips
the jump and is cheaper for both.

    python -m benchmarks.caption_sampler --device cpu --size small --repeats 5
    python -m benchmarks.caption_sampler --device cuda --size real --repeats 10
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._cli import add_output_args, add_run_args, new_parser, run_main
from benchmarks._timing import median, mib, peak_memory, time_interleaved
from benchmarks.transformer_step import add_device_args, device_dtype_size
from model.config import UMT5_VOCAB_SIZE
from model.network import UniViGUTransformer
from model.pipeline import cast_transformer
from model.samplers import MixturePathTextSampler


def naive_mixture_step(
    logits: torch.Tensor,
    index: int,
    steps: int,
    tokens: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The authors' Euler step on the mixture path, ``kappa(t) = t``, ``t = index / steps``.

    ``logits (B, L, V)``, ``tokens (B, L)`` -> ``(B, L)``. The rate towards every vocabulary entry is
    ``kappa'/(1 - kappa) * (onehot(x1) - onehot(x_t))`` with the rate of staying set to 0; a position
    jumps with probability ``1 - exp(-h * intensity)`` to a draw from its rates; the last step takes ``x1``.
    """
    batch, length, vocab = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (B, L, V)
    x1 = torch.multinomial(probs.view(-1, vocab), 1, generator=generator).view(batch, length)
    if index == steps - 1:
        return x1
    t = torch.tensor(index / steps, dtype=torch.float64, device=logits.device)
    kappa, d_kappa, h = t, torch.ones_like(t), 1.0 / steps
    delta_1 = F.one_hot(x1, vocab).to(torch.float64)  # (B, L, V)
    delta_t = F.one_hot(tokens, vocab)  # (B, L, V)
    rate = d_kappa / (1 - kappa) * (delta_1 - delta_t)  # (B, L, V) float64
    rate = torch.where(delta_t.bool(), torch.zeros_like(rate), rate)  # no rate for staying
    intensity = rate.sum(dim=-1)  # (B, L)
    jump = torch.rand(tokens.shape, generator=generator, device=tokens.device) < 1 - torch.exp(-h * intensity)
    out = tokens.clone()
    if jump.any():
        out[jump] = torch.multinomial(rate[jump], 1, generator=generator).squeeze(-1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time and peak memory of both updates and of a captioning forward pass; a JSON-ready dict."""
    device, dtype, size = device_dtype_size(args)
    config = dataclasses.replace(size.config, vocab_size=args.vocab)
    torch.manual_seed(args.seed)
    with torch.device(device):
        transformer = UniViGUTransformer(config)
    transformer = cast_transformer(transformer, device, dtype)

    generator = torch.Generator(device).manual_seed(args.seed)
    logits = 4 * torch.randn(args.batch, args.length, args.vocab, generator=generator, device=device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator, device=device)
    latent = torch.randn(args.batch, config.in_channels, *size.latent, generator=generator, device=device)
    cond = torch.zeros(args.batch, size.context_tokens, config.text_dim, device=device, dtype=dtype)
    time_v = torch.zeros(args.batch, device=device)
    time_t = torch.full((args.batch,), 500.0, device=device)
    sampler = MixturePathTextSampler(args.steps)

    fns = {
        "naive": lambda: naive_mixture_step(logits, args.index, args.steps, tokens, generator),
        "ours": lambda: sampler.step(logits, args.index, tokens, generator),
        "forward": lambda: transformer(latent, tokens, time_v, time_t, cond, compute_velocity=False),
    }
    with torch.inference_mode():
        samples = time_interleaved(fns, device, repeats=args.repeats, warmup=args.warmup)
        peaks = {name: peak_memory(fn, device) for name, fn in fns.items()}
    forward = {clock: median(samples["forward"][clock]) for clock in ("wall", "cpu")}
    rows = []
    for name in ("naive", "ours"):
        update = {clock: median(samples[name][clock]) for clock in ("wall", "cpu")}
        rows.append(
            {
                "update": name,
                "update_s": update["wall"],
                "update_cpu_s": update["cpu"],
                "peak_bytes": peaks[name],
                "peak_mib": mib(peaks[name]),
                "forward_s": forward["wall"],
                "forward_cpu_s": forward["cpu"],
                "share_of_step": update["wall"] / (update["wall"] + forward["wall"]),
                "share_of_step_cpu": update["cpu"] / (update["cpu"] + forward["cpu"]),
                "samples": samples[name],
            }
        )
    return {
        "benchmark": "caption_sampler",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "length": args.length,
        "vocab": args.vocab,
        "steps": args.steps,
        "index": args.index,
        "repeats": args.repeats,
        "forward_samples": samples["forward"],
        "forward_peak_bytes": peaks["forward"],
        "logits_bytes": logits.numel() * logits.element_size(),
        "torch": torch.__version__,
        "rows": rows,
    }


TABLE = {
    "update": "text update",
    "update_s": "s/update",
    "update_cpu_s": "CPU s/update",
    "peak_mib": "peak extra MiB",
    "forward_s": "captioning forward s",
    "forward_cpu_s": "forward CPU s",
    "share_of_step": "update / (forward + update)",
    "share_of_step_cpu": "same, CPU time",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_device_args(
        p, size_help="transformer of the forward pass", dtype_help="of the transformer; default as in serving"
    )
    p.add_argument("--length", type=int, default=256, help="L, caption tokens")
    p.add_argument("--vocab", type=int, default=UMT5_VOCAB_SIZE, help="V")
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--steps", type=int, default=50, help="N, captioning steps")
    p.add_argument("--index", type=int, default=25, help="the step timed (0-based, not the last)")
    add_run_args(p, repeats=5)
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['device']} ({result['threads']} threads), B={result['batch']} L={result['length']} "
        f"V={result['vocab']}, step {result['index']} of {result['steps']}, forward: size {result['size']} "
        f"{result['dtype']}, {result['repeats']} rounds; logits {mib(result['logits_bytes']):.0f} MiB"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
