"""Request and response schemas shared by the gateway and the workers (torch-free).

The ``*Params`` models hold the options' types (no unknown fields); the rules every value follows are
``model.limits``'s. :func:`build_request_models` derives the gateway's request models from them with the
limits of the running :class:`~service.contract.settings.Settings` (the hard bounds within the operator's
caps), each option checked by its one :class:`~model.limits.Rule` and its range shown in OpenAPI. Values
are never rounded: a wrong value is rejected with what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, computed_field, create_model

from model.limits import OPTIONS, Limits, Mode, Rule, hard_limits
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


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VideoOptions(_Params):
    """Video options of /generate and /joint. Omitted values use the model's defaults."""

    negative_prompt: str | None = None
    height: int | None = Field(None, description="Pixels, a multiple of 16.")
    width: int | None = Field(None, description="Pixels, a multiple of 16.")
    num_frames: int | None = Field(None, description="Frames, 4k+1 (1, 5, 9, ...).")
    fps: int | None = None
    steps: int | None = Field(None, description="Denoising steps.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    seed: int | None = Field(None, description="Random seed; omitted means random.")
    step_cache: float | None = Field(
        None,
        description="Opt-in step cache: skip the later blocks on steps whose first-block residual changed "
        "by less than this fraction (0.05-0.2 typical; faster, slightly different video). Omitted: off.",
    )


class GenerateParams(VideoOptions):
    prompt: str = Field(min_length=1)


class JointParams(GenerateParams):
    max_tokens: int | None = Field(None, description="Longest caption, in tokens.")


class CaptionParams(_Params):
    """Options of /caption (multipart form fields next to the video file)."""

    prompt: str | None = Field(None, description="Optional text that conditions the caption.")
    steps: int | None = Field(None, description="Denoising steps.")
    max_tokens: int | None = Field(None, description="Longest caption, in tokens.")
    seed: int | None = Field(None, description="Random seed; omitted means random.")
    video_reuse: int | None = Field(
        None,
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


def _checked(rule: Rule) -> Callable[[Any], Any]:
    """``rule`` as a field validator; the error mapping adds the field's name and the value."""

    def check(value: Any) -> Any:
        if value is None or rule.allows(value):
            return value
        raise ValueError(f"must be {rule.describe()}{rule.nearest(value)}")

    return check


def _request_fields(base: type[_Params], limits: Limits) -> dict[str, Any]:
    """The fields of ``base`` bounded by ``limits``: each numeric option checked by its rule (its range
    and multiple shown in OpenAPI), each text within its characters."""
    fields: dict[str, Any] = {}
    for name, field in base.model_fields.items():
        description = field.description or (OPTIONS[name].help.capitalize() if name in OPTIONS else None)
        if name in limits.rules:
            rule = limits.rules[name]
            fields[name] = (
                Annotated[OPTIONS[name].type | None, AfterValidator(_checked(rule))],
                Field(
                    None,
                    ge=rule.minimum,
                    le=rule.maximum,
                    multiple_of=rule.multiple_of,
                    description=description,
                ),
            )
        elif name in limits.texts:
            chars = limits.texts[name].max_chars
            if field.is_required():
                fields[name] = (str, Field(min_length=1, max_length=chars, description=description))
            else:
                fields[name] = (str | None, Field(None, max_length=chars, description=description))
    return fields


def build_request_models(settings: Settings) -> RequestModels:
    """Subclass the ``*Params`` models with the limits of ``settings``, and add ``webhook``."""
    webhook: Any = (
        HttpUrl | None,
        Field(
            None,
            description="An http(s) URL that gets a signed event (Standard Webhooks) when the job ends.",
        ),
    )

    def request_model(name: str, mode: Mode) -> Any:
        base = PARAMS_BY_TYPE[JobType(mode)]
        limits = settings.cap(hard_limits(mode))
        return create_model(name, __base__=base, webhook=webhook, **_request_fields(base, limits))

    return RequestModels(
        generate=request_model("GenerateRequest", "generate"),
        joint=request_model("JointRequest", "joint"),
        caption=request_model("CaptionRequest", "caption"),
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
    limits: dict[Mode, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description="What each mode (generate, joint, caption) accepts, as the pipeline enforces it: per numeric "
        "option its minimum and maximum (and multiple_of, or four_k_plus_one for frame counts), per text "
        "(prompt, negative_prompt) its max_tokens in the served tokenizer's tokens, the end token counted, "
        "and its max_chars.",
    )
    tokenizer_sha256: str | None = Field(
        None, description="SHA-256 of the served tokenizer.json, with which the gateway counts prompt tokens."
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

    def mode_limits(self, mode: Mode) -> Limits:
        """What ``mode`` accepts as published; from the caption length alone for a worker that published
        no limits."""
        if mode in self.limits:
            return Limits.from_json(mode, self.limits[mode])
        return hard_limits(mode).narrowed(maximum={"max_tokens": self.max_caption_tokens})

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
