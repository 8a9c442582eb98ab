"""An example user module for the ``pipekit`` command's tests (``tests/test_cli.py``).

Each attribute is something a user might point ``pipekit run module:attribute`` at.
Telemetry is off where a test does not need it, so child interpreters start fast.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pipekit

HOOK_LOG = "hook-ran.txt"
"""File the ``finite`` pipeline's shutdown hook writes into the working directory."""


# -- a finite job: 500 numbers, doubled and incremented ---------------------------------

finite = pipekit.Pipeline("finite")


@finite.stage
def double(x: int) -> int:
    """Double the item."""
    return x * 2


@finite.stage
def inc(x: int) -> int:
    """Add one."""
    return x + 1


def _hook() -> None:
    with open(HOOK_LOG, "w") as f:
        f.write("closed\n")


finite.add_stage("store", lambda x: x, on_shutdown=_hook)
finite.source(range(500))


# -- a factory, and settings that reach the stages' defaults ---------------------------


def make_pipe() -> pipekit.Pipeline:
    """A factory: ``pipekit run cli_app:make_pipe`` calls it; stage workers use the default."""
    pipe = pipekit.Pipeline("made", telemetry=False)
    pipe.add_stage("work", double)
    pipe.source(range(10))
    return pipe


def make_nothing() -> int:
    """A factory that forgets to return a pipeline."""
    return 3


not_a_pipe = 42


# -- dead letters: every tenth item fails ----------------------------------------------


def fail_tenth(x: int) -> int:
    """Raise on multiples of ten."""
    if x % 10 == 0:
        raise ValueError(f"item {x} is a multiple of ten")
    return x


with_dead = pipekit.Pipeline("with-dead", telemetry=False)
with_dead.add_stage("check", fail_tenth)
with_dead.source(range(100))


# -- a source that breaks ---------------------------------------------------------------


def _breaking() -> Iterator[int]:
    yield from range(50)
    raise RuntimeError("the source lost its connection")


bad_source = pipekit.Pipeline("bad-source", telemetry=False)
bad_source.add_stage("work", double)
bad_source.source(_breaking)


# -- an endless service: a few ms per item, drains quickly -----------------------------


def slow(x: int) -> int:
    """Take about a millisecond."""
    time.sleep(0.001)
    return x


endless = pipekit.Pipeline("endless", telemetry=False, buffer_size=100, batch_size=10)
endless.add_stage("work", slow, workers=4)
endless.source(itertools.count)


# -- an endless service whose drain would take minutes ----------------------------------


def sluggish(x: int) -> int:
    """Take a tenth of a second: a backlog of 200 items takes 20 s to drain."""
    time.sleep(0.1)
    return x


stuck = pipekit.Pipeline("stuck", telemetry=False, buffer_size=200, batch_size=1)
stuck.add_stage("work", sluggish, workers=1)
stuck.source(itertools.count)
