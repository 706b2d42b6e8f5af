"""Schedules: pure functions of training progress p in [0, 1] (no hidden step counters).

A schedule is a small frozen dataclass with ``__call__(progress) -> float`` so that configs stay
typed and serialisable (``dataclasses.asdict``) and can be written to ``config.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_progress(progress: float) -> float:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    return progress


@dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        return self.value


@dataclass(frozen=True)
class Linear:
    """``start`` until ``begin``, then linear to ``end`` at ``finish``, then ``end``."""

    start: float
    end: float
    begin: float = 0.0
    finish: float = 1.0

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        if self.finish <= self.begin:
            return self.start if progress < self.begin else self.end
        u = min(1.0, max(0.0, (progress - self.begin) / (self.finish - self.begin)))
        return self.start + (self.end - self.start) * u


@dataclass(frozen=True)
class Exponential:
    """Log-linear interpolation from ``start`` to ``end`` (both > 0) over [0, ``finish``].

    3DGS's position learning rate: lr(p) = exp((1 - u) log start + u log end), u = p / finish.
    """

    start: float
    end: float
    finish: float = 1.0

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        u = 1.0 if self.finish <= 0.0 else min(1.0, progress / self.finish)
        return math.exp((1.0 - u) * math.log(self.start) + u * math.log(self.end))


@dataclass(frozen=True)
class SqrtAnneal:
    """HiFA's square-root anneal from ``start`` to ``end``: start + (end - start) sqrt(p)."""

    start: float
    end: float

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        return self.start + (self.end - self.start) * math.sqrt(progress)


@dataclass(frozen=True)
class Piecewise:
    """Step function: ``values[k]`` while ``progress < boundaries[k]``; the last value after.

    ``len(values) == len(boundaries) + 1``; boundaries increase.
    E.g. DreamGaussian's render resolution: Piecewise((128, 256, 512), (0.3, 0.6)).
    """

    values: tuple[float, ...]
    boundaries: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError("Piecewise needs exactly one more value than boundaries")
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"Piecewise boundaries must increase, got {self.boundaries}")

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        for value, boundary in zip(self.values, self.boundaries):
            if progress < boundary:
                return value
        return self.values[-1]


Schedule = Constant | Linear | Exponential | SqrtAnneal | Piecewise
