"""Timing one job: its setup, its denoising steps and its finish, and when it should end.

What is measured and how the gateway uses it is explained in ``service.contract.timing``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service.contract.timing import StepTiming


class JobClock:
    """Started when the job starts; :meth:`step` after every denoising step; :meth:`measured` at the end.

    The first step's interval also holds the setup (reading the video, encoding the prompt), so the
    job's step time is the mean of the later steps, and the type's typical step time (``typical``, from
    earlier jobs) until there are two.
    """

    def __init__(self, typical: StepTiming | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.typical = typical
        self._clock = clock
        self.started = self._last = clock()
        self.intervals: list[float] = []

    def step(self) -> float:
        """Mark the end of a step; returns its interval in seconds."""
        now = self._clock()
        interval, self._last = now - self._last, now
        self.intervals.append(interval)
        return interval

    def _own_step(self) -> float | None:
        """The mean of the steps after the first; None before two steps."""
        later = self.intervals[1:]
        return sum(later) / len(later) if later else None

    def step_seconds(self) -> float:
        own = self._own_step()
        if own is not None:
            return own
        if self.typical is not None:
            return self.typical.step
        return self.intervals[0] if self.intervals else 0.0

    def remaining(self, done: int, total: int) -> float:
        """Seconds until the job should end after ``done`` of ``total`` steps: the steps left at its
        step time, then a typical finish."""
        return max(0, total - done) * self.step_seconds() + (self.typical.finish if self.typical else 0.0)

    def elapsed(self) -> float:
        return self._clock() - self.started

    def measured(self) -> StepTiming | None:
        """This job's times, once it has taken two steps (before, its step time is unknown)."""
        step = self._own_step()
        if step is None:
            return None
        setup = max(0.0, self.intervals[0] - step)
        return StepTiming(step=step, setup=setup, finish=self._clock() - self._last)
