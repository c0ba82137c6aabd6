"""One denoising step split across GPUs (model/parallel.py): the scaling on paper, and the run that measures it.

``paper`` computes, per step and per GPU, for each layout of 1, 2, 4 and 8 GPUs (guidance-parallel G x
sequence-parallel S) at a size of :data:`benchmarks.transformer_step.SIZES` (``real``: Wan2.1-1.3B at
480x832, 81 frames, ``Nv = 32760`` video tokens, ``Lc = 512``):

* FLOP per GPU, as model/parallel.py splits the pass: a guidance group takes ``B / G`` rows (all ``B`` when
  G does not divide the batch: a caption); each sequence rank takes ``1/S`` of the tokens for every
  projection and feed-forward and ``1/S`` of the heads for the attention over all tokens; the
  cross-attention's keys and values of the prompt, the embeddings and the heads are computed on every
  rank (the heads for all rows, on the gathered output);
* bytes: each Ulysses all-to-all (four per block: query, key, value before the attention, its output
  after) sends ``(S-1)/S`` of the rank's ``rows x S_local x D`` tensor; after the blocks each rank
  receives the other sequence ranks' tokens (padded to the longest share) and, with G = 2 and a guided
  batch, the other group's rows of the hidden state; bf16, 2 bytes a number;
* the expected time per step, ``FLOP / (peak x efficiency) + bytes / link`` with no overlap of compute and
  communication (diffusers' Ulysses waits for each all-to-all), and the speed-up over one GPU.

``measure`` times the transformer's step in one process (the baseline) or in every rank of a torchrun
group, random weights, and prints the paper's expectation next to it::

    python -m benchmarks.multi_gpu paper
    python -m benchmarks.multi_gpu measure --device cuda --size real
    torchrun --standalone --nproc-per-node 2 -m benchmarks.multi_gpu measure --device cuda --size real \\
        --guidance-parallel 2
    torchrun --standalone --nproc-per-node 8 -m benchmarks.multi_gpu measure --device cuda --size real \\
        --guidance-parallel 2 --sequence-parallel 4

The workloads are a guided text-to-video step (``B = 2``, a 32-token prompt, velocity only) and a
captioning step (``B = 1``, 256 text tokens, logits only); a joint step is a guided step with 256 text
tokens (1 % more work than text-to-video).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from benchmarks._cli import add_output_args, add_run_args, new_parser
from benchmarks._timing import markdown_table, median, peak_memory, time_interleaved, write_json
from benchmarks.transformer_step import DTYPES, SIZES, BenchSize, forward_flops, video_tokens
from model.network import UniViGUTransformer
from model.parallel import ParallelPlan, check_degrees, split_sizes
from model.pipeline import cast_transformer

BYTES_PER_NUMBER = 2  # bf16
ALL_TO_ALLS_PER_BLOCK = 4  # query, key, value, output
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4), (1, 8)]
"""(guidance, sequence) on 1, 2, 4 and 8 GPUs; those the model's head count does not allow are marked."""


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # B: 2 for a guided pass
    text_tokens: int  # L
    logits: bool  # the text head runs (captioning); else the video head


WORKLOADS = [
    Workload("text-to-video, guided", batch=2, text_tokens=32, logits=False),
    Workload("captioning", batch=1, text_tokens=256, logits=True),
]


def rows_per_group(workload: Workload, guidance: int) -> int:
    return workload.batch // guidance if workload.batch % guidance == 0 else workload.batch


def flops_per_gpu(size: BenchSize, workload: Workload, guidance: int, sequence: int) -> float:
    """One step's FLOP on each GPU of a ``guidance x sequence`` group (module docstring)."""
    config, lc, length = size.config, size.context_tokens, workload.text_tokens
    per_row = forward_flops(config, size.latent, length, lc)["total"]
    once = forward_flops(dataclasses.replace(config, num_layers=0), size.latent, length, lc)["total"]
    prompt_keys = config.num_layers * 4 * lc * config.hidden_size**2  # every sequence rank projects them
    split = per_row - once - prompt_keys
    return rows_per_group(workload, guidance) * (split / sequence + prompt_keys) + workload.batch * once


def bytes_per_gpu(size: BenchSize, workload: Workload, guidance: int, sequence: int) -> dict[str, float]:
    """Bytes each GPU sends per all-to-all, and receives per step in all-to-alls and in the gathers."""
    d, layers = size.config.hidden_size, size.config.num_layers
    nv, length = video_tokens(size.config, size.latent), workload.text_tokens
    rows = rows_per_group(workload, guidance)
    longest = split_sizes(nv, sequence)[0] + split_sizes(length, sequence)[0]
    all_to_all = rows * longest * d * BYTES_PER_NUMBER * (sequence - 1) / sequence
    sequence_gather = (sequence - 1) * rows * longest * d * BYTES_PER_NUMBER
    guidance_gather = (workload.batch - rows) * (nv + length) * d * BYTES_PER_NUMBER
    return {
        "all_to_all": all_to_all,
        "step_all_to_all": all_to_all * ALL_TO_ALLS_PER_BLOCK * layers,
        "gathers": sequence_gather + guidance_gather,
    }


def paper_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = SIZES[args.size]
    heads = size.config.num_attention_heads
    rows = []
    for workload in WORKLOADS:
        single = flops_per_gpu(size, workload, 1, 1) / (args.peak_tflops * 1e12 * args.efficiency)
        for guidance, sequence in LAYOUTS:
            row: dict[str, Any] = {"workload": workload.name, "gpus": guidance * sequence}
            row["layout"] = f"{guidance} x {sequence}"
            if heads % sequence:
                row["note"] = f"S = {sequence} does not divide the {heads} heads"
                rows.append(row)
                continue
            flop = flops_per_gpu(size, workload, guidance, sequence)
            moved = bytes_per_gpu(size, workload, guidance, sequence)
            compute_s = flop / (args.peak_tflops * 1e12 * args.efficiency)
            link_s = (moved["step_all_to_all"] + moved["gathers"]) / (args.link_gbytes * 1e9)
            row |= {
                "tflop_per_gpu": flop / 1e12,
                "all_to_all_mib": moved["all_to_all"] / 2**20,
                "step_all_to_all_gib": moved["step_all_to_all"] / 2**30,
                "gathers_mib": moved["gathers"] / 2**20,
                "compute_ms": compute_s * 1e3,
                "link_ms": link_s * 1e3,
                "step_s": compute_s + link_s,
                "speedup": single / (compute_s + link_s),
            }
            rows.append(row)
    return rows


PAPER_TABLE = {
    "workload": "step",
    "gpus": "GPUs",
    "layout": "G x S",
    "tflop_per_gpu": "TFLOP per GPU",
    "all_to_all_mib": "MiB sent per all-to-all",
    "step_all_to_all_gib": "GiB sent in all-to-alls per step",
    "gathers_mib": "MiB received in gathers per step",
    "compute_ms": "compute ms",
    "link_ms": "link ms",
    "step_s": "expected s/step",
    "speedup": "speed-up",
    "note": "note",
}


def paper(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "multi_gpu_paper",
        "size": args.size,
        "peak_tflops": args.peak_tflops,
        "efficiency": args.efficiency,
        "link_gbytes": args.link_gbytes,
        "rows": paper_rows(args),
    }


def join_group(args: argparse.Namespace, device: torch.device) -> ParallelPlan | None:
    """The plan of the torchrun group this process belongs to (an initialised one is reused); None alone."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return None
    sequence = args.sequence_parallel or dist.get_world_size() // args.guidance_parallel
    return ParallelPlan.build(args.guidance_parallel, sequence, device)


def step_call(
    network: UniViGUTransformer,
    size: BenchSize,
    workload: Workload,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> Callable[[], Any]:
    """One step of ``workload`` on random inputs (the same on every rank: ``generator`` is seeded alike)."""
    config, device, b = size.config, network.device, workload.batch
    x_v = torch.randn(1, config.in_channels, *size.latent, generator=generator, device=device)
    x_v = x_v.to(dtype).expand(b, -1, -1, -1, -1)  # (B, C, f, h, w): both passes of guidance see one latent
    x_t = torch.randint(0, config.vocab_size, (1, workload.text_tokens), generator=generator, device=device)
    cond = torch.randn(b, size.context_tokens, config.text_dim, generator=generator, device=device).to(dtype)
    time = torch.full((b,), 500.0, device=device)
    return functools.partial(
        network,
        x_v,
        x_t.expand(b, -1),
        time,
        time,
        cond,
        compute_velocity=not workload.logits,
        compute_logits=workload.logits,
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time each workload's step on this process or its group; rank 0's result."""
    device = torch.device(args.device)
    plan = join_group(args, device)
    if plan is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    size = SIZES[args.size]
    config = size.config
    torch.manual_seed(args.seed)  # the same weights on every rank
    with torch.device(device):
        network = cast_transformer(UniViGUTransformer(config), device, dtype)
    guidance, sequence = (plan.guidance, plan.sequence) if plan else (1, 1)
    check_degrees(guidance, sequence, config.num_attention_heads)
    network.set_attention_backend(args.attention_backend, context_parallel=sequence > 1)
    if plan is not None:
        network.enable_parallelism(plan)

    generator = torch.Generator(device).manual_seed(args.seed)
    rows = []
    with torch.inference_mode():
        for workload in WORKLOADS:
            step = step_call(network, size, workload, generator, dtype)
            samples = time_interleaved({"step": step}, device, repeats=args.repeats, warmup=args.warmup)[
                "step"
            ]
            seconds = median(samples["wall"])
            flop = flops_per_gpu(size, workload, guidance, sequence)
            rows.append(
                {
                    "workload": workload.name,
                    "layout": f"{guidance} x {sequence}",
                    "step_s": seconds,
                    "tflops_per_gpu": flop / seconds / 1e12,
                    "peak_mib": (peak_memory(step, device) or 0) / 2**20,
                    "samples": samples,
                }
            )
    return {
        "benchmark": "multi_gpu_measure",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_backend": network.attention_backend,
        "guidance_parallel": guidance,
        "sequence_parallel": sequence,
        "rows": rows,
    }


MEASURE_TABLE = {
    "workload": "step",
    "layout": "G x S",
    "step_s": "s/step",
    "tflops_per_gpu": "TFLOP/s per GPU",
    "peak_mib": "peak MiB",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    commands = p.add_subparsers(dest="command", required=True)
    on_paper = commands.add_parser("paper", help="the expected scaling, from FLOP and bytes")
    on_paper.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    on_paper.add_argument("--efficiency", type=float, default=0.5, help="fraction of the peak a step reaches")
    on_paper.add_argument(
        "--link-gbytes",
        type=float,
        default=300.0,
        help="GB/s each GPU sends and receives in NCCL's all-to-all and all-gather (NVLink 4: 450 per "
        "direction; collectives reach about two thirds of it)",
    )
    on_measure = commands.add_parser("measure", help="time the step here, alone or under torchrun")
    on_measure.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    on_measure.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: float32 on the CPU, bfloat16 on CUDA"
    )
    on_measure.add_argument("--guidance-parallel", type=int, default=1, choices=[1, 2])
    on_measure.add_argument("--sequence-parallel", type=int, help="default: the rest of the group")
    on_measure.add_argument("--attention-backend", default="auto")
    add_run_args(on_measure, repeats=5)
    for command in (on_paper, on_measure):
        command.add_argument("--size", choices=sorted(SIZES), default="real")
        add_output_args(command)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = paper(args) if args.command == "paper" else measure(args)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    write_json(result, args.json)
    header = {key: value for key, value in result.items() if key != "rows"}
    print(header)
    print(markdown_table(result["rows"], PAPER_TABLE if args.command == "paper" else MEASURE_TABLE))


if __name__ == "__main__":
    main()
