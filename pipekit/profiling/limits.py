"""Argument checks shared by the profiler's entry points (durations, rates, kinds)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Final

from pipekit.errors import ConfigError
from pipekit.profiling.store import KINDS

__all__ = ["MAX_RATE", "check_kind", "check_rate", "check_seconds"]

#: Highest sampling rate accepted (samples per second).
MAX_RATE: Final = 1000


def check_seconds(seconds: float | timedelta, max_seconds: float) -> float:
    """Return ``seconds`` as a float if it is a valid profile duration.

    Raises:
        ConfigError: it is not a finite number in ``(0, max_seconds]``.
    """
    value: object = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"profile seconds must be a number (got {seconds!r})")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"profile seconds must be a finite number > 0 (got {value!r})")
    if value > max_seconds:
        raise ConfigError(
            f"profile seconds must be <= profiling_max_seconds={max_seconds:g} (got {value!r}); "
            f"ask for a shorter profile or raise profiling_max_seconds"
        )
    return float(value)


def check_rate(rate: object) -> int:
    """Return ``rate`` if it is an integer from 1 to :data:`MAX_RATE`.

    Raises:
        ConfigError: it is not.
    """
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= MAX_RATE:
        raise ConfigError(
            f"profiling rate must be an integer from 1 to {MAX_RATE} samples per second "
            f"(got {rate!r}); 100 is a good default"
        )
    return rate


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is ``"cpu"`` or ``"heap"``, else raise :class:`ConfigError`."""
    if kind not in KINDS:
        raise ConfigError(f"profile kind must be one of {sorted(KINDS)} (got {kind!r})")
    return kind
