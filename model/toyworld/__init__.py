"""The toy world: synthetic clips with known ground truth that show the whole system learns.

``world`` (scenes, rendering, prompts, captions), ``make`` (MP4s and a manifest), ``describe`` (parsing
attributes back out of text), ``detector`` (reading attributes off frames), ``vae`` (training the tiny
Wan VAE), ``recipe`` (the whole recipe) and ``evaluate`` (the JSON report).
"""

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "toy"
"""The trained toy model that ships with the package (a pipeline folder); ``univigu up`` serves it."""


def shipped_model() -> Path | None:
    """:data:`SHIPPED_MODEL` when it holds a model (this module imports no torch: the CLI uses it)."""
    return SHIPPED_MODEL if (SHIPPED_MODEL / "univigu.json").is_file() else None


FALLBACK_PRESET = "tiny"


def default_model_source() -> tuple[str, str]:
    """The model served when none is named, as ``(source, value)``: ``("weights", <the shipped toy
    model>)``, or ``("preset", "tiny")`` where the toy model is missing. ``univigu up`` serves it, and
    ``univigu generate | caption | joint`` run it."""
    toy = shipped_model()
    return ("weights", str(toy)) if toy else ("preset", FALLBACK_PRESET)
