"""Read the three attributes (shape, colour, motion) back out of a prompt or a generated caption."""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.toyworld.world import COLOURS, SHAPES, Scene

_MOTION = re.compile(r"\b(?:moving|moves)\s+(left|right|up|down)\b|\b(?:staying|stays)\s+still\b")


@dataclass(frozen=True)
class Attributes:
    """What a text or a video says; None where it says nothing readable."""

    shape: str | None
    colour: str | None
    motion: str | None

    @classmethod
    def of(cls, scene: Scene) -> Attributes:
        return cls(scene.shape, scene.colour, scene.motion)

    def matches(self, other: Attributes) -> dict[str, bool]:
        """Per attribute and ``all``: equal and known."""
        checks = {
            name: getattr(self, name) is not None and getattr(self, name) == getattr(other, name)
            for name in ("shape", "colour", "motion")
        }
        return {**checks, "all": all(checks.values())}


def parse_description(text: str) -> Attributes:
    """The first colour word, the first shape word, and the motion after "moving"/"moves" (or "still").

    Direction words elsewhere (``starts near the top left``) are not motion.
    """
    words = re.findall(r"[a-z]+", text.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    motion = _MOTION.search(" ".join(words))
    return Attributes(shape, colour, (motion.group(1) or "still") if motion else None)
