"""The options a request may carry and the rules each must follow, torch-free so the gateway shares them.

:data:`OPTIONS` declares every option once (name, type, help); :data:`MODE_OPTIONS` says which modes
take which. The pipeline's signatures, the API's request schemas and the Python client are checked
against it (``tests/test_options.py``), and both command lines build their flags from it
(:func:`add_option_flags`).

:data:`RULES` bounds every numeric option once (a :class:`Rule`: range, multiple of 16, 4k+1), the
same for every model; :class:`Limits` holds the rules of one mode plus its texts' lengths, narrowed by
the served model's own lengths (:func:`model_limits`) and by the operator's caps
(``service.contract.settings.Settings.cap``). The pipeline, the worker and the gateway all check with
:meth:`Limits.check`, and the worker publishes its limits (``GET /model``).

Each check raises :class:`InvalidParameterError` (:class:`PromptTooLongError` for a text) naming the
parameter, the value and what is allowed; nothing is rounded silently.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from model.errors import InvalidParameterError, PromptTooLongError

Mode = Literal["generate", "joint", "caption"]


@dataclass(frozen=True)
class RequestOption:
    """One option of a request: the same name in the API, the client, the pipeline and (dashed) on the
    command line. Every option may be omitted; the served model's default applies."""

    name: str
    type: type[int] | type[float] | type[str]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: dict[str, RequestOption] = {
    option.name: option
    for option in (
        RequestOption("negative_prompt", str, "what the video should not show (the unconditional prompt)"),
        RequestOption("height", int, "pixels, a multiple of 16"),
        RequestOption("width", int, "pixels, a multiple of 16"),
        RequestOption("num_frames", int, "frames, 4k+1"),
        RequestOption("fps", int, "frame rate of the MP4"),
        RequestOption("steps", int, "denoising steps"),
        RequestOption("guidance_scale", float, "classifier-free guidance scale"),
        RequestOption("seed", int, "random seed; drawn (and reported) when omitted"),
        RequestOption("step_cache", float, "opt-in first-block step cache threshold, e.g. 0.1 (default off)"),
        RequestOption("max_tokens", int, "caption length, in tokens"),
        RequestOption("prompt", str, "optional text that conditions the caption"),
        RequestOption(
            "video_reuse",
            int,
            "captioning: a full pass over the video every this many steps, text-only passes between "
            "(1: exact; at least the steps: one full pass)",
        ),
    )
}

VIDEO_OPTIONS = (
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "fps",
    "steps",
    "guidance_scale",
    "seed",
    "step_cache",
)
"""The options of every mode that makes a video (``generate``, and ``joint`` with ``max_tokens``)."""

MODE_OPTIONS: dict[Mode, tuple[str, ...]] = {
    "generate": VIDEO_OPTIONS,
    "joint": (*VIDEO_OPTIONS, "max_tokens"),
    "caption": ("prompt", "steps", "max_tokens", "seed", "video_reuse"),
}
"""Which options each mode takes, besides its input (the prompt of a video mode, the caption's video)."""


def add_option_flags(parser: argparse.ArgumentParser, mode: Mode) -> None:
    """One flag per option of ``mode`` (``--num-frames``, ...), each defaulting to None (omitted)."""
    for name in MODE_OPTIONS[mode]:
        option = OPTIONS[name]
        parser.add_argument(option.flag, dest=name, type=option.type, help=option.help)


def option_values(args: argparse.Namespace, mode: Mode) -> dict[str, object]:
    """The options of ``mode`` given on a command line parsed with :func:`add_option_flags`."""
    return {name: getattr(args, name) for name in MODE_OPTIONS[mode]}


SIDE_MULTIPLE = 16
"""Heights and widths are multiples of 16: the VAE downsamples 8x and the patch embedding 2x (the toy
model: 4x and 4x)."""
FRAME_STRIDE = 4
"""Frame counts are ``4k + 1``: the VAE keeps the first frame and compresses the rest 4x in time."""


@dataclass(frozen=True)
class Rule:
    """The values one numeric option takes: ``[minimum, maximum]``, and for sides a multiple of 16, for
    frame counts the form ``4k + 1``. The bounds are always values of that form themselves."""

    name: str
    minimum: float
    maximum: float
    multiple_of: int | None = None
    four_k_plus_one: bool = False

    def allows(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not self.minimum <= value <= self.maximum:
            return False
        if self.multiple_of and value % self.multiple_of:
            return False
        return not (self.four_k_plus_one and (value - 1) % FRAME_STRIDE)

    def describe(self) -> str:
        """What is allowed, as an error message and a form hint say it."""
        if self.four_k_plus_one:
            return f"of the form 4k+1 (1, 5, 9, ...) between {self.minimum} and {self.maximum}"
        if self.multiple_of:
            return f"a multiple of {self.multiple_of} between {self.minimum} and {self.maximum}"
        return f"between {self.minimum} and {self.maximum}"

    def check(self, value: float, name: str | None = None) -> float:
        """``value`` if allowed; else :class:`InvalidParameterError` naming it, the value and what is
        allowed."""
        if not self.allows(value):
            raise InvalidParameterError(
                f"{name or self.name} must be {self.describe()}, got {value!r}{self.nearest(value)}",
                param=name or self.name,
            )
        return value

    def nearest(self, value: float) -> str:
        """The hint after a refused frame count, its nearest 4k+1 value inside the bounds; empty for
        every other rule."""
        if not self.four_k_plus_one or not isinstance(value, int):
            return ""
        nearest = round((value - 1) / FRAME_STRIDE) * FRAME_STRIDE + 1
        return f"; the nearest allowed value is {int(min(max(nearest, self.minimum), self.maximum))}"

    def narrowed(self, minimum: float | None = None, maximum: float | None = None) -> Rule:
        """This rule within ``[minimum, maximum]`` (None: no bound), its bounds moved to the nearest values
        of its form inside; InvalidParameterError when nothing is left."""
        low = self.minimum if minimum is None else max(self.minimum, minimum)
        high = self.maximum if maximum is None else min(self.maximum, maximum)
        if self.multiple_of:
            low = -(-low // self.multiple_of) * self.multiple_of
            high = high // self.multiple_of * self.multiple_of
        if self.four_k_plus_one:
            low = low + (-(low - 1)) % FRAME_STRIDE
            high = high - (high - 1) % FRAME_STRIDE
        if low > high:
            raise InvalidParameterError(
                f"no value of {self.name} is left within [{minimum}, {maximum}] ({self.describe()})",
                param=self.name,
            )
        integral = isinstance(self.minimum, int) and isinstance(self.maximum, int)
        return dataclasses.replace(
            self, minimum=int(low) if integral else low, maximum=int(high) if integral else high
        )


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("height", SIDE_MULTIPLE, 1920, multiple_of=SIDE_MULTIPLE),
        Rule("width", SIDE_MULTIPLE, 1920, multiple_of=SIDE_MULTIPLE),
        Rule("num_frames", 1, 161, four_k_plus_one=True),
        Rule("fps", 1, 120),
        Rule("steps", 1, 1000),
        Rule("guidance_scale", 0.0, 20.0),
        Rule("seed", 0, 2**63 - 1),
        Rule("step_cache", 0.0, 1.0),
        Rule("max_tokens", 1, 4096),
        Rule("video_reuse", 1, 1000),
    )
}
"""The hard bounds of every numeric option, the same for every model: what the pipeline's arithmetic and
memory allow. A served model (:func:`model_limits`) and an operator (``Settings.cap``) only narrow them."""

TEXT_OPTIONS: dict[Mode, tuple[str, ...]] = {
    "generate": ("prompt", "negative_prompt"),
    "joint": ("prompt", "negative_prompt"),
    "caption": ("prompt",),
}
"""The texts each mode tokenizes, each checked against :class:`TextRule`."""


@dataclass(frozen=True)
class TextRule:
    """How long one text may be: in the served model's tokens (counting the end token) and in characters
    (an operator's cap); None: no bound of that kind."""

    name: str
    max_tokens: int | None = None
    max_chars: int | None = None

    def check(self, text: str, count_tokens: Callable[[str], int] | None = None) -> str:
        """``text`` if it fits; tokens are counted only with ``count_tokens`` (the served tokenizer).
        :class:`PromptTooLongError` otherwise."""
        if self.max_chars is not None and len(text) > self.max_chars:
            raise PromptTooLongError(
                f"{self.name} is {len(text)} characters long; at most {self.max_chars} are allowed",
                param=self.name,
            )
        if self.max_tokens is not None and count_tokens is not None:
            count = count_tokens(text)
            if count > self.max_tokens:
                raise PromptTooLongError(
                    f"{self.name} is {count} tokens long; at most {self.max_tokens} tokens (including the "
                    "end token) are allowed",
                    param=self.name,
                )
        return text

    def narrowed(self, max_tokens: int | None = None, max_chars: int | None = None) -> TextRule:
        return TextRule(self.name, _smaller(self.max_tokens, max_tokens), _smaller(self.max_chars, max_chars))


@dataclass(frozen=True)
class ModelCaps:
    """What one served model's text side takes: the prompt of ``generate`` is held in the text stream
    (``max_prompt_tokens``) and every text conditions through the encoder (``context_tokens``)."""

    max_prompt_tokens: int
    context_tokens: int
    max_caption_tokens: int


@dataclass(frozen=True)
class Limits:
    """Every rule of one mode: its numeric options and its texts. One :meth:`check` serves the pipeline,
    the worker and the gateway."""

    mode: Mode
    rules: dict[str, Rule]
    texts: dict[str, TextRule]

    def check_value(self, name: str, value: float) -> float:
        return self.rules[name].check(value)

    def check(self, params: Mapping[str, object], count_tokens: Callable[[str], int] | None = None) -> None:
        """Check every option and text present in ``params`` (None values are omitted options)."""
        for name, value in params.items():
            if value is None:
                continue
            if name in self.rules:
                self.rules[name].check(value)  # type: ignore[arg-type]
            elif name in self.texts and isinstance(value, str):
                self.texts[name].check(value, count_tokens)

    def narrowed(
        self,
        minimum: Mapping[str, float | None] | None = None,
        maximum: Mapping[str, float | None] | None = None,
        *,
        text_tokens: Mapping[str, int | None] | None = None,
        max_chars: int | None = None,
    ) -> Limits:
        """These limits within another party's bounds, by option name (a model's, an operator's)."""
        minimum, maximum, text_tokens = minimum or {}, maximum or {}, text_tokens or {}
        return Limits(
            self.mode,
            {name: rule.narrowed(minimum.get(name), maximum.get(name)) for name, rule in self.rules.items()},
            {name: text.narrowed(text_tokens.get(name), max_chars) for name, text in self.texts.items()},
        )

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{option: {minimum, maximum[, multiple_of][, four_k_plus_one]}, text: {max_tokens, max_chars}}``."""
        shown: dict[str, dict[str, Any]] = {}
        for name, rule in self.rules.items():
            shown[name] = {"minimum": rule.minimum, "maximum": rule.maximum}
            if rule.multiple_of:
                shown[name]["multiple_of"] = rule.multiple_of
            if rule.four_k_plus_one:
                shown[name]["four_k_plus_one"] = True
        for name, text in self.texts.items():
            shown[name] = {"max_tokens": text.max_tokens, "max_chars": text.max_chars}
        return shown

    @classmethod
    def from_json(cls, mode: Mode, shown: Mapping[str, Mapping[str, Any]]) -> Limits:
        """The inverse of :meth:`to_json`: limits another process published."""
        rules = {
            name: Rule(
                name,
                value["minimum"],
                value["maximum"],
                value.get("multiple_of"),
                value.get("four_k_plus_one", False),
            )
            for name, value in shown.items()
            if name in RULES
        }
        texts = {
            name: TextRule(name, value.get("max_tokens"), value.get("max_chars"))
            for name, value in shown.items()
            if name in TEXT_OPTIONS[mode]
        }
        return cls(mode, rules, texts)


def hard_limits(mode: Mode) -> Limits:
    """The model-independent bounds of ``mode``'s options (:data:`RULES`), texts unbounded."""
    return Limits(
        mode,
        {name: RULES[name] for name in MODE_OPTIONS[mode] if name in RULES},
        {name: TextRule(name) for name in TEXT_OPTIONS[mode]},
    )


def model_limits(mode: Mode, caps: ModelCaps) -> Limits:
    """What a model with ``caps`` accepts in ``mode``: the hard bounds, its caption length and its text
    lengths. ``generate`` holds its prompt in the text stream as well as encoding it, so both lengths
    bound it; every other text is only encoded."""
    prompt_tokens = (
        min(caps.max_prompt_tokens, caps.context_tokens) if mode == "generate" else caps.context_tokens
    )
    return hard_limits(mode).narrowed(
        maximum={"max_tokens": caps.max_caption_tokens},
        text_tokens={"prompt": prompt_tokens, "negative_prompt": caps.context_tokens},
    )


MODES: tuple[Mode, ...] = ("generate", "joint", "caption")


def _smaller(first: int | None, second: int | None) -> int | None:
    return second if first is None else first if second is None else min(first, second)


def latent_frames(num_frames: int) -> int:
    """Latent frames for ``num_frames`` pixel frames: ``(T - 1) / 4 + 1``."""
    return (num_frames - 1) // FRAME_STRIDE + 1
