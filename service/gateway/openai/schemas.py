"""Request and response bodies of the OpenAI-compatible layer, field for field as OpenAI's API has them,
plus our own fields (added next to theirs, never replacing one)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract.schemas import JobStatus, WebhookDelivery

# --- /v1/videos ----------------------------------------------------------------------------------------


class VideoCreateRequest(BaseModel):
    """``POST /v1/videos``, as JSON or as form fields (the official SDK sends multipart/form-data)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the video shows.")
    model: str | None = Field(
        None, description="The served model's id or `univigu`; omitted: the served model."
    )
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" in pixels, each a multiple of 16; omitted: the model default.'
    )
    seconds: str | float | None = Field(
        None,
        description="Clip length; converted to frames at the model's fps and rounded to the nearest 4k+1 "
        "(the answer states the rounding). Omitted: the model's default length.",
    )
    input_reference: Any = Field(
        default=None, description="Not supported: the model generates from text only."
    )
    # Ours:
    seed: int | None = Field(default=None, description="Random seed; omitted means random.")
    steps: int | None = Field(default=None, description="Denoising steps.")
    guidance_scale: float | None = Field(default=None, description="Classifier-free guidance scale.")
    negative_prompt: str | None = None
    joint: bool = Field(
        default=False, description="Also write a description of the video (the `caption` field)."
    )
    webhook: str | None = Field(
        default=None,
        description="An http(s) URL that gets a signed event (Standard Webhooks) when the video ends.",
    )


class VideoError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Video(BaseModel):
    """OpenAI's video object. Fields after ``error`` are ours."""

    id: str = Field(description="`video_` + the native job id.")
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"] = Field(
        description="queued; running -> in_progress; succeeded -> completed; failed and canceled -> failed."
    )
    progress: int = Field(description="0-100, the native job's progress.")
    created_at: int = Field(description="Unix seconds.")
    completed_at: int | None = Field(description="Unix seconds when the job finished (any outcome).")
    expires_at: int | None = Field(description="Unix seconds when the job and its files are deleted.")
    size: str = Field(description='"WIDTHxHEIGHT".')
    seconds: str = Field(description="The clip's length: num_frames / fps.")
    prompt: str | None = None
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    job_id: str = Field(description="The native job id: GET /jobs/{job_id} reports the same job.")
    job_status: JobStatus = Field(description="The native status (tells canceled from failed).")
    queue_position: int | None = Field(default=None, description="Jobs ahead of this one while queued.")
    eta_seconds: float | None = Field(
        default=None, description="Seconds until the job should end, while queued or in progress."
    )
    num_frames: int | None = None
    fps: int | None = None
    joint: bool = Field(description="A joint job: the video comes with a description.")
    caption: str | None = Field(default=None, description="The description of a completed joint job.")
    webhook: WebhookDelivery | None = Field(default=None, description="The webhook and its delivery state.")
    seconds_requested: str | None = Field(
        default=None, description="The `seconds` asked for (create answer only)."
    )
    seconds_note: str | None = Field(
        default=None, description="How `seconds` became frames (create answer only)."
    )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


# --- /v1/chat/completions -----------------------------------------------------------------------------


class VideoUrl(BaseModel):
    url: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = Field(default=None, description="Ignored: frames are fitted to the model's size.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    video_url: VideoUrl | str | None = None
    image_url: ImageUrl | str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """A chat completion whose user message carries one video (a ``video_url`` part with a ``data:`` URL)
    or its frames (``image_url`` parts, in order), and optional text. OpenAI parameters that do not apply
    to the caption sampler (top_p, stop, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool | None = False
    n: int | None = Field(default=None, description="Only 1.")
    max_tokens: int | None = Field(
        default=None,
        description="Longest caption, in tokens; above the served model's longest caption, that longest one.",
    )
    max_completion_tokens: int | None = Field(default=None, description="Same as max_tokens.")
    seed: int | None = None
    temperature: float | None = Field(
        default=None, description="0 without a seed means seed 0 (the same caption every time); else ignored."
    )
    steps: int | None = Field(default=None, description="Ours: denoising steps.")
    frames_fps: float | None = Field(
        default=None,
        gt=0,
        le=240,
        description="Ours: the frame rate of image_url frames. Omitted: the frames span one clip of the model's "
        "default length (num_frames / fps), whatever their number.",
    )
    video_reuse: int | None = Field(
        default=None,
        description="Ours: a full pass over the video every this many steps, text-only passes between "
        "(1: exact); omitted: the served model's default.",
    )


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Not counted at the gateway: 0.")
    completion_tokens: int = Field(description="Caption tokens the model denoised (its max_tokens).")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str = Field(description="`chatcmpl-` + the native job id.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    job_id: str = Field(description="Ours: the native caption job (GET /jobs/{job_id}).")


# --- /v1/models ---------------------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default=0, description="Unknown: 0.")
    owned_by: str = "univigu-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
