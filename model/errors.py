"""Domain errors of the model package, flat and torch-free.

Every error carries a stable machine-readable ``code``; the worker stores it on a failed job and the
gateway maps codes to HTTP statuses in one place (``service.gateway.errors``). Messages say what was wrong and
what is allowed.
"""

from __future__ import annotations


class UniViGUError(Exception):
    """Base class of every error the model package raises on purpose."""

    code = "univigu_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameterError(UniViGUError, ValueError):
    """A generation parameter is outside its allowed range (sizes, frame counts, steps, ...)."""

    code = "invalid_parameter"


class PromptTooLongError(InvalidParameterError):
    """A prompt tokenizes to more tokens than the model's text stream or encoder accepts."""

    code = "prompt_too_long"


class UnknownPresetError(InvalidParameterError):
    """A preset name that is not registered."""

    code = "unknown_preset"


class InvalidVideoError(UniViGUError, ValueError):
    """An input video is empty, undecodable or not a video at all."""

    code = "invalid_video"


class VideoTooLargeError(InvalidVideoError):
    """An input video exceeds the configured duration, resolution or frame limits."""

    code = "video_too_large"


class CheckpointError(UniViGUError):
    """Weights that cannot be loaded: a missing file, a missing or unexpected key, a wrong shape."""

    code = "checkpoint_error"

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ", ".join(
            part for part in (f"file {file}" if file else "", f"key {key!r}" if key else "") if part
        )
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key


class AttentionBackendError(UniViGUError):
    """The selected attention backend cannot do what the call needs (for example a padding mask)."""

    code = "attention_backend_unsupported"


class Canceled(UniViGUError):
    """Raised between denoising steps when the caller's cancel check answers True."""

    code = "canceled"


class VideoWriteError(UniViGUError):
    """Writing a video file failed (disk full, read-only volume)."""

    code = "storage_error"


class ManifestError(UniViGUError, ValueError):
    """A training manifest that cannot be used: unreadable, or without a single usable row."""

    code = "invalid_manifest"
