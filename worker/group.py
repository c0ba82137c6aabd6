"""A worker group: every job runs on several devices at once (guidance-parallel x sequence-parallel).

torchrun starts one process per device (`univigu worker --devices a,b,...` starts torchrun itself, see
:mod:`worker.launch`). Every rank loads the model on its own device and splits each pass of the network
with the others (:mod:`model.parallel`). Rank 0, the leader, is an ordinary worker: it takes jobs from the
queue, publishes progress, honours cancel and writes results. The other ranks, the followers, replay its
pipeline calls and need no Redis:

* before a call the leader sends its mode and arguments (a caption's upload is a path; every rank reads
  it from the results folder, shared as it is between gateway and workers); every rank runs the same call
  with the same seed, so all hold the same latents and tokens;
* before every denoising step the leader sends its cancel decision, so that all ranks stop at one step;
* only the leader decodes the video (:attr:`UniViGUPipeline.decode_video`): the Wan VAE has no split
  decode in diffusers, and a follower's result is dropped.

The checks of a call raise the same :class:`UniViGUError` on every rank; the job fails as usual and the
group goes on. Anything else (a rank that died, running out of memory, rq's job timeout) leaves the ranks
out of step, and the group cannot go on: the leader fails its running job (``worker_lost``, ``gpu_oom`` or
``timeout``) and every rank exits non-zero; torchrun then ends the group and its supervisor (compose's
restart policy, ``univigu up``) starts a fresh one. A thread on every rank meets the others at a barrier
every heartbeat interval, on a gloo group of its own, so that a rank whose process is gone is noticed
within one interval even while the others wait inside a collective that would never return (NCCL).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist
from rq.timeouts import JobTimeoutException

from model.errors import AttentionBackendError, InvalidParameterError, UniViGUError
from model.parallel import ParallelPlan
from service.contract.schemas import ErrorInfo
from service.contract.settings import Settings

if TYPE_CHECKING:
    from model.pipeline import CaptionResult, JointResult, UniViGUPipeline, VideoResult

log = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)
"""How long followers wait for the leader's next call: the queue may stay empty that long."""
FROZEN_TIMEOUT = timedelta(minutes=5)
"""A rank whose liveness thread misses a barrier this long counts as gone. A rank whose process died is
noticed at once (its sockets close); this only bounds a process that is frozen whole."""
EXACT_CAPTIONS = 1
"""The ``video_reuse`` a group captions with: a full pass at every step. Reuse keeps every block's keys
and values of the whole video for later text-only passes; a split job holds only a share of them per
rank."""


class GroupLayoutError(ValueError):
    """A layout that cannot work (the processes against the devices and degrees, the model's head count,
    its attention kernel): restarting cannot help."""


def in_torchrun() -> bool:
    """Whether this process is one rank of a group of several that torchrun started."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Rank:
    """This process's place in the group, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int
    device: str

    @classmethod
    def from_environment(cls, settings: Settings) -> Rank:
        """``devices[LOCAL_RANK]`` when the devices are listed; else ``cuda:LOCAL_RANK`` for a CUDA ``device``,
        or ``device`` itself (the CPU)."""
        world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if settings.devices:
            if len(settings.devices) != int(os.environ.get("LOCAL_WORLD_SIZE", world_size)):
                raise GroupLayoutError(
                    f"{len(settings.devices)} devices are listed (devices) but torchrun started "
                    f"{os.environ.get('LOCAL_WORLD_SIZE', world_size)} processes on this machine"
                )
            device = settings.devices[local_rank]
        else:
            device = f"cuda:{local_rank}" if settings.device.startswith("cuda") else settings.device
        return cls(int(os.environ["RANK"]), world_size, local_rank, device)


@dataclass(frozen=True)
class PipelineCall:
    """One pipeline call the leader sends: the mode's method name and its arguments."""

    mode: str  # "generate", "joint" or "caption"
    arguments: dict[str, Any] = field(default_factory=dict)


class Liveness:
    """A thread that meets every other rank at a barrier every ``interval`` seconds; ``on_lost`` when one
    cannot be met (the group is broken)."""

    def __init__(
        self, group: dist.ProcessGroup, interval: float, on_lost: Callable[[str, str], None]
    ) -> None:
        self.group = group
        self.interval = interval
        self.on_lost = on_lost
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="univigu-group-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """From now on a missed barrier is the group ending, not a lost rank (the thread is not joined: it
        may be waiting at a barrier that ranks leaving will not meet)."""
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                dist.barrier(group=self.group)
            except RuntimeError as exc:  # gloo: a peer's sockets closed, or the barrier timed out
                if not self._stopping.is_set():
                    log.error("the liveness barrier failed: %s", exc)
                    self.on_lost("worker_lost", "a rank of the group is gone")
                return
            self._stopping.wait(self.interval)


class WorkerGroup:
    """This rank's membership: the process groups, the network's parallel plan and the leader's messages."""

    def __init__(
        self, rank: Rank, plan: ParallelPlan, control: dist.ProcessGroup, devices: list[str]
    ) -> None:
        self.rank = rank
        self.plan = plan
        self.control = control  # gloo: the leader's calls and cancel decisions
        self.devices = devices  # every rank's device, in rank order
        self.fail_running_job: Callable[[ErrorInfo], None] | None = None  # the leader's, once it serves
        self.liveness: Liveness | None = None

    @classmethod
    def join(cls, settings: Settings) -> WorkerGroup:
        """Join the group torchrun started: the process groups, the parallel plan, the liveness thread."""
        rank = Rank.from_environment(settings)
        try:
            guidance, sequence = settings.parallel_degrees(rank.world_size)
        except ValueError as exc:
            raise GroupLayoutError(str(exc)) from exc
        device = torch.device(rank.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        liveness = dist.new_group(backend="gloo", timeout=FROZEN_TIMEOUT)
        plan = ParallelPlan.build(guidance, sequence, device)
        devices: list[Any] = [None] * rank.world_size
        dist.all_gather_object(devices, rank.device, group=control)
        group = cls(rank, plan, control, devices)
        group.liveness = Liveness(liveness, settings.heartbeat_interval_seconds, group.lost)
        group.liveness.start()
        log.info(
            "rank %d of %d on %s: guidance_parallel %d x sequence_parallel %d",
            rank.rank,
            rank.world_size,
            rank.device,
            guidance,
            sequence,
        )
        return group

    @property
    def is_leader(self) -> bool:
        return self.rank.rank == 0

    def _attach(self, pipeline: UniViGUPipeline, attention_backend: str) -> None:
        """Split every pass of ``pipeline``'s network over the group; only the leader decodes videos."""
        try:
            if self.plan.sequence > 1:
                pipeline.transformer.set_attention_backend(attention_backend, context_parallel=True)
            pipeline.transformer.enable_parallelism(self.plan)
        except (InvalidParameterError, AttentionBackendError) as exc:
            raise GroupLayoutError(exc.message) from exc
        pipeline.decode_video = self.is_leader
        pipeline.defaults = dataclasses.replace(pipeline.defaults, video_reuse=EXACT_CAPTIONS)

    def lead(self, pipeline: UniViGUPipeline, attention_backend: str) -> GroupPipeline:
        """The leader's pipeline: each call runs on the whole group."""
        self._attach(pipeline, attention_backend)
        return GroupPipeline(pipeline, self)

    def follow(self, pipeline: UniViGUPipeline, attention_backend: str) -> None:
        """A follower's life: replay the leader's calls until it ends the group."""
        self._attach(pipeline, attention_backend)
        while (call := self.receive()) is not None:
            try:
                getattr(pipeline, call.mode)(**call.arguments, should_cancel=self.cancel_check(None))
            except UniViGUError as exc:  # the leader's call raises the same and reports it
                log.debug("rank %d: %s: %s", self.rank.rank, exc.code, exc.message)
            except BaseException as exc:
                log.error("rank %d failed in a job: %r", self.rank.rank, exc)
                self.lost(*group_failure(exc))
        self._leave()

    def stop(self) -> None:
        """The leader ends the group after its last job; every rank then exits cleanly."""
        self.send(None)
        self._leave()

    def _leave(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()
        dist.barrier(group=self.control)  # nobody exits before every rank knows the group is ending

    def send(self, call: PipelineCall | None) -> None:
        dist.broadcast_object_list([call], src=0, group=self.control)

    def receive(self) -> PipelineCall | None:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def cancel_check(self, should_cancel: Callable[[], bool] | None) -> Callable[[], bool]:
        """The check every rank's pipeline runs before each step: the leader's answer, on every rank."""

        def check() -> bool:
            asked = self.is_leader and should_cancel is not None and should_cancel()
            decision = torch.tensor([asked], dtype=torch.uint8)
            dist.broadcast(decision, src=0, group=self.control)
            return bool(decision.item())

        return check

    def lost(self, code: str, reason: str) -> NoReturn:
        """The group cannot go on: the leader fails its running job with ``code``, and this rank exits at once."""
        log.error("rank %d: %s; exiting so that the worker group restarts", self.rank.rank, reason)
        if self.fail_running_job is not None:
            message = f"the worker group running this job stopped ({reason}); it restarts"
            try:
                self.fail_running_job(ErrorInfo(code=code, message=message))
            except Exception:  # exiting regardless: the reaper fails the job once its heartbeat stops
                log.exception("could not fail the running job")
        os._exit(1)


class GroupPipeline:
    """The pipeline as the leader's job runner sees it: each mode call runs on every rank of the group."""

    def __init__(self, pipeline: UniViGUPipeline, group: WorkerGroup) -> None:
        self.pipeline = pipeline
        self.group = group
        self.defaults = pipeline.defaults

    def identity(self) -> dict[str, Any]:
        return self.pipeline.identity()

    def generate(self, prompt: str, **options: Any) -> VideoResult:
        return self._run("generate", prompt=prompt, **options)

    def joint(self, prompt: str, **options: Any) -> JointResult:
        return self._run("joint", prompt=prompt, **options)

    def caption(self, video: Any, **options: Any) -> CaptionResult:
        return self._run("caption", video=video, **options)

    def _run(
        self,
        mode: str,
        *,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        **arguments: Any,
    ) -> Any:
        if arguments.get("video_reuse", EXACT_CAPTIONS) not in (None, EXACT_CAPTIONS):
            raise InvalidParameterError(
                f"video_reuse {arguments['video_reuse']} needs the whole job on one device, and this worker "
                f"splits every job across {len(self.group.devices)} (guidance_parallel "
                f"{self.group.plan.guidance} x sequence_parallel {self.group.plan.sequence}); leave it out "
                f"or send {EXACT_CAPTIONS} (a group captions exactly), or send the job to a one-device worker",
                param="video_reuse",
            )
        self.group.send(PipelineCall(mode, arguments))
        try:
            return getattr(self.pipeline, mode)(
                **arguments, progress=progress, should_cancel=self.group.cancel_check(should_cancel)
            )
        except UniViGUError:
            raise
        except BaseException as exc:
            log.error("the leader failed in a job: %r", exc)
            self.group.lost(*group_failure(exc))


def group_failure(exc: BaseException) -> tuple[str, str]:
    """The job's error code and what to tell its client, for an error that leaves the group out of step."""
    if isinstance(exc, JobTimeoutException):
        return "timeout", "the job ran too long"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "gpu_oom", "a GPU ran out of memory; try fewer frames, a smaller size or fewer tokens"
    return "worker_lost", "a rank of the group failed or is gone"
