"""A stage: its spec, and the runner that moves its micro-batches.

Data flow through one stage::

    inbox (Channel) --take--> dispatcher --submit(batch)--> pool worker
                                  ^                            |
                                  +------- done queue <--------+  (future callback)
                                  |
                                  +--emit(outputs)--> next stage's inbox (blocks when full)
                                  +--dead letters---> the run's dead-letter path

One dispatcher thread per stage (``pipekit-<stage>-dispatch``) does everything that
needs order: it forms batches, keeps at most ``workers`` of them in flight, handles
their completions, emits outputs in order for ordered stages, reserves keys for keyed
stages, abandons batches whose call ran past the timeout, and rebuilds a process pool
whose worker died. Workers only run the stage function, so the hot path holds no lock
but the channel's, once per batch.
"""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipekit._work import BatchResult, Progress, StageWork
from pipekit.errors import ItemTimeoutError, WorkerLostError
from pipekit.executors import StagePool, make_pool
from pipekit.queues import Channel, ChannelClosed, Chunk
from pipekit.retry import Retry
from pipekit.stats import DeadLetter, LatencySummary, StageStats, Unprocessed

__all__ = ["StageRunner", "StageSpec"]

log = logging.getLogger("pipekit.stage")

# A share of the queue worth splitting off to another idle worker takes at least this.
_SPLIT_SECONDS = 0.001
# The largest batch before the stage has measured how long its items take.
_FIRST_BATCH = 8
# Latency buckets (seconds) for the local per-item service-time histogram.
_BOUNDS = tuple(1e-6 * 10 ** (k / 8) for k in range(8 * 8))  # 1 µs .. ~100 s


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpec:
    """The validated settings of one stage (built by ``Pipeline.add_stage``)."""

    name: str
    fn: Callable[[Any], Any]
    min_workers: int
    max_workers: int
    workers: int
    executor: str = "thread"
    batch_size: int = 100
    ordered: bool = False
    key: Callable[[Any], Hashable] | None = None
    retry: Retry = field(default_factory=lambda: Retry(attempts=1))
    timeout: float | None = None
    on_shutdown: Callable[[], Any] | None = None
    fanout: bool = False
    autoscale: Any = None  # an AutoscalePolicy when min_workers < max_workers
    options: dict[str, Any] = field(default_factory=dict)


def _linger_below(cap: int) -> int:
    """Wait for a batch to fill only while fewer items than this wait.

    Lingering is for a trickle (items submitted one by one). A quarter of a batch
    already waiting means a stream, or a finished batch from upstream: take it now
    rather than hold the workers idle.
    """
    return max(1, cap // 4)


class _Flight:
    """One batch in flight (or one part of a batch that was split)."""

    __slots__ = ("alone", "chunk", "future", "gen", "path", "progress", "seq", "started")

    def __init__(self, seq: int, path: tuple[int, ...], chunk: Chunk, started: float,
                 progress: Progress | None, gen: int) -> None:
        self.seq = seq
        self.path = path
        self.chunk = chunk
        self.started = started
        self.progress = progress
        self.gen = gen
        self.alone = False  # ran with nothing beside it (after a worker loss)
        self.future: Future[BatchResult | None] | None = None


class StageRunner:
    """Runs one stage of a run: owns its inbox's consumer side, its pool and its counters.

    Args:
        spec: the stage settings.
        inbox: the channel it reads.
        emit: puts a chunk of outputs downstream (blocks while downstream is full;
            raises ChannelClosed when the run aborts).
        dead: receives each item that failed for good.
        linger: seconds to wait for a batch to fill.
        clock: monotonic clock.
        enter: turns an item's carried context into a context manager (tracing), or None.
        observer: telemetry hook with ``on_batch(stage, result, n)``, or None.
    """

    def __init__(self, spec: StageSpec, inbox: Channel, emit: Callable[[Chunk], None],
                 dead: Callable[[DeadLetter], None], *, linger: float,
                 clock: Callable[[], float] = time.monotonic,
                 enter: Callable[[Any], Any] | None = None, observer: Any = None,
                 on_finished: Callable[[StageRunner], None] | None = None,
                 wire: tuple[Callable[[list[Any]], list[Any]],
                             Callable[[list[Any] | None], list[Any] | None]] | None = None,
                 next_name: str = "sink") -> None:
        self.spec = spec
        self.name = spec.name
        self.inbox = inbox
        self._emit = emit
        self._dead = dead
        self._linger = linger
        self._clock = clock
        self._observer = observer
        self._on_finished = on_finished
        self._next_name = next_name
        self._wire = wire
        self._enter_fn = enter
        work = StageWork(fn=spec.fn, retry=spec.retry, timeout=spec.timeout,
                         fanout=spec.fanout, enter=enter)
        self.pool: StagePool = make_pool(spec.executor, spec.name, work, spec.max_workers,
                                         spec.options)
        self._watch = spec.timeout is not None and self.pool.watch_progress
        self.workers = spec.workers
        self.desired_workers = spec.workers
        self.pool.resize(self.workers)
        self._wake = threading.Event()
        inbox.set_listener(self._wake)
        self._done: queue.SimpleQueue[_Flight] = queue.SimpleQueue()
        self._flights: set[_Flight] = set()
        # After a worker process died: batches that were in flight with the one that
        # killed it, each to run again on its own so only the culprit is blamed.
        self._suspects: deque[_Flight] = deque()
        self._isolated: _Flight | None = None
        self._in_flight_items = 0
        self._seq = 0
        self._outstanding: dict[int, int] = {}
        self._parts: dict[int, list[tuple[tuple[int, ...], list[Any], list[Any] | None]]] = {}
        self._next_emit = 0
        # keyed stages
        self._key = spec.key
        self._busy_keys: dict[Hashable, int] = {}
        self._seq_keys: dict[int, set[Hashable]] = {}
        self._held: dict[Hashable, deque[tuple[Any, Any, int]]] = {}
        self._held_count = 0
        self._ready: deque[tuple[Hashable, deque[tuple[Any, Any, int]]]] = deque()
        # ordered keyed stages: items held back in arrival order, (key, item, ctx, attempts)
        self._blocked: deque[tuple[Hashable, Any, Any, int]] = deque()
        # counters (written by the dispatcher thread only)
        self.received = self.succeeded = self.emitted = self.dropped = 0
        self.failed = self.retried = self.timed_out = self.workers_lost = 0
        self.batches = self.stuck = 0
        self.busy_seconds = self.cpu_seconds = self.blocked_seconds = 0.0
        self._hist = [0] * (len(_BOUNDS) + 1)
        self._lat_sum = 0.0
        self._lat_count = 0
        self._lat_max = 0.0
        self._per_item = 0.0  # smoothed seconds per item, sizes batches
        # lifecycle
        self.state = "running"
        self._abort = False
        self._unprocessed: list[Unprocessed] = []
        self._thread = threading.Thread(target=self._loop, name=f"pipekit-{self.name}-dispatch",
                                        daemon=True)
        self.finished = threading.Event()
        self.error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher thread."""
        self._thread.start()

    def set_workers(self, n: int) -> None:
        """Change how many batches may be in flight (the autoscaler calls this)."""
        n = max(self.spec.min_workers, min(self.spec.max_workers, int(n)))
        self.workers = n
        self.desired_workers = n
        self.pool.resize(n)
        self._wake.set()

    def abort(self) -> None:
        """Stop now: abandon in-flight work and queued items (they become unprocessed)."""
        self._abort = True
        self._wake.set()

    def join(self, timeout: float | None) -> bool:
        """Wait for the dispatcher to finish; True when it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def take_unprocessed(self) -> list[Unprocessed]:
        """Items this stage could not finish (valid once it finished)."""
        return self._unprocessed

    # -- the dispatcher ----------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as exc:  # a bug in pipekit: never lose items silently
            self.error = exc
            log.exception("stage %s dispatcher failed", self.name)
            self._abort = True
            self._collect_leftovers()
        finally:
            self.state = "stopped"
            self.finished.set()
            if self._on_finished is not None:
                try:
                    self._on_finished(self)
                except Exception:
                    log.exception("stage %s: finishing callback failed", self.name)

    def _run_loop(self) -> None:
        wake = self._wake
        while True:
            self._drain_done()
            if self._abort:
                self._collect_leftovers()
                return
            if self._watch and self._flights:
                self._check_timeouts()
            if self._finished():
                return
            timeout = self._dispatch_some()
            if timeout == 0.0:
                continue
            wake.wait(timeout)
            wake.clear()

    def _finished(self) -> bool:
        return (self.inbox.closed and not self.inbox.depth and not self._flights
                and not self._suspects
                and not self._held_count and not self._ready)

    def _dispatch_some(self) -> float | None:
        """Start batches while there is room; return how long to sleep (None: until woken)."""
        sleep: float | None = None
        if self._watch and self._flights:
            sleep = min(0.05, self.spec.timeout or 0.05)
        if self._suspects or self._isolated is not None:
            if not self._flights and self._suspects:  # nothing else runs beside a suspect
                suspect = self._suspects.popleft()
                self._isolated = self._submit(suspect.chunk, suspect.seq, suspect.path)
                self._isolated.alone = True
            return sleep
        while len(self._flights) < self.workers:
            if self.spec.ordered and self._seq - self._next_emit >= 2 * self.workers:
                # finished batches wait for an earlier one: take no more, so a slow item
                # holds back its stage's intake instead of piling outputs up in memory
                return sleep
            depth = self.inbox.depth + self._ready_count() + len(self._blocked)
            if not depth:
                return sleep
            cap = self._cap()
            if depth < _linger_below(cap) and not self.inbox.closed and not self._ready \
                    and not self._blocked:
                oldest = self.inbox.oldest_enqueued()
                if oldest is not None:
                    wait = oldest + self._linger - self._clock()
                    if wait > 0:
                        return wait if sleep is None else min(sleep, wait)
            idle = self.workers - len(self._flights)
            n = self._batch_for(depth, idle, cap)
            if self._key is None:
                chunk = self.inbox.get_batch(n)
            elif self.spec.ordered:
                chunk = self._take_keyed_ordered(n)
            else:
                chunk = self._take_keyed(n)
            if chunk is None or not chunk.items:
                return 0.0 if self._ready else sleep
            self._submit(chunk)
            if self._watch:  # the watchdog must tick while the new batch runs
                sleep = min(0.05, self.spec.timeout or 0.05)
        return sleep

    def _batch_for(self, depth: int, idle: int, cap: int) -> int:
        """How many of ``depth`` waiting items the next batch takes.

        What waits is split across idle workers only when that buys parallelism: when
        a share would still take at least ``_SPLIT_SECONDS``. Fast items stay together
        (splitting them only adds hand-offs); slow items spread over every worker.
        """
        per = self._per_item
        floor = cap if per <= 0 else max(1, min(cap, math.ceil(_SPLIT_SECONDS / per)))
        return min(cap, max(floor, math.ceil(depth / idle)))

    def _cap(self) -> int:
        per = self._per_item
        if per <= 0:  # nothing measured yet: start small, so slow items cannot hog
            return min(self.spec.batch_size, _FIRST_BATCH)
        # a batch should take about pool.batch_seconds, so slow items make small batches
        return max(1, min(self.spec.batch_size, int(self.pool.batch_seconds / per)))

    def _submit(self, chunk: Chunk, seq: int | None = None,
                path: tuple[int, ...] = ()) -> _Flight:
        if seq is None:
            seq = self._seq
            self._seq += 1
            self._outstanding[seq] = 1
            self.received += len(chunk.items)
        progress = Progress() if self._watch else None
        flight = _Flight(seq, path, chunk, self._clock(), progress, self.pool.generation)
        self._flights.add(flight)
        self._in_flight_items += len(chunk.items)
        ctxs = chunk.ctxs
        if ctxs is not None and self._wire is not None:
            ctxs = self._wire[0](ctxs)  # contexts cross to processes as traceparent
        fut = self.pool.submit(chunk.items, ctxs, chunk.attempts, progress)
        flight.future = fut
        done_q, wake = self._done, self._wake

        def on_done(_: Future[Any], flight: _Flight = flight) -> None:
            done_q.put(flight)
            wake.set()

        fut.add_done_callback(on_done)
        return flight

    # -- keyed stages --------------------------------------------------------------

    def _take_keyed(self, n: int) -> Chunk | None:
        """Form a batch of items whose keys are not in flight; hold the others, in order."""
        items: list[Any] = []
        ctxs: list[Any] = []
        attempts: list[int] = []
        keys: set[Hashable] = set()
        busy, held = self._busy_keys, self._held
        ready = self._ready
        while ready and len(items) < n:
            # a released key's held items go out together, so no later batch can take
            # one of them while the key is in flight again
            k, group = ready.popleft()
            for x, c, a in group:
                items.append(x)
                ctxs.append(c)
                attempts.append(a)
            keys.add(k)
        if not ready and len(items) < n and self._held_count < self.inbox.capacity:
            chunk = self.inbox.get_batch(n - len(items))
            if chunk is not None:
                for k, x, c, a in self._keyed(chunk):
                    if k in busy or k in held:
                        held.setdefault(k, deque()).append((x, c, a))
                        self._held_count += 1
                        self.received += 1
                    else:
                        items.append(x)
                        ctxs.append(c)
                        attempts.append(a)
                        keys.add(k)
        return self._reserve(items, ctxs, attempts, keys)

    def _reserve(self, items: list[Any], ctxs: list[Any], attempts: list[int],
                 keys: set[Hashable]) -> Chunk | None:
        """Mark a keyed batch's keys busy under the next sequence number; the batch."""
        if not items:
            return None
        busy = self._busy_keys
        for k in keys:
            busy[k] = busy.get(k, 0) + 1
        self._seq_keys[self._seq] = keys
        return Chunk(items, ctxs if any(c is not None for c in ctxs) else None,
                     attempts if any(attempts) else None)

    def _keyed(self, chunk: Chunk) -> Iterator[tuple[Hashable, Any, Any, int]]:
        """``(key, item, ctx, attempts)`` per item; an item whose key fails is dead-lettered."""
        key = self._key
        assert key is not None
        cl, al = chunk.ctxs, chunk.attempts
        for i, x in enumerate(chunk.items):
            c = cl[i] if cl is not None else None
            a = al[i] if al is not None else 0
            try:
                k = key(x)
                hash(k)
            except Exception as exc:
                self.received += 1
                self._fail(x, exc, a + 1)
                continue
            yield k, x, c, a

    def _take_keyed_ordered(self, n: int) -> Chunk | None:
        """Form a batch for an ordered keyed stage, strictly in arrival order.

        Batches leave in the order they are formed, so an item whose key is in flight
        holds back every item behind it (head-of-line blocking) rather than let later
        items overtake it.
        """
        items: list[Any] = []
        ctxs: list[Any] = []
        attempts: list[int] = []
        keys: set[Hashable] = set()
        busy, blocked = self._busy_keys, self._blocked
        while blocked and len(items) < n and blocked[0][0] not in busy:
            k, x, c, a = blocked.popleft()
            self._held_count -= 1
            self.received -= 1  # counted again when submitted
            items.append(x)
            ctxs.append(c)
            attempts.append(a)
            keys.add(k)
        if not blocked and len(items) < n:
            chunk = self.inbox.get_batch(n - len(items))
            if chunk is not None:
                for k, x, c, a in self._keyed(chunk):
                    if blocked or k in busy:
                        blocked.append((k, x, c, a))
                        self._held_count += 1
                        self.received += 1
                    else:
                        items.append(x)
                        ctxs.append(c)
                        attempts.append(a)
                        keys.add(k)
        return self._reserve(items, ctxs, attempts, keys)

    def _ready_count(self) -> int:
        return sum(len(g) for _, g in self._ready) if self._ready else 0

    def _release_keys(self, seq: int) -> None:
        keys = self._seq_keys.pop(seq, None)
        if not keys:
            return
        busy, held = self._busy_keys, self._held
        for k in keys:
            left = busy[k] - 1
            if left:
                busy[k] = left
                continue
            del busy[k]
            waiting = held.pop(k, None)
            if waiting:
                self._held_count -= len(waiting)
                self.received -= len(waiting)  # they are counted again when submitted
                self._ready.append((k, waiting))

    # -- completions ---------------------------------------------------------------

    def _drain_done(self) -> None:
        done = self._done
        while True:
            try:
                flight = done.get_nowait()
            except queue.Empty:
                return
            if flight in self._flights:
                self._complete(flight)
            elif flight.progress is not None and flight.progress.abandoned:
                self.stuck -= 1  # a call that timed out has returned at last
            # flight -> future -> done callback -> flight is a cycle: break it, or the
            # batch's items and outputs wait for the cyclic GC instead of going now
            flight.future = None

    def _complete(self, flight: _Flight) -> None:
        self._flights.discard(flight)
        if flight is self._isolated:
            self._isolated = None
        self._in_flight_items -= len(flight.chunk.items)
        fut = flight.future
        assert fut is not None
        exc = fut.exception()
        if exc is not None:
            if self.pool.is_worker_loss(exc):
                self._worker_lost(flight, exc)
            else:
                self._batch_error(flight, exc)
            return
        result = fut.result()
        if result is None:  # an abandoned thread batch returned late: already handled
            return
        if result.out_ctxs is not None and self._wire is not None:
            result.out_ctxs = self._wire[1](result.out_ctxs)
        self._account(flight, result)

    def _account(self, flight: _Flight, r: BatchResult) -> None:
        self._count(r)
        for _, item, err, attempts in r.failures:
            self._fail(item, err, attempts)
        if self._observer is not None:
            try:
                self._observer.on_batch(self, r, flight.started - flight.chunk.enqueued,
                                        flight.started, flight.chunk.ctxs)
            except Exception:  # telemetry never breaks the pipeline
                log.debug("telemetry observer failed", exc_info=True)
        self._part_done(flight, r.outputs, r.out_ctxs)

    def _count(self, r: BatchResult) -> None:
        """Add a finished batch to the counters (failures count where they are handled)."""
        n = r.done
        self.batches += 1
        self.succeeded += r.succeeded
        self.dropped += r.dropped
        self.retried += r.retries
        self.timed_out += r.timed_out
        self.busy_seconds += r.busy
        self.cpu_seconds += r.cpu
        if n:
            per = r.busy / n
            self._per_item = per if not self._per_item else 0.8 * self._per_item + 0.2 * per
            self._hist[bisect.bisect_left(_BOUNDS, per)] += n
            self._lat_sum += r.busy
            self._lat_count += n
            self._lat_max = max(self._lat_max, per)

    def _part_done(self, flight: _Flight, outputs: list[Any], ctxs: list[Any] | None) -> None:
        seq = flight.seq
        left = self._outstanding[seq] - 1
        if not self.spec.ordered:
            if outputs:
                self._send(Chunk(outputs, ctxs))
            if left:
                self._outstanding[seq] = left
                return
            del self._outstanding[seq]
            self._release_keys(seq)
            return
        self._parts.setdefault(seq, []).append((flight.path, outputs, ctxs))
        if left:
            self._outstanding[seq] = left
            return
        del self._outstanding[seq]
        self._release_keys(seq)
        # emit every completed sequence number that is next in line
        while self._next_emit in self._parts and self._next_emit not in self._outstanding:
            parts = sorted(self._parts.pop(self._next_emit), key=lambda p: p[0])
            self._next_emit += 1
            out: list[Any] = []
            cx: list[Any] | None = [] if any(p[2] is not None for p in parts) else None
            for _, o, c in parts:
                out.extend(o)
                if cx is not None:
                    cx.extend(c if c is not None else [None] * len(o))
            if out:
                self._send(Chunk(out, cx))

    def _send(self, chunk: Chunk) -> None:
        if self._abort:
            self._unsent(chunk)
            return
        t0 = self._clock()
        try:
            self._emit(chunk)
        except ChannelClosed:
            self._unsent(chunk)
            return
        finally:
            waited = self._clock() - t0
            if waited > 0.001:
                self.blocked_seconds += waited
        self.emitted += len(chunk.items)

    def _unsent(self, chunk: Chunk) -> None:
        """Outputs that could not go downstream: unprocessed at the next stage."""
        for x in chunk.items:
            self._unprocessed.append(Unprocessed(self._next_name, x, "queued"))

    def _fail(self, item: Any, err: BaseException, attempts: int,
              count_received: bool = False) -> None:
        self.failed += 1
        try:
            self._dead(DeadLetter(self.name, item, err, attempts))
        except Exception:
            log.exception("dead-letter handler failed for an item of stage %s", self.name)

    def _batch_error(self, flight: _Flight, exc: BaseException) -> None:
        """The batch itself failed (not one item): e.g. its items would not pickle."""
        items = flight.chunk.items
        if len(items) > 1 and _is_pickling_error(exc):
            self._split(flight, bump=False)
            return
        atts = flight.chunk.attempts
        for i, x in enumerate(items):
            err: BaseException = exc
            if _is_pickling_error(exc):
                from pipekit.errors import NotPicklableError

                what = "an item" if not _pickles(x) else "the output for an item"
                err = NotPicklableError(
                    f"stage {self.name!r} runs on executor={self.spec.executor!r} and "
                    f"could not pickle {what} "
                    f"of type {type(x).__name__} ({exc}); make it picklable or use "
                    f"executor='thread'")
                err.__cause__ = exc
            self._fail(x, err, (atts[i] if atts else 0) + 1)
        self._part_done(flight, [], None)

    def _split(self, flight: _Flight, bump: bool) -> None:
        """Run a failed batch again as two halves (a dead worker or a bad item)."""
        chunk = flight.chunk
        half = (len(chunk.items) + 1) // 2
        a, b = chunk.split(half)
        self._outstanding[flight.seq] += 1
        self._submit(a, flight.seq, (*flight.path, 0))
        self._submit(b, flight.seq, (*flight.path, 1))

    def _worker_lost(self, flight: _Flight, exc: BaseException) -> None:
        """A worker process died: rebuild the pool, then find the culprit.

        Every batch in flight in the pool breaks with it, so a batch is blamed only when
        it broke the pool while running alone: the others run again, one at a time, and
        a blamed batch is split until the item that kills its worker is found.
        """
        if flight.gen == self.pool.generation:
            self.workers_lost += 1
        self.pool.rebuild(flight.gen)
        chunk = flight.chunk
        if self._abort:
            self._left_in_flight(flight)
            return
        if not flight.alone:
            self._suspects.append(flight)
            return
        if len(chunk.items) > 1:
            half = (len(chunk.items) + 1) // 2
            a, b = chunk.split(half)
            self._outstanding[flight.seq] += 1
            for part, step in ((a, 0), (b, 1)):
                self._suspects.append(_Flight(flight.seq, (*flight.path, step), part,
                                              flight.started, None, flight.gen))
            return
        attempts = (chunk.attempts[0] if chunk.attempts else 0) + 1
        if attempts >= max(2, self.spec.retry.attempts):
            err = WorkerLostError(
                f"the worker process running stage {self.name!r} died ({exc}); the item was "
                f"tried {attempts} times")
            err.__cause__ = exc
            self._fail(chunk.items[0], err, attempts)
            self._part_done(flight, [], None)
            return
        self.retried += 1
        self._suspects.append(_Flight(flight.seq, flight.path,
                                      Chunk(chunk.items, chunk.ctxs, [attempts]),
                                      flight.started, None, flight.gen))

    # -- timeouts --------------------------------------------------------------------

    def _check_timeouts(self) -> None:
        limit = self.spec.timeout
        assert limit is not None
        now = time.perf_counter()
        for flight in list(self._flights):
            p = flight.progress
            if p is None or not p.attempt:
                continue
            with p.lock:
                if p.abandoned or now - p.started <= limit:
                    continue
                p.abandoned = True
                done, attempt = p.done, p.attempt
                out, ctxs, failures = list(p.out), p.out_ctxs, list(p.failures)
                dropped, retries = p.dropped, p.retries
            self._abandon(flight, done, attempt, out, ctxs, failures, dropped, retries)

    def _abandon(self, flight: _Flight, done: int, attempt: int, out: list[Any],
                 ctxs: list[Any] | None, failures: list[Any], dropped: int,
                 retries: int) -> None:
        """A call ran past the timeout: keep what finished, fail or retry the stuck item,
        and run the rest of the batch on a fresh worker."""
        self._flights.discard(flight)
        self._in_flight_items -= len(flight.chunk.items)
        self.stuck += 1
        self.timed_out += 1
        chunk = flight.chunk
        prior = chunk.attempts[done] if chunk.attempts else 0
        stuck_item = chunk.items[done]
        tries = prior + attempt
        err = ItemTimeoutError(
            f"stage {self.name!r} call ran longer than its timeout of {self.spec.timeout} s")
        rest_items = chunk.items[done + 1:]
        rest = Chunk(rest_items, chunk.ctxs[done + 1:] if chunk.ctxs else None,
                     chunk.attempts[done + 1:] if chunk.attempts else None)
        retry_stuck = self.spec.retry.retries(err) and tries < self.spec.retry.attempts
        if retry_stuck:
            self.retried += 1
            head_ctx = [chunk.ctxs[done]] if chunk.ctxs else None
            rest = Chunk.join([Chunk([stuck_item], head_ctx, [tries]),
                               Chunk(rest.items, rest.ctxs or (None if head_ctx is None else
                                     [None] * len(rest.items)),
                                     rest.attempts or [0] * len(rest.items))])
        result = BatchResult(out, ctxs, failures, done - len(failures), dropped, retries,
                             0, 0.0, 0.0, done)
        if not retry_stuck:
            result.failures.append((done, stuck_item, err, tries))
            result.done += 1
        log.warning("stage %s: a call timed out; its worker is left behind", self.name,
                    extra={"pipekit": {"event": "item_timeout", "stage": self.name,
                                       "timeout": self.spec.timeout}})
        if rest.items:
            self._outstanding[flight.seq] += 1
            self._submit(rest, flight.seq, (*flight.path, 1))
            flight.path = (*flight.path, 0)
        self._account(flight, result)

    # -- shutdown ------------------------------------------------------------------

    def _left_in_flight(self, flight: _Flight) -> None:
        for x in flight.chunk.items:
            self._unprocessed.append(Unprocessed(self.name, x, "in_flight"))

    def _collect_leftovers(self) -> None:
        """On abort: everything queued, held or in flight becomes unprocessed."""
        self._drain_done_for_abort()
        for flight in list(self._flights):
            p = flight.progress
            if p is not None:
                with p.lock:
                    p.abandoned = True
                    out, done = list(p.out), p.done
                if done:
                    self._send(Chunk(out))
                    for x in flight.chunk.items[done:]:
                        self._unprocessed.append(Unprocessed(self.name, x, "in_flight"))
                    continue
            self._left_in_flight(flight)
        self._flights.clear()
        for flight in self._suspects:
            self._left_in_flight(flight)
        self._suspects.clear()
        self._isolated = None
        for _, group in self._ready:
            for x, _c, _a in group:
                self._unprocessed.append(Unprocessed(self.name, x, "queued"))
        self._ready.clear()
        for waiting in self._held.values():
            for x, _c, _a in waiting:
                self._unprocessed.append(Unprocessed(self.name, x, "queued"))
        self._held.clear()
        for _k, x, _c, _a in self._blocked:
            self._unprocessed.append(Unprocessed(self.name, x, "queued"))
        self._blocked.clear()
        self._held_count = 0
        for chunk in self.inbox.drain():
            for x in chunk.items:
                self._unprocessed.append(Unprocessed(self.name, x, "queued"))
        for parts in self._parts.values():
            for _, outs, _c in parts:
                for x in outs:
                    self._unprocessed.append(Unprocessed(self._next_name, x, "queued"))
        self._parts.clear()

    def _drain_done_for_abort(self) -> None:
        """Completions that arrived before the abort still count as done."""
        done = self._done
        while True:
            try:
                flight = done.get_nowait()
            except queue.Empty:
                return
            if flight in self._flights:
                fut = flight.future
                if fut is not None and fut.exception() is None and fut.result() is not None:
                    self._flights.discard(flight)
                    r = fut.result()
                    assert r is not None
                    self._account_abort(flight, r)
            flight.future = None  # break the flight -> future -> callback cycle

    def _account_abort(self, flight: _Flight, r: BatchResult) -> None:
        self._in_flight_items -= len(flight.chunk.items)
        self.batches += 1
        self.succeeded += r.succeeded
        self.dropped += r.dropped
        for _, item, err, attempts in r.failures:
            self._fail(item, err, attempts)
        if r.outputs:
            self._unsent(Chunk(r.outputs))

    # -- introspection -----------------------------------------------------------

    def latency(self) -> LatencySummary:
        """Quantiles of per-item service time (from per-batch means, item-weighted)."""
        count = self._lat_count
        if not count:
            return LatencySummary()
        hist = list(self._hist)

        def q(p: float) -> float:
            target = p * count
            run = 0
            for i, c in enumerate(hist):
                run += c
                if run >= target:
                    return _BOUNDS[min(i, len(_BOUNDS) - 1)]
            return _BOUNDS[-1]

        return LatencySummary(count=count, mean=self._lat_sum / count, p50=q(0.5),
                              p95=q(0.95), p99=q(0.99), max=self._lat_max)

    def stats(self) -> StageStats:
        """A snapshot of the stage (racy reads of plain counters, fine for monitoring)."""
        cap = self.inbox.capacity
        return StageStats(
            name=self.name, executor=self.spec.executor,
            queue_depth=self.inbox.depth + self._held_count + len(self._ready)
            + sum(len(f.chunk.items) for f in list(self._suspects)),
            queue_capacity=cap, queue_peak=self.inbox.statistics().peak,
            in_flight=max(0, self._in_flight_items), workers=self.workers,
            desired_workers=self.desired_workers, min_workers=self.spec.min_workers,
            max_workers=self.spec.max_workers, received=self.received,
            succeeded=self.succeeded, emitted=self.emitted, dropped=self.dropped,
            failed=self.failed, retried=self.retried, timed_out=self.timed_out,
            workers_lost=self.workers_lost, stuck_workers=self.stuck, batches=self.batches,
            busy_seconds=self.busy_seconds, cpu_seconds=self.cpu_seconds,
            blocked_seconds=self.blocked_seconds, latency=self.latency(), state=self.state,
        )


def _pickles(x: Any) -> bool:
    import pickle

    try:
        pickle.dumps(x)
    except Exception:
        return False
    return True


def _is_pickling_error(exc: BaseException) -> bool:
    import pickle

    if isinstance(exc, pickle.PicklingError):
        return True
    text = str(exc)
    return isinstance(exc, TypeError | AttributeError) and (
        "pickle" in text or "Can't get local object" in text)
