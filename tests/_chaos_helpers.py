"""Stage functions, item ledgers and the signal child of the reliability suite.

Process workers import stage functions by name, so everything a process stage runs
lives here at module level. An item is a tuple ``(tag, index, kind, arg)``: ``tag``
makes items unique per run (module-level state survives between tests that share an
interpreter), ``kind`` says what :func:`chaos` does with it, ``arg`` parametrises it.

Run as a script, this module is the child interpreter of the signal tests
(:func:`child_main`): a pipeline over an endless source, served by the ops server on
the port the parent chose, printing ``READY`` once items flow and its ledger as one
``REPORT {json}`` line when it stops.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pipekit

Item = tuple[str, int, str, Any]

OK = "ok"
TRANSIENT = "transient"  # fails twice in a process, then succeeds
PERMANENT = "permanent"  # always raises ValueError
POISON = "poison"  # always raises RuntimeError
KILL_ONCE = "kill_once"  # SIGKILLs its worker process the first time (marker file in arg)
KILL_ALWAYS = "kill_always"  # SIGKILLs its worker process every time
STALL_ONCE = "stall_once"  # sleeps arg seconds on its first call in a process
LATENCY = "latency"  # sleeps arg seconds


def new_tag() -> str:
    """A fresh tag: items of one run never collide with another run's."""
    return uuid.uuid4().hex[:10]


def make_items(n: int, *, seed: int, mix: dict[str, float] | None = None,
               arg: dict[str, Any] | None = None, tag: str | None = None) -> list[Item]:
    """``n`` items whose kinds are drawn with a seeded RNG.

    Args:
        n: how many items.
        seed: the RNG seed (the same seed gives the same items but for the tag).
        mix: the probability of each non-``ok`` kind; the rest are ``ok``.
        arg: the ``arg`` of each kind (``latency`` items get a heavy-tailed pause).
        tag: the run tag (a fresh one by default).
    """
    rng = random.Random(seed)
    tag = tag or new_tag()
    mix = mix or {}
    arg = arg or {}
    items: list[Item] = []
    for i in range(n):
        roll, kind = rng.random(), OK
        for k, p in mix.items():
            if roll < p:
                kind = k
                break
            roll -= p
        value = arg.get(kind)
        if kind == LATENCY:
            value = heavy_tail(rng)
        items.append((tag, i, kind, value))
    return items


def heavy_tail(rng: random.Random, *, scale: float = 0.0002, cap: float = 0.05) -> float:
    """A Pareto-distributed pause (alpha 1.2: most are tiny, a few are long)."""
    return min(cap, scale * rng.paretovariate(1.2))


# -- stage functions (module level: process workers import them) -----------------------

_calls: Counter[Any] = Counter()
_stalled: set[Any] = set()
_lock = threading.Lock()


def chaos(item: Item) -> Item:
    """Do what the item's kind says, then return the item unchanged."""
    tag, index, kind, arg = item
    if kind == OK:
        return item
    if kind == LATENCY:
        time.sleep(arg)
        return item
    if kind == TRANSIENT:
        with _lock:
            _calls[item] += 1
            n = _calls[item]
        if n <= 2:
            raise OSError(f"transient failure {n} of item {index}")
        return item
    if kind == PERMANENT:
        raise ValueError(f"item {index} is malformed")
    if kind == POISON:
        raise RuntimeError(f"item {index} always fails")
    if kind == KILL_ONCE:
        marker = Path(arg) / f"{tag}-{index}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return item
    if kind == KILL_ALWAYS:
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == STALL_ONCE:
        with _lock:
            first = item not in _stalled
            _stalled.add(item)
        if first:
            time.sleep(arg)
        return item
    return item


def record_calls(item: Item) -> Item:
    """Like :func:`chaos`, and append the item's index to ``<arg dir>/calls-<pid>``.

    Lets a test count how many times each item was really called across processes.
    """
    tag, index, kind, arg = item
    if kind in (KILL_ONCE, KILL_ALWAYS) and arg is not None:
        with open(Path(arg) / f"calls-{tag}-{os.getpid()}", "a") as fh:
            fh.write(f"{index}\n")
    return chaos(item)


def calls_recorded(folder: Path, tag: str) -> Counter[int]:
    """The calls :func:`record_calls` wrote, by item index."""
    out: Counter[int] = Counter()
    for path in folder.glob(f"calls-{tag}-*"):
        out.update(int(line) for line in path.read_text().split())
    return out


def identity(x: Any) -> Any:
    """Return ``x``."""
    return x


def key_mod5(item: Item) -> int:
    """A key function: the item's index modulo 5."""
    return item[1] % 5


# -- accounting ----------------------------------------------------------------------


def check_ledger(submitted: Sequence[Any], outputs: Iterable[Any],
                 report: pipekit.RunReport) -> None:
    """Every submitted item ends in exactly one place: an output, a dead letter, or the
    report's unprocessed list; nothing is invented and nothing is counted twice.

    Needs a run whose stages return their item unchanged (or drop nothing) and a report
    that kept its dead letters.
    """
    want = Counter(submitted)
    outs = Counter(outputs)
    dead = Counter(d.item for d in report.dead_letters)
    left = Counter(u.item for u in report.unprocessed)
    assert len(report.dead_letters) == report.dead_letter_count, "dead letters not kept"
    got = outs + dead + left
    lost = want - got
    extra = got - want
    assert not lost, f"{sum(lost.values())} item(s) lost, e.g. {list(lost)[:5]}"
    assert not extra, f"{sum(extra.values())} item(s) duplicated or invented, e.g. " \
                      f"{list(extra)[:5]}"
    assert report.submitted == len(submitted), (report.submitted, len(submitted))
    assert report.submitted == report.outputs + report.dead_letter_count + len(
        report.unprocessed), "the report's own counts do not add up"


# -- memory: items alive -------------------------------------------------------------

_created = itertools.count()
_freed = itertools.count()


class Tracked:
    """A payload that counts its live instances (creation and finalisation counters).

    ``next()`` on an ``itertools.count`` is atomic under the GIL, so no lock is needed
    (a lock taken in ``__del__`` could deadlock when a collection runs it while the same
    thread holds the lock), and the count is exact under reference counting.
    """

    __slots__ = ("index", "payload")

    def __init__(self, index: int, size: int = 64) -> None:
        next(_created)
        self.index = index
        self.payload = bytes(size)

    def __del__(self) -> None:
        next(_freed)


def tracked_alive() -> int:
    """How many :class:`Tracked` objects exist now."""
    return _peek(_created) - _peek(_freed)


def _peek(counter: itertools.count[int]) -> int:
    # the next value of a count, without consuming it: its repr is "count(<n>)"
    return int(repr(counter)[len("count("):-1])


# -- the signal child ------------------------------------------------------------------

TOKEN = "chaos-token-5b1f0c"


def child_work(x: int) -> int:
    """The child's first stage: a little work; from item 40 on, calls hang in ``stuck`` mode."""
    mode = os.environ.get("CHAOS_MODE", "")
    if mode == "stuck" and x >= 40:
        if threading.current_thread() is threading.main_thread():
            time.sleep(3600)  # a process worker: only a kill ends the call
        threading.Event().wait()
    time.sleep(0.2 if mode == "second" else 0.002)
    return x


def child_main(argv: Sequence[str]) -> None:
    """Run the child pipeline: ``mode shutdown_timeout executor ops_port profile_dir``.

    The pipeline runs through :meth:`pipekit.Pipeline.run` (signals handled as the CLI
    does); the ops server listens on ``ops_port`` so the parent can watch readiness.
    """
    mode, timeout, executor = argv[0], float(argv[1]), argv[2]
    os.environ["CHAOS_MODE"] = mode  # process workers inherit it
    import logging

    from _chaos_helpers import child_work as work  # importable by name in workers

    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="LOG %(message)s")
    times: list[float] = []
    outputs: list[int] = []

    def source() -> Iterator[int]:
        for i in itertools.count():
            if i == 30:
                print("READY", flush=True)
            times.append(time.monotonic())
            yield i

    pipe = pipekit.Pipeline("chaos", telemetry=False, max_memory_mb=None, buffer_size=30,
                            ops_enabled=True, ops_port=int(argv[3]), ops_token=TOKEN,
                            profiling_dir=Path(argv[4]))
    pipe.add_stage("work", work, workers=2, batch_size=5, executor=executor)
    pipe.add_stage("pass", identity, workers=2)
    report = pipe.run(source(), sink=outputs.append, shutdown_timeout=timeout)
    yielded = len(times)
    want = Counter(range(yielded))
    got = Counter(outputs) + Counter(d.item for d in report.dead_letters) \
        + Counter(u.item for u in report.unprocessed)
    print("REPORT " + json.dumps({
        "reason": report.reason,
        "submitted": report.submitted,
        "yielded": yielded,
        "outputs": report.outputs,
        "dead": report.dead_letter_count,
        "unprocessed": len(report.unprocessed),
        "where": sorted({u.where for u in report.unprocessed}),
        "lost": sum((want - got).values()),
        "extra": sum((got - want).values()),
        "last_yields": times[-200:],
    }), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
