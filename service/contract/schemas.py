"""Request and response schemas shared by the gateway and the workers (torch-free).

The ``*Params`` models hold the structural rules (types, multiples of 16, 4k+1 frame counts, no unknown
fields). :func:`build_request_models` derives the gateway's request models from them with the numeric
ranges of the running :class:`~service.contract.settings.Settings`, so the ranges appear in OpenAPI and in every
validation message. Values are never rounded: a wrong value is rejected with what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, computed_field, create_model

from service.contract.settings import Settings


class JobType(StrEnum):
    generate = "generate"
    caption = "caption"
    joint = "joint"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


def _four_k_plus_one(value: int | None) -> int | None:
    if value is not None and value % 4 != 1:
        lower = value - (value - 1) % 4
        raise ValueError(f"must be 4k+1 (e.g. {lower} or {lower + 4})")
    return value


SEED = Field(None, ge=0, le=2**32 - 1, description="Random seed; omitted means random.")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VideoOptions(_Params):
    """Video options of /generate and /joint. Omitted values use the model's defaults."""

    negative_prompt: str | None = None
    height: int | None = Field(None, multiple_of=16, description="Pixels, a multiple of 16.")
    width: int | None = Field(None, multiple_of=16, description="Pixels, a multiple of 16.")
    num_frames: Annotated[int | None, AfterValidator(_four_k_plus_one)] = Field(
        None, description="Frames, 4k+1 (1, 5, 9, ..., 81)."
    )
    fps: int | None = None
    steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance scale.")
    seed: int | None = SEED
    step_cache: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Opt-in step cache: skip the later blocks on steps whose first-block residual changed "
        "by less than this fraction (0.05-0.2 typical; faster, slightly different video). Omitted: off.",
    )


class GenerateParams(VideoOptions):
    prompt: str = Field(min_length=1)


class JointParams(GenerateParams):
    max_tokens: int | None = Field(None, ge=1, description="Longest caption, in tokens.")


class CaptionParams(_Params):
    """Options of /caption (multipart form fields next to the video file)."""

    prompt: str | None = Field(None, description="Optional text that conditions the caption.")
    steps: int | None = Field(None, ge=1, description="Denoising steps.")
    max_tokens: int | None = Field(None, ge=1, description="Longest caption, in tokens.")
    seed: int | None = SEED
    video_reuse: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="A full pass over the video every this many steps and text-only passes between, which "
        "reuse the video's keys and values (much cheaper; a slightly different caption). 1: exact; at "
        "least the steps: one full pass only. Omitted: the served model's default (GET /model).",
    )


PARAMS_BY_TYPE: dict[JobType, type[_Params]] = {
    JobType.generate: GenerateParams,
    JobType.caption: CaptionParams,
    JobType.joint: JointParams,
}


@dataclass(frozen=True)
class RequestModels:
    """The gateway's request models, bounded by the running settings."""

    generate: type[GenerateParams]
    joint: type[JointParams]
    caption: type[CaptionParams]


WEBHOOK_FIELD = "webhook"
"""The one request field that says how to report a job rather than how to run it: the gateway's request
models take it, the job's parameters (``*Params``, what the worker reads) do not."""


def build_request_models(settings: Settings) -> RequestModels:
    """Subclass the ``*Params`` models with the numeric ranges of ``settings``, and add ``webhook``."""
    text: Any = (str | None, Field(None, max_length=settings.max_prompt_chars))
    size: dict[str, Any] = {"multiple_of": 16, "ge": settings.min_size, "le": settings.max_size}
    video: dict[str, Any] = {
        "prompt": (str, Field(min_length=1, max_length=settings.max_prompt_chars)),
        "negative_prompt": text,
        "height": (int | None, Field(None, description="Pixels, a multiple of 16.", **size)),
        "width": (int | None, Field(None, description="Pixels, a multiple of 16.", **size)),
        "num_frames": (
            Annotated[int | None, AfterValidator(_four_k_plus_one)],
            Field(None, ge=settings.min_frames, le=settings.max_frames, description="Frames, 4k+1."),
        ),
        "fps": (int | None, Field(None, ge=settings.min_fps, le=settings.max_fps)),
        "guidance_scale": (float | None, Field(None, ge=0, le=settings.max_guidance_scale)),
    }
    steps: Any = (int | None, Field(None, ge=1, le=settings.max_steps, description="Denoising steps."))
    tokens: Any = (
        int | None,
        Field(None, ge=1, le=settings.max_caption_tokens, description="Caption tokens."),
    )
    webhook: Any = (
        HttpUrl | None,
        Field(
            None,
            description="An http(s) URL that gets a signed event (Standard Webhooks) when the job ends.",
        ),
    )
    return RequestModels(
        generate=create_model(
            "GenerateRequest", __base__=GenerateParams, steps=steps, webhook=webhook, **video
        ),
        joint=create_model(
            "JointRequest", __base__=JointParams, steps=steps, max_tokens=tokens, webhook=webhook, **video
        ),
        caption=create_model(
            "CaptionRequest",
            __base__=CaptionParams,
            prompt=text,
            steps=steps,
            max_tokens=tokens,
            webhook=webhook,
        ),
    )


def params_and_webhook(request: BaseModel) -> tuple[dict[str, Any], str | None]:
    """A validated request's job parameters (omitted options left out) and its webhook URL, if any."""
    params = request.model_dump(exclude_none=True, exclude={WEBHOOK_FIELD})
    webhook = getattr(request, WEBHOOK_FIELD, None)
    return params, None if webhook is None else str(webhook)


MODEL_ALIAS = "univigu"
"""A model name that always means the served model (OpenAI-compatible ``model`` fields)."""


class ServedModel(BaseModel):
    """What the workers serve, as each worker publishes it at start: its name and sampling defaults."""

    preset: str | None = Field(description="The model's preset (tiny, toy, wan2.1-1.3b), when known.")
    max_caption_tokens: int = Field(description="The longest caption (max_tokens) the model accepts.")
    defaults: dict[str, Any] = Field(description="Values used for options a request leaves out.")
    weights_sha256: str | None = Field(
        None, description="sha256 of the served weights, as each result records it (result.model)."
    )
    attention_backend: str | None = Field(None, description="The attention kernel the workers use.")
    compiled: bool = Field(False, description="Whether the workers run torch.compile'd transformer blocks.")
    devices: list[str] = Field(
        default_factory=list, description="The devices each job runs on: one, or a worker group's several."
    )
    guidance_parallel: int = Field(1, description="Devices that share a guided pass's two halves (1 or 2).")
    sequence_parallel: int = Field(
        1, description="Devices that share each pass's tokens (Ulysses attention)."
    )

    @computed_field(  # type: ignore[prop-decorator]
        description="The model's name in the OpenAI-compatible API: univigu-<preset>, or univigu."
    )
    @property
    def id(self) -> str:
        return f"{MODEL_ALIAS}-{self.preset}" if self.preset else MODEL_ALIAS


class ErrorInfo(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorInfo


class ModelIdentity(BaseModel):
    """The served model, and what else besides a job's parameters decides its output."""

    preset: str | None = Field(description="The model's preset (tiny, toy, wan2.1-1.3b), when known.")
    weights_sha256: str = Field(
        description="sha256 of the weights as served (transformer, VAE, text encoder; names, dtypes, "
        "shapes and bytes), computed once when the worker loads them."
    )
    video_sampler: str = Field(description="The video sampler (euler or unipc), a worker setting.")
    shift: float = Field(description="The noise schedule's shift of the video sampler.")
    device: str = Field(description="The device the job ran on (its leader's, for a worker group).")
    dtype: str = Field(description="The transformer's dtype: float32 on the CPU, bfloat16 on CUDA.")


class JobResult(BaseModel):
    video_url: str | None = None
    result_url: str | None = None
    caption: str | None = None
    fps: int | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    params: dict[str, Any] | None = Field(
        default=None,
        description="Every parameter the job ran with: the request's, the served model's defaults for "
        "those it left out, and the seed actually used (drawn when the request had none); null where an "
        "option is off or absent. Submitted again (with the same video, for a caption) to a worker with "
        "the same model, they give the same output on the same device.",
    )
    model: ModelIdentity | None = Field(
        default=None, description="The model and sampler that made the result."
    )


class WebhookDelivery(BaseModel):
    """Where a job's end is reported, and how that went (``service.gateway.webhooks``)."""

    url: str
    state: Literal["pending", "delivered", "failed"] = Field(
        default="pending",
        description="pending: the job runs, or its event awaits (re)delivery; delivered: a 2xx answer; "
        "failed: no 2xx answer within the retry window (webhook_retry_seconds).",
    )
    attempts: int = Field(default=0, description="Delivery attempts so far.")
    last_status: int | None = Field(default=None, description="HTTP status of the last attempt, if any.")
    last_error: str | None = Field(default=None, description="Why the last attempt got no answer, if so.")
    delivered_at: datetime | None = None


WebhookEventType = Literal["job.succeeded", "job.failed", "job.canceled"]


class JobRecord(BaseModel):
    """The gateway's own record of a job, kept in Redis beyond rq's keys (see ``service.contract.store``)."""

    id: str
    type: JobType
    status: JobStatus
    progress: int = Field(0, ge=0, le=100)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    result: JobResult | None = None
    worker: str | None = None
    cancel_requested: bool = False
    owner: str | None = None
    webhook: WebhookDelivery | None = None
    ends_at: float | None = None
    """When a running job should end (Unix seconds), as its worker last estimated (``service.contract.timing``)."""


class Job(BaseModel):
    """A job as the API shows it."""

    id: str
    type: JobType
    status: JobStatus
    progress: int = Field(description="0-100 from denoising steps; never decreases.")
    queue_position: int | None = Field(None, description="Jobs ahead of this one while queued (0: next).")
    eta_seconds: float | None = Field(
        None,
        description="Seconds until the job should end, from measured step times, while queued or running; "
        "null once it ended or while no estimate exists yet.",
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="When the record and its files are deleted.")
    params: dict[str, Any]
    error: ErrorInfo | None
    result: JobResult | None
    webhook: WebhookDelivery | None = Field(None, description="The job's webhook and its delivery state.")

    @classmethod
    def from_record(
        cls, record: JobRecord, queue_position: int | None = None, eta_seconds: float | None = None
    ) -> Job:
        return cls(
            queue_position=queue_position,
            eta_seconds=eta_seconds,
            **record.model_dump(exclude={"worker", "cancel_requested", "owner", "ends_at"}),
        )


class WebhookEvent(BaseModel):
    """The body of a webhook delivery (Standard Webhooks' payload structure): the job as GET /jobs/{id}
    shows it, without its own delivery state, which the event cannot know."""

    type: WebhookEventType = Field(description="job.succeeded, job.failed or job.canceled.")
    timestamp: datetime = Field(description="When the job ended.")
    data: Job


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last.")
