"""Shared helpers for pipekit's tests.

Stage functions that process workers run must be importable by name, so they live
here at module level (a test module's closures and lambdas do not pickle).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pipekit

POISON = 13
"""The item that :func:`kill_on_poison` dies on."""

HANG = 3
"""The item that :func:`sleep_on_hang` sleeps on (a process stage's hung call)."""


def make_pipe(name: str = "t", **settings: Any) -> pipekit.Pipeline:
    """A pipeline with telemetry and resource limits off, so tests exercise the core."""
    settings.setdefault("telemetry", False)
    settings.setdefault("max_memory_mb", None)
    return pipekit.Pipeline(name, **settings)


def assert_accounted(report: pipekit.RunReport) -> None:
    """Every submitted item ended in exactly one place (pipelines without drop/fan-out)."""
    assert report.submitted == (
        report.outputs + report.dead_letter_count + len(report.unprocessed)
    ), (
        f"accounting broken: submitted={report.submitted} outputs={report.outputs} "
        f"dead={report.dead_letter_count} unprocessed={len(report.unprocessed)}"
    )


def assert_stages_accounted(report: pipekit.RunReport) -> None:
    """For a run that finished everything: each stage passed on what it received.

    Holds with drops and fan-out too: each stage's received items either succeeded or
    failed, and each stage received exactly what the one before it emitted.
    """
    assert not report.unprocessed, report.unprocessed
    for s in report.stages:
        assert s.received == s.succeeded + s.failed, s
    for before, after in itertools.pairwise(report.stages):
        assert after.received == before.emitted, (before, after)
    sink_failures = sum(1 for d in report.dead_letters if d.stage == "sink")
    assert report.outputs + sink_failures == report.stages[-1].emitted


# -- stage functions (module level, so process workers can import them) ----------------


def double(x: int) -> int:
    """Return ``2 * x``."""
    return x * 2


def inc(x: int) -> int:
    """Return ``x + 1``."""
    return x + 1


def drop_odd(x: int) -> Any:
    """Drop odd items."""
    return pipekit.DROP if x % 2 else x


def fan_by_mod3(x: int) -> list[int]:
    """Fan out ``x % 3`` copies of ``x`` (so multiples of 3 produce nothing)."""
    return [x] * (x % 3)


def fail_on_multiple_of_5(x: int) -> int:
    """Raise ValueError for multiples of 5, else return ``x``."""
    if x % 5 == 0:
        raise ValueError(f"bad item {x}")
    return x


def always_fail(x: Any) -> Any:
    """Always raise OSError naming the item."""
    raise OSError(f"cannot process {x!r}")


_calls: Counter[Any] = Counter()


def flaky_twice(x: Any) -> Any:
    """Fail the first two calls for each item (per process), then return it."""
    _calls[x] += 1
    if _calls[x] <= 2:
        raise OSError(f"transient failure {_calls[x]} for {x!r}")
    return x


def jittery_identity(x: int) -> int:
    """Return ``x`` after a short, item-dependent pause (so completions reorder)."""
    time.sleep(((x * 7919) % 5) * 0.0004)
    return x


def kill_on_poison(x: int) -> int:
    """Kill the worker process for :data:`POISON`; return ``x`` otherwise."""
    if x == POISON:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sleep_on_hang(x: int) -> int:
    """Sleep a long time on :data:`HANG` (a process stage's timeout interrupts it)."""
    if x == HANG:
        time.sleep(30)
    return x


def keyed_interval(x: tuple[str, int]) -> tuple[str, int, float, float]:
    """Return ``(key, index, start, end)`` of the call, on a system-wide clock."""
    start = time.monotonic()
    time.sleep(0.001)
    return (x[0], x[1], start, time.monotonic())


def first_of(x: tuple[Any, ...]) -> Any:
    """A key function: the first element."""
    return x[0]


def pid_of(_: Any) -> int:
    """Return the worker's process id."""
    return os.getpid()


class Gate:
    """A stage function that blocks the listed items until :meth:`release` (threads only).

    Records which items entered the call, so a test can wait until one is stuck.
    """

    def __init__(self, *blocked: Any) -> None:
        self.blocked = set(blocked)
        self.open = threading.Event()
        self.entered: list[Any] = []
        self._lock = threading.Lock()
        self.arrived = threading.Event()

    def __call__(self, x: Any) -> Any:
        with self._lock:
            self.entered.append(x)
        if x in self.blocked or not self.blocked:
            self.arrived.set()
            self.open.wait(30)
        return x

    def release(self) -> None:
        """Let every blocked call return."""
        self.open.set()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def numbers(n: int) -> Iterator[int]:
    """A generator of ``0 .. n-1`` (a source that can be read only once)."""
    yield from range(n)


class TwoArgError(Exception):
    """An exception whose ``__init__`` needs two arguments (so plain unpickling fails)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def raise_two_arg_on_odd(x: int) -> int:
    """Raise :class:`TwoArgError` for odd items."""
    if x % 2:
        raise TwoArgError(500, f"item {x}")
    return x


def unpicklable_output_on_3(x: int) -> Any:
    """Return a lock (which cannot be pickled) for item 3."""
    return threading.Lock() if x == 3 else x
