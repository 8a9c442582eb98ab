"""Fixtures shared by pipekit's tests.

* Every test fails if it leaves threads behind: any new non-daemon thread, and any
  new ``pipekit-*`` thread (worker, dispatcher, sink, source, hook), still alive after
  a short grace period. A test whose hung call deliberately outlives it opts out with
  ``@pytest.mark.leaks_threads("why")``.
* ``executor`` runs a behaviour test once per executor kind ("thread", "process").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

# Threads that are finishing (a pool joining its workers, a process pool's manager
# thread noticing a dead worker) get this long to end before they count as leaked.
_GRACE_SECONDS = 3.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leaks_threads(reason): the test deliberately leaves a thread running past its "
        "end (a hung call that outlives its timeout); the thread-leak check is skipped",
    )


def _suspect(thread: threading.Thread) -> bool:
    return thread.is_alive() and (not thread.daemon or thread.name.startswith("pipekit-"))


@pytest.fixture(autouse=True)
def _no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("leaks_threads")
    if marker is not None:
        if not (marker.args or marker.kwargs.get("reason")):
            pytest.fail("@pytest.mark.leaks_threads needs a reason")
        yield
        return
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + _GRACE_SECONDS
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and _suspect(t)]
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    if leaked:
        pytest.fail(f"test leaked threads: {sorted(t.name for t in leaked)}", pytrace=False)


@pytest.fixture(params=["thread", "process"])
def executor(request: pytest.FixtureRequest) -> str:
    """The executor kind of a behaviour test that applies to both."""
    kind: str = request.param
    return kind
