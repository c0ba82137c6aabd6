"""One settings object for the gateway, the workers and `univigu up`.

Values come from the environment (prefix ``UNIVIGU_``; ``REDIS_URL`` is accepted as well) and are read
once by :func:`load_settings`. Tests and the CLI build their own ``Settings(...)`` or ``model_copy`` one.

Liveness bound: a worker refreshes each running job's heartbeat every ``heartbeat_interval_seconds``;
the key lives ``heartbeat_ttl_seconds``; the gateway's reaper looks every ``reaper_interval_seconds``.
A worker that dies mid-job therefore leaves its job ``failed`` with code ``worker_lost`` within
:attr:`Settings.worker_lost_bound_seconds` = heartbeat TTL + reaper interval + 1 s of Redis expiry
slack (13 s with the defaults; documented as "within 15 s").
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.limits import Limits

WEBHOOK_SECRET_PREFIX = "whsec_"

# Which request-limit setting bounds which option from below and from above (Settings.cap).
_LOWER_CAPS = {"height": "min_size", "width": "min_size", "num_frames": "min_frames", "fps": "min_fps"}
_UPPER_CAPS = {
    "height": "max_size",
    "width": "max_size",
    "num_frames": "max_frames",
    "fps": "max_fps",
    "steps": "max_steps",
    "guidance_scale": "max_guidance_scale",
    "max_tokens": "max_caption_tokens",
}


class Settings(BaseSettings):
    """Configuration of Uni-ViGU Serve. Every field maps to the variable ``UNIVIGU_<FIELD_NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="UNIVIGU_", extra="ignore", frozen=True, env_ignore_empty=True
    )

    # --- Redis and the queue ---------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("UNIVIGU_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis for the queue and the job records. UNIVIGU_REDIS_URL or REDIS_URL.",
    )
    redis_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="Connect and socket timeout of every Redis call; an unreachable Redis fails fast.",
    )
    queue_name: str = Field("univigu", description="The rq queue that gateways fill and workers drain.")
    key_prefix: str = Field("univigu", description="Prefix of the gateway's own Redis keys (job records).")
    max_queue_length: int = Field(100, ge=1, description="Queued jobs beyond this answer 503 queue_full.")
    job_timeout_seconds: int = Field(
        1800, ge=1, description="A running job is stopped and failed with code timeout after this."
    )
    retry_after_seconds: int = Field(5, ge=1, description="Retry-After sent with every 503.")

    # --- results -----------------------------------------------------------------------------------------
    results_dir: Path = Field(
        Path("results"), description="Videos, result JSON and uploads (a shared volume)."
    )
    result_ttl_seconds: int = Field(
        86400, ge=1, description="Finished jobs and their files are kept this long, then deleted."
    )
    cleanup_interval_seconds: float = Field(60.0, gt=0, description="How often expired files are deleted.")
    data_dir: Path | None = Field(
        None,
        description="`univigu up`'s data folder: its Redis's append-only file and the results "
        "(`up --data-dir`); unset: the user's data directory (~/.local/share/univigu on Linux).",
    )

    # --- liveness ----------------------------------------------------------------------------------------
    heartbeat_interval_seconds: float = Field(2.0, gt=0, description="Workers refresh heartbeats this often.")
    heartbeat_ttl_seconds: float = Field(10.0, gt=0, description="A heartbeat older than this means lost.")
    reaper_interval_seconds: float = Field(
        2.0, gt=0, description="The gateway looks for lost jobs this often."
    )
    finish_retry_seconds: float = Field(
        60.0,
        gt=0,
        description="How long a worker retries recording a finished job while Redis is unreachable; "
        "after that the outcome is lost and the reaper fails the job as worker_lost.",
    )

    # --- HTTP --------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Gateway bind address (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="Gateway port.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; empty disables authentication.",
    )
    api_key_header: str = Field("X-API-Key", description="Header that carries the API key.")
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1, description="Largest accepted caption upload.")
    idempotency_ttl_seconds: int = Field(
        86400, ge=1, description="How long an Idempotency-Key is remembered."
    )
    chat_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="How long POST /v1/chat/completions waits for its caption job; then 504 naming the "
        "job, which keeps running.",
    )
    events_poll_seconds: float = Field(
        0.5,
        gt=0,
        description="How often the gateway reads the jobs its GET /jobs/{id}/events streams follow (one Redis "
        "round trip for all of them); an event goes out when a status, progress or queue position changed.",
    )
    max_json_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body other than a caption upload (413 beyond)."
    )
    body_idle_timeout_seconds: float = Field(
        30.0, gt=0, description="A request body that sends nothing for this long answers 408."
    )
    body_timeout_seconds: float = Field(
        600.0, gt=0, description="A request body must arrive whole within this (408 otherwise)."
    )
    rate_limit_per_second: float = Field(
        0.0,
        ge=0,
        description="Requests per second per API key (per client IP without keys), refilled "
        "continuously; 0: no limit.",
    )
    rate_limit_burst: int = Field(
        20, ge=1, description="Requests a client may send at once before the rate limit applies."
    )

    # --- webhooks (Standard Webhooks; delivered by the gateways, see service/gateway/webhooks) ----------
    webhook_secret: SecretStr | None = Field(
        None,
        description="Signing secret of webhook events, whsec_ + base64 of 24 to 64 random bytes. Unset: "
        "webhooks are off and a submit that names one answers 422.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs that resolve to loopback, link-local or private addresses (a "
        "receiver on the same host or network). Off: refused at submit and again at each delivery.",
    )
    webhook_timeout_seconds: float = Field(
        5.0, gt=0, description="One delivery attempt (DNS, connect, send, answer) must end within this."
    )
    webhook_backoff_seconds: float = Field(
        2.0, gt=0, description="Wait before the first retry of a failed delivery; each next wait doubles."
    )
    webhook_retry_seconds: float = Field(
        3600.0,
        gt=0,
        description="How long a failing delivery is retried, from the job's end; then it is given up "
        "(webhook state failed).",
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often each gateway looks for webhook events due for delivery."
    )

    # --- request limits: the operator's caps within the served model's own (model.limits; GET /model) ---
    max_prompt_chars: int = Field(
        2000,
        ge=1,
        description="Longest prompt or negative prompt, in characters (tokens are the served model's limit).",
    )
    min_size: int = Field(
        16, ge=16, description="Smallest height/width (a multiple of 16; the hard bound is 16)."
    )
    max_size: int = Field(
        1280, ge=16, description="Largest height/width (a multiple of 16; the hard bound is 1920)."
    )
    min_frames: int = Field(
        1, ge=1, description="Fewest frames (num_frames = 4k+1; a cap between two such values moves inside)."
    )
    max_frames: int = Field(129, ge=1, description="Most frames (num_frames = 4k+1; the hard bound is 161).")
    min_fps: int = Field(1, ge=1, description="Lowest output frame rate.")
    max_fps: int = Field(60, ge=1, description="Highest output frame rate (the hard bound is 120).")
    max_steps: int = Field(100, ge=1, description="Most denoising steps (the hard bound is 1000).")
    max_guidance_scale: float = Field(20.0, ge=0, description="Largest classifier-free guidance scale.")
    max_caption_tokens: int = Field(
        512, ge=1, description="Longest caption, in tokens, within the served model's own (GET /model)."
    )

    # --- worker ------------------------------------------------------------------------------------------
    device: str = Field("cpu", description="Torch device of `univigu worker` (one worker per GPU).")
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A worker group: comma-separated devices (cuda:0,cuda:1,...) that run every job together, "
        "one process each; empty: one device, `device`. See docs/multi-gpu.md.",
    )
    guidance_parallel: int = Field(
        1, ge=1, le=2, description="Devices of a worker group that share a guided pass's two halves: 1 or 2."
    )
    sequence_parallel: int | None = Field(
        None,
        ge=1,
        description="Devices of a worker group that share each pass's tokens (Ulysses attention); must divide the "
        "model's attention heads. Default: the rest of the group, its size / guidance_parallel.",
    )
    preset: str | None = Field(None, description="Random-init model preset, e.g. tiny (tests, demos).")
    weights: Path | None = Field(None, description="A folder in our saved format (from_pretrained).")
    wan: Path | None = Field(None, description="A Wan2.1 Diffusers folder; needs `checkpoint`.")
    checkpoint: Path | None = Field(None, description="The Uni-ViGU checkpoint applied on top of `wan`.")
    null_prompt: Path | None = Field(
        None,
        description="Precomputed empty-prompt umT5 embedding for `wan` (computed once at start if unset).",
    )
    attention_backend: str = Field(
        "auto",
        description="diffusers attention backend of the worker: auto (FlashAttention 3 or 2, else SageAttention, "
        "where installed on CUDA; SDPA otherwise), native (SDPA), flash, sage, ... An unusable one stops the worker.",
    )
    video_sampler: Literal["euler", "unipc"] = Field(
        "euler", description="Video sampler: euler (the authors' shifted Euler) or unipc."
    )
    compile: bool = Field(
        False,
        description="torch.compile the transformer blocks (static shapes, one graph for all blocks). For CUDA.",
    )
    vae_tiling_min_pixels: int = Field(
        1280 * 720,
        ge=0,
        description="The VAE works in overlapping 256-pixel tiles when height x width exceeds this (bounds its "
        "memory at large sizes; close to, not equal to, untiled); 0: always.",
    )
    warmup_steps: int = Field(
        2,
        ge=0,
        le=100,
        description="Steps of the warm-up jobs (each mode at the default size) run before taking jobs; 0: none.",
    )
    caption_batch_size: int = Field(
        4,
        ge=1,
        le=64,
        description="Most caption jobs a worker denoises together as one batch: queued caption jobs with the "
        "same steps, max_tokens and video_reuse whose videos fit the same size; each keeps its own seed, "
        "progress and cancel. 1: one job at a time.",
    )
    worker_metrics_port: int = Field(
        9100, ge=0, le=65535, description="Each worker's Prometheus port; 0: off."
    )

    @field_validator("api_keys", "devices", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
        try:
            size = len(base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True))
        except binascii.Error:
            size = 0
        if not secret.startswith(WEBHOOK_SECRET_PREFIX) or not 24 <= size <= 64:
            raise ValueError(
                f"must be {WEBHOOK_SECRET_PREFIX} followed by 24 to 64 random bytes in base64; make one with "
                "python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
            )
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        for low, high in (("min_size", "max_size"), ("min_frames", "max_frames"), ("min_fps", "max_fps")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}")
        if self.heartbeat_interval_seconds >= self.heartbeat_ttl_seconds:
            raise ValueError("heartbeat_interval_seconds must be shorter than heartbeat_ttl_seconds")
        if self.webhook_secret is not None and self.webhook_retry_seconds >= self.result_ttl_seconds:
            # a delivery reads the job's record, which expires result_ttl_seconds after the job ends
            raise ValueError(
                "with webhooks on, webhook_retry_seconds must be shorter than result_ttl_seconds"
            )
        if len(self.devices) > 1:
            self.parallel_degrees(len(self.devices))
        return self

    def parallel_degrees(self, ranks: int) -> tuple[int, int]:
        """``(guidance, sequence)`` of a worker group of ``ranks`` processes; ValueError if they do not fit."""
        guidance = self.guidance_parallel
        sequence = self.sequence_parallel or max(1, ranks // guidance)
        if guidance * sequence != ranks:
            example = (2, ranks // 2) if ranks % 2 == 0 else (1, ranks)
            raise ValueError(
                f"a worker group of {ranks} devices needs guidance_parallel x sequence_parallel = {ranks}, got "
                f"{guidance} x {sequence}; for example guidance_parallel {example[0]} and sequence_parallel {example[1]}"
            )
        return guidance, sequence

    def environment(self) -> dict[str, str]:
        """The ``UNIVIGU_*`` variables that make a child process read these settings (the fields set by
        flags or the environment; secrets in the clear, since the child needs them)."""
        values = {name: getattr(self, name) for name in self.model_fields_set}
        return {
            f"UNIVIGU_{name.upper()}": _environment_value(value)
            for name, value in values.items()
            if value is not None
        }

    def cap(self, limits: Limits) -> Limits:
        """``limits`` within these request limits: what a worker publishes and the gateway enforces."""
        return limits.narrowed(
            minimum={option: getattr(self, name) for option, name in _LOWER_CAPS.items()},
            maximum={option: getattr(self, name) for option, name in _UPPER_CAPS.items()},
            max_chars=self.max_prompt_chars,
        )

    @staticmethod
    def caps_of(option: str) -> list[str]:
        """The environment variables of the request limits that bound ``option`` (none for most)."""
        names = (_LOWER_CAPS.get(option), _UPPER_CAPS.get(option))
        return [f"UNIVIGU_{name.upper()}" for name in names if name]

    @property
    def worker_lost_bound_seconds(self) -> float:
        """Longest time a job of a dead worker stays ``running`` before it is failed as ``worker_lost``."""
        return self.heartbeat_ttl_seconds + self.reaper_interval_seconds + 1.0


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; keyword overrides (from the CLI) win."""
    return Settings(**overrides)  # type: ignore[arg-type]


def _environment_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)
