"""Timing and memory helpers shared by the benchmark scripts.

Timings are taken interleaved (A, B, B, A, A, B, ...) so that load from other processes on a shared
machine hits every contender alike; scripts report medians and the median of per-round ratios.
Every call records its wall time (CUDA events on CUDA, ``time.perf_counter`` on the CPU) and the CPU
time of this process (``time.process_time``). On a busy shared CPU the CPU time of a single-threaded
run (``OMP_NUM_THREADS=1``) does not count the time the process waited for a core, so its ratios are
steadier than wall-clock ones.

Peak memory of one call is the extra memory it needs beyond what was allocated before it:
``torch.cuda.max_memory_allocated`` on CUDA; on Linux CPUs the growth of the resident set's high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim`` has returned freed heap
pages), which counts every page the call touches, torch's or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call of ``fn``, all its device work included."""
    cpu_start = time.process_time()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, time.process_time() - cpu_start
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin, time.process_time() - cpu_start


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, *, repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """``{name: {"wall": [s per round], "cpu": [s per round]}}``: after ``warmup`` untimed calls each,
    ``repeats`` rounds in which every function runs once, the order reversed every other round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            wall, cpu = time_call(fns[name], device)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    """Median over rounds of ``numerator[i] / denominator[i]`` (robust to load that drifts between rounds)
    and its distribution-free 95 % confidence interval ``[low, high]`` (order statistics of the ratios)."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    count = len(ratios)
    rank = max(0, int((count - 1.96 * math.sqrt(count)) / 2))
    return statistics.median(ratios), [ratios[rank], ratios[count - 1 - rank]]


def _status_kib(field: str) -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_freed_heap() -> None:
    gc.collect()
    # Without glibc, freed pages may stay resident and hide some of the next call's growth.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes that one call of ``fn`` needs beyond what was in use before it; None if unmeasurable."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not PROC_CLEAR_REFS.exists():
        return None
    _release_freed_heap()
    PROC_CLEAR_REFS.write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def parse_int_list(text: str) -> list[int]:
    """``"0,256"`` -> ``[0, 256]`` (argparse type)."""
    return [int(part) for part in text.split(",") if part.strip()]


def write_json(result: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A Markdown table of ``rows`` with ``columns = {key: header}``; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return "[" + ", ".join(cell(v) for v in value) + "]"
        return str(value)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20
