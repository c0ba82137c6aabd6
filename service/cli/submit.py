"""`univigu submit generate|caption|joint`: submit a job over HTTP with :class:`service.client.Client`.

    univigu submit generate "a red ball rolls" --steps 20 --wait --out ball.mp4
    univigu submit caption clip.mp4 --wait --out clip.json
    univigu submit joint "a cat" --wait --out cat.mp4      # cat.mp4 and cat.json (the caption)

Without ``--wait`` it prints the queued job as JSON. With it, a progress bar follows the job and the
output is saved: the MP4 of generate/joint jobs, the result JSON of caption and joint jobs (next to the
MP4 for joint). Exit status: 0 succeeded, 1 failed or canceled (the error is printed), 2 an API error.
The gateway URL defaults to the one `univigu gateway` would listen on (UNIVIGU_HOST/UNIVIGU_PORT).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.limits import Mode, add_option_flags, option_values
from service.contract.schemas import Job, JobStatus, JobType
from service.contract.settings import load_settings

if TYPE_CHECKING:  # imported when the command runs: `univigu` itself does not need httpx
    from service.client import Client


def _default_url() -> str:
    settings = load_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def register(commands: Any) -> None:
    """Add `submit` to the `univigu` subcommands (``commands`` is argparse's subparsers action)."""
    submit = commands.add_parser("submit", help="submit a job to a running gateway (HTTP client)")
    submit.add_argument("--url", help="gateway URL (default from UNIVIGU_HOST/UNIVIGU_PORT)")
    submit.add_argument("--api-key", help="API key, if the gateway requires one")
    kinds = submit.add_subparsers(dest="job_type", required=True)

    def add(mode: Mode, positional: str, **parser_options: Any) -> None:
        parser = kinds.add_parser(mode, **parser_options)
        if positional == "video":
            parser.add_argument("video", type=Path)
        else:
            parser.add_argument(positional)
        add_option_flags(parser, mode)
        parser.add_argument("--wait", action="store_true", help="follow the job and save its output")
        parser.add_argument("--out", type=Path, help="where --wait saves the output (default: <job id>.*)")
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits (3600)")
        parser.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
        parser.add_argument("--webhook", help="a URL that gets the job's end as a signed event")
        parser.set_defaults(handler=_submit)

    add("generate", "prompt", help="text to video")
    add("joint", "prompt", help="a video and its caption from one prompt")
    add("caption", "video", help="caption a video file")


def _send(client: Client, args: argparse.Namespace) -> Job:
    options: dict[str, Any] = {
        **option_values(args, args.job_type),
        "idempotency_key": args.idempotency_key,
        "webhook": args.webhook,
    }
    if args.job_type == JobType.caption:
        return client.caption(args.video, **options)
    if args.job_type == JobType.joint:
        return client.joint(args.prompt, **options)
    return client.generate(args.prompt, **options)


def _label(job: Job) -> str:
    """``queued, 2 ahead, about 40 s left`` / ``running, about 3 s left`` / ``succeeded``."""
    parts = [job.status.value]
    if job.status == JobStatus.queued and job.queue_position is not None:
        parts.append(f"{job.queue_position} ahead")
    if job.eta_seconds is not None:
        parts.append(f"about {job.eta_seconds:.0f} s left")
    return ", ".join(parts)


def _follow(client: Client, job: Job, timeout: float) -> Job:
    """``client.wait`` (the job's event stream, or polling behind a buffering proxy) with a progress bar
    (tqdm where installed, else one line per change)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar_format = "{desc} {percentage:3.0f}% |{bar}| {elapsed}"
    bar = tqdm(total=100, desc=job.id[:8], bar_format=bar_format, file=sys.stderr) if tqdm else None
    last: list[tuple[str, int, int | None]] = []

    def show(now: Job) -> None:
        state = (now.status.value, now.progress, now.queue_position)
        if last and last[-1] == state:
            return
        last.append(state)
        label = _label(now)
        if bar is None:
            print(f"{now.id[:8]} {label} {now.progress}%", file=sys.stderr)
            return
        bar.set_description_str(f"{now.id[:8]} {label}", refresh=False)
        bar.update(now.progress - bar.n)

    try:
        return client.wait(job.id, timeout=timeout, on_progress=show)
    finally:
        if bar is not None:
            bar.close()


def _save(client: Client, job: Job, out: Path | None) -> list[Path]:
    if job.type == JobType.caption:
        return [client.download(job.id, out or Path(f"{job.id}.json"), what="result")]
    video = client.download(job.id, out or Path(f"{job.id}.mp4"), what="video")
    if job.type == JobType.joint:
        return [video, client.download(job.id, video.with_suffix(".json"), what="result")]
    return [video]


def _submit(args: argparse.Namespace) -> int:
    import httpx

    from service.client import ApiError, Client, WaitTimeout

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll at --log-level INFO
    try:
        with Client(args.url or _default_url(), api_key=args.api_key) as client:
            job = _send(client, args)
            if not args.wait:
                print(job.model_dump_json(indent=2))
                return 0
            print(f"submitted {job.type.value} job {job.id}", file=sys.stderr)
            job = _follow(client, job, args.timeout)
            if job.status != JobStatus.succeeded:
                error = f": {job.error.code}: {job.error.message}" if job.error else ""
                print(f"job {job.id} {job.status.value}{error}", file=sys.stderr)
                return 1
            for path in _save(client, job, args.out):
                print(f"saved {path}", file=sys.stderr)
            if job.result and job.result.caption is not None:
                print(job.result.caption)
            return 0
    except ApiError as error:
        print(f"error {error.status} {error}", file=sys.stderr)
        return 2
    except (WaitTimeout, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
