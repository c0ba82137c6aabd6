"""Caption jobs per minute of one worker: batched (``UNIVIGU_CAPTION_BATCH_SIZE``) against one at a time.

A redis-server of its own, the worker's job runner around one loaded pipeline, and rq's own worker loop
in this process. Each round queues ``--jobs`` caption jobs (toy clips rendered at the model's size,
seeds 0..N-1, recorded and enqueued as the gateway does) and works the queue empty in burst mode with
one batch size; every batch size of ``--batch-sizes`` runs once per round, the order reversed every
other round. Throughput is the jobs over the time from the first job's start to the last one's finish
(the job records' own timestamps); the speed-up is the median over rounds of batched over
one-at-a-time throughput, with its 95 % interval. The same by CPU time (this process and its ffmpeg
children over the worker loop), which a shared machine's load disturbs less. Every round checks that
each job's caption equals the caption the first batch size gave it.

    OMP_NUM_THREADS=1 nice python -m benchmarks.caption_batching --weights model/assets/toy --jobs 32 --batch-sizes 1,8 --repeats 3
    python -m benchmarks.caption_batching --device cuda --wan /path/to/Wan2.1-T2V-1.3B-Diffusers \\
        --checkpoint /path/to/univigu.pth --jobs 16 --batch-sizes 1,4,8 --repeats 2
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from benchmarks._cli import add_model_args, add_output_args, add_run_args, load_pipeline, new_parser, run_main
from benchmarks._timing import median, paired_ratio, parse_int_list
from model.media import write_mp4
from model.pipeline import UniViGUPipeline
from model.toyworld.make import scenes
from model.toyworld.world import FPS, render
from service.cli.redis_server import RedisServer
from service.contract.metrics import WorkerMetrics
from service.contract.queue import JobQueue
from service.contract.result_files import ResultFiles
from service.contract.schemas import JobStatus, JobType
from service.contract.store import JobStore
from worker import tasks
from worker.runner import CaptionBatching, JobRunner


def clips(count: int, directory: Path) -> list[Path]:
    """``count`` toy-world clips as MP4 files (64x64, 17 frames; a caption job fits them to its model)."""
    return [
        write_mp4(render(scene), directory / f"{index:04d}.mp4", fps=FPS)
        for index, scene in enumerate(scenes(count, held_out=False, seed=0))
    ]


def queue_captions(
    store: JobStore, queue: JobQueue, files: ResultFiles, videos: list[Path], params: dict[str, Any]
) -> list[str]:
    """One caption job per video (seed = its index), recorded and enqueued in one transaction each."""
    ids = []
    for seed, video in enumerate(videos):
        job_id = uuid.uuid4().hex
        files.upload(job_id).write_bytes(video.read_bytes())
        store.create(
            job_id,
            JobType.caption,
            {**params, "seed": seed},
            idempotency=None,
            idempotency_ttl_seconds=3600,
            enqueue=lambda pipeline, job_id=job_id: queue.enqueue(job_id, pipeline),
            admit=queue.admit,
            queue_key=queue.key,
        )
        ids.append(job_id)
    return ids


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the ffmpeg decoders)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def work_round(
    pipe: UniViGUPipeline,
    redis: Redis,
    files: ResultFiles,
    videos: list[Path],
    params: dict[str, Any],
    batch_size: int,
) -> tuple[float, float, list[str], WorkerMetrics]:
    """Queue the captions and work them off; ``(seconds from the first start to the last finish, CPU
    seconds of the worker loop, captions, metrics)``."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    store = JobStore(redis, prefix=name, result_ttl_seconds=3600, heartbeat_ttl_seconds=3600)
    queue = JobQueue(redis, name=name, max_length=len(videos), job_timeout_seconds=3600, ttl_seconds=3600)
    metrics = WorkerMetrics()
    runner = JobRunner(
        pipe,
        store=store,
        files=files,
        metrics=metrics,
        worker_name=name,
        finish_retry_seconds=5,
        batching=CaptionBatching(pipe, queue, max_size=batch_size),
    )
    ids = queue_captions(store, queue, files, videos, params)
    tasks.install(runner)
    cpu = cpu_seconds()
    worker = SimpleWorker([queue.rq], connection=redis, serializer=JSONSerializer)
    worker.work(burst=True, logging_level="WARNING")
    cpu = cpu_seconds() - cpu
    records = [store.get(job_id) for job_id in ids]
    failed = [record for record in records if record.status != JobStatus.succeeded]
    if failed:
        raise RuntimeError(f"{len(failed)} caption jobs did not succeed, e.g. {failed[0]}")
    first = min(record.started_at for record in records if record.started_at)
    last = max(record.finished_at for record in records if record.finished_at)
    captions = [record.result.caption or "" for record in records if record.result]
    return (last - first).total_seconds(), cpu, captions, metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every batch size once per round; a JSON-ready dict with one row per batch size."""
    pipe, model = load_pipeline(args)
    params = {
        key: value for key, value in (("steps", args.steps), ("video_reuse", args.video_reuse)) if value
    }
    seconds: dict[int, list[float]] = {size: [] for size in args.batch_sizes}
    cpu: dict[int, list[float]] = {size: [] for size in args.batch_sizes}
    batches: dict[int, float] = {}
    reference: list[str] | None = None
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "videos").mkdir()
        videos = clips(args.jobs, root / "videos")
        server = RedisServer(root / "redis")
        server.start()
        redis = Redis.from_url(server.url)
        files = ResultFiles(root / "results")
        files.ensure_dirs()
        try:
            for _ in range(args.warmup):
                work_round(pipe, redis, files, videos[:2], params, 1)
            for round_index in range(args.repeats):
                for size in args.batch_sizes if round_index % 2 == 0 else reversed(args.batch_sizes):
                    elapsed, cpu_elapsed, captions, metrics = work_round(
                        pipe, redis, files, videos, params, size
                    )
                    if reference is None:
                        reference = captions
                    elif captions != reference:
                        raise RuntimeError(f"batch size {size} changed some captions")
                    seconds[size].append(elapsed)
                    cpu[size].append(cpu_elapsed)
                    count = metrics.registry.get_sample_value("univigu_caption_batch_size_count") or 1
                    batches[size] = args.jobs / count
        finally:
            redis.close()
            server.stop()
    alone = args.batch_sizes[0]
    rows = []
    for size in args.batch_sizes:
        speed_up, speed_up_ci = paired_ratio(seconds[alone], seconds[size])
        cpu_speed_up, cpu_speed_up_ci = paired_ratio(cpu[alone], cpu[size])
        rows.append(
            {
                "batch_size": size,
                "mean_batch": batches[size],
                "seconds": median(seconds[size]),
                "jobs_per_minute": 60 * args.jobs / median(seconds[size]),
                "speed_up": speed_up,
                "speed_up_ci": speed_up_ci,
                "cpu_seconds": median(cpu[size]),
                "jobs_per_cpu_minute": 60 * args.jobs / median(cpu[size]),
                "cpu_speed_up": cpu_speed_up,
                "cpu_speed_up_ci": cpu_speed_up_ci,
                "samples": seconds[size],
                "cpu_samples": cpu[size],
            }
        )
    return {
        "benchmark": "caption_batching",
        "model": model,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "jobs": args.jobs,
        "params": params,
        "defaults": {"steps": pipe.defaults.steps, "video_reuse": pipe.defaults.video_reuse},
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }


TABLE = {
    "batch_size": "UNIVIGU_CAPTION_BATCH_SIZE",
    "mean_batch": "jobs per batch",
    "seconds": "s for all jobs",
    "jobs_per_minute": "caption jobs per minute",
    "speed_up": "throughput / one at a time",
    "speed_up_ci": "95% CI",
    "cpu_seconds": "CPU s for all jobs",
    "jobs_per_cpu_minute": "jobs per CPU minute",
    "cpu_speed_up": "same, by CPU time",
    "cpu_speed_up_ci": "95% CI",
}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_model_args(p, default_preset="tiny")
    p.add_argument("--jobs", type=int, default=32, help="caption jobs queued per round")
    p.add_argument("--batch-sizes", type=parse_int_list, default=[1, 8], help="the first is the reference")
    p.add_argument("--steps", type=int, help="caption steps (default: the model's)")
    p.add_argument("--video-reuse", type=int, help="the jobs' video_reuse (default: the model's)")
    add_run_args(p, repeats=3, warmup_help="untimed rounds of two jobs first")
    add_output_args(p)
    return p


def header(result: dict[str, Any]) -> str:
    return (
        f"{result['model']} on {result['device']} ({result['threads']} threads), {result['jobs']} caption jobs "
        f"per round, params {result['params'] or 'the defaults'} (defaults {result['defaults']}), "
        f"{result['repeats']} rounds"
    )


def main() -> None:
    run_main(parser(), run, header, TABLE)


if __name__ == "__main__":
    main()
