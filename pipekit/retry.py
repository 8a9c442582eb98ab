"""Retry policies: the only module that imports tenacity.

The hot path never enters tenacity: a stage calls its function directly and only an
item whose call raised is handed to :func:`retry_call`, which finishes that item's
remaining attempts under a tenacity ``Retrying`` built once per policy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import tenacity

from pipekit.errors import ConfigError

__all__ = ["NO_RETRY", "Retry", "retry_call"]


def _seconds(name: str, value: float | timedelta) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"{name} must be a finite number of seconds or a timedelta (got {value!r}); "
            f"use a value such as 0.1"
        )
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 seconds (got {value!r}); use 0 for no wait")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """How often and how patiently a stage retries an item whose call raised.

    Immutable and safe to share between stages and threads.

    Args:
        attempts: calls in all, the first included (1 means no retry); at most 100.
        backoff: wait before the first retry, in seconds; doubles each retry.
        max_backoff: the longest single wait, in seconds.
        jitter: a random extra wait of up to this many seconds, added to each wait.
        on: exception types that are retried; others fail the item at once.

    Raises:
        ConfigError: a value is out of range or ``on`` is not exception types.
    """

    attempts: int = 3
    backoff: float | timedelta = 0.1
    max_backoff: float | timedelta = 10.0
    jitter: float | timedelta = 0.0
    on: tuple[type[BaseException], ...] | type[BaseException] = Exception
    _retrying: Any = field(init=False, repr=False, compare=False, hash=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) \
                or not 1 <= self.attempts <= 100:
            raise ConfigError(
                f"attempts must be a whole number from 1 to 100 (got {self.attempts!r}); "
                f"1 means no retry"
            )
        backoff = _seconds("backoff", self.backoff)
        max_backoff = _seconds("max_backoff", self.max_backoff)
        jitter = _seconds("jitter", self.jitter)
        if max_backoff < backoff:
            raise ConfigError(
                f"max_backoff must be >= backoff (got max_backoff={max_backoff}, "
                f"backoff={backoff})"
            )
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ConfigError(
                f"on must be an exception type or a tuple of them (got {self.on!r}); "
                f"e.g. on=(IOError, TimeoutError)"
            )
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "max_backoff", max_backoff)
        object.__setattr__(self, "jitter", jitter)
        object.__setattr__(self, "on", on)

    def retries(self, exc: BaseException) -> bool:
        """Whether an exception of this kind is retried at all."""
        return self.attempts > 1 and isinstance(exc, self.on)

    def wait_for(self, retry_number: int) -> float:
        """The wait before retry number ``retry_number`` (1-based), jitter excluded."""
        assert isinstance(self.backoff, float)
        assert isinstance(self.max_backoff, float)
        return min(self.max_backoff, self.backoff * 2.0 ** (retry_number - 1))

    def __getstate__(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "backoff": self.backoff,
                "max_backoff": self.max_backoff, "jitter": self.jitter, "on": self.on}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_retrying", None)


class _Abandoned(BaseException):
    """Internal: retries stopped because the batch was abandoned."""


NO_RETRY = Retry(attempts=1)
"""The policy of a stage that does not retry."""


def _wait(policy: Retry, retry_number: int) -> float:
    """The wait before retry number ``retry_number`` (1-based), jitter included."""
    assert isinstance(policy.jitter, float)
    wait = policy.wait_for(retry_number)
    if policy.jitter:
        wait += random.uniform(0.0, policy.jitter)
    return wait


def _retrying(policy: Retry, sleep: Callable[[float], None]) -> tenacity.Retrying:
    assert isinstance(policy.on, tuple)
    on = policy.on
    return tenacity.Retrying(
        # The first attempt already happened outside tenacity, so tenacity's attempt k
        # is retry k, and the wait after it comes before retry k + 1.
        stop=tenacity.stop_after_attempt(policy.attempts - 1),
        wait=lambda state: _wait(policy, state.attempt_number + 1),
        retry=tenacity.retry_if_exception(
            lambda e: isinstance(e, on) and not isinstance(e, _Abandoned)),
        sleep=sleep,
        reraise=True,
    )


def retry_call(
    policy: Retry,
    fn: Callable[[Any], Any],
    item: Any,
    *,
    sleep: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Any, int, BaseException | None]:
    """Finish the attempts of an item whose first call already raised a retried error.

    Args:
        policy: the stage's retry policy.
        fn: the stage function.
        item: the item.
        sleep: the sleep used between attempts (injectable for tests).
        should_stop: polled before each retry; when it returns True the retries end
            early (the stage is being abandoned).

    Returns:
        ``(result, retries_made, error)``: ``error`` is ``None`` on success, else the
        last exception (tenacity's own errors never escape).
    """
    import time

    made = 0

    pause = sleep or time.sleep

    def counted(x: Any) -> Any:
        nonlocal made
        if not made:  # tenacity waits only between its own attempts
            pause(_wait(policy, 1))
        if should_stop is not None and should_stop():
            raise _Abandoned
        made += 1
        return fn(x)

    retrying = policy._retrying
    if retrying is None or sleep is not None:
        retrying = _retrying(policy, pause)
        if sleep is None:
            object.__setattr__(policy, "_retrying", retrying)
    try:
        return retrying(counted, item), made, None
    except _Abandoned:
        return None, made, _Abandoned()
    except BaseException as err:  # the item's last error, whatever it is
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        return None, made, err


