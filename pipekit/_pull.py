"""The fast path for plain thread stages: workers pull batches themselves.

A thread stage that is neither ordered nor keyed and has no timeout needs no
dispatcher: nothing has to be put back in order, no key reserved, no call watched.
For such a stage each worker thread (``pipekit-<stage>-<n>``) loops::

    take a micro-batch from the inbox  ->  run it  ->  put its outputs downstream

which is one thread hand-off per batch instead of three (dispatcher -> worker ->
dispatcher). Measured on the trivial 3-stage pipeline this is what makes batches of
100 pay: see docs/benchmarks.md. Everything else — batch sizing, linger, splitting
what waits across idle workers, accounting, abort — behaves as in
:class:`~pipekit.stage.StageRunner`, which this class extends; counters are updated
under one lock per batch, so totals stay exact.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

from pipekit._work import BatchResult, make_runner
from pipekit.queues import ChannelClosed, Chunk
from pipekit.stage import StageRunner, _linger_below
from pipekit.stats import DeadLetter, Unprocessed

__all__ = ["PullRunner", "pulls"]

log = logging.getLogger("pipekit.stage")


def pulls(spec: Any) -> bool:
    """Whether a stage can take the pull path (decided once, at start)."""
    return (spec.executor == "thread" and not spec.ordered and spec.key is None
            and spec.timeout is None)


class PullRunner(StageRunner):
    """A thread stage whose workers take their own batches (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbox.set_listener(None)  # workers wait on the channel itself
        spec = self.spec
        from pipekit._work import StageWork

        self._run_batch = make_runner(
            StageWork(fn=spec.fn, retry=spec.retry, timeout=None, fanout=spec.fanout,
                      enter=self._enter_fn), alarm=False)
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._numbers = itertools.count()
        self._busy = 0
        self._running: dict[int, Chunk] = {}  # batch id -> chunk, while a worker runs it
        self._batch_ids = itertools.count()
        self._alive = 0
        self._closed_exits = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads."""
        with self._lock:
            for _ in range(self.workers):
                self._spawn()

    def _spawn(self) -> None:
        n = next(self._numbers)
        t = threading.Thread(target=self._work, args=(n,), name=f"pipekit-{self.name}-{n}",
                             daemon=True)
        self._threads[n] = t
        self._alive += 1
        t.start()

    def set_workers(self, n: int) -> None:
        """Change the worker count: start threads now, or let extra ones leave when idle."""
        n = max(self.spec.min_workers, min(self.spec.max_workers, int(n)))
        with self._lock:
            self.workers = self.desired_workers = n
            while self._alive < n and not self.finished.is_set():
                self._spawn()
        self._wake.set()

    def abort(self) -> None:
        """Stop now: queued items and batches being run become unprocessed."""
        self._abort = True
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
            for chunk in running:
                self._in_flight_items -= len(chunk.items)
                self._unprocessed.extend(Unprocessed(self.name, x, "in_flight")
                                         for x in chunk.items)
        for chunk in self.inbox.drain():
            with self._lock:
                self._unprocessed.extend(Unprocessed(self.name, x, "queued")
                                         for x in chunk.items)
        self._wake.set()
        if self._alive == 0:
            self._finish()

    def join(self, timeout: float | None) -> bool:
        """Wait for the workers to leave; True when they all did."""
        return self.finished.wait(timeout)

    def _finish(self) -> None:
        with self._lock:
            if self.finished.is_set():
                return
            self.state = "stopped"
            self.finished.set()
        if self._on_finished is not None:
            try:
                self._on_finished(self)
            except Exception:
                log.exception("stage %s: finishing callback failed", self.name)

    # -- the worker loop ---------------------------------------------------------------

    def _work(self, number: int) -> None:
        try:
            while not self._abort:
                if self._alive > self.workers and self._leave(number):
                    return
                chunk = self._take()
                if chunk is None:
                    if self.inbox.closed and not self.inbox.depth:
                        break
                    continue
                self._run_one(chunk)
        except BaseException as exc:  # a bug in pipekit: never lose items silently
            self.error = exc
            log.exception("stage %s worker failed", self.name)
            self.abort()
        with self._lock:
            self._alive -= 1
            self._threads.pop(number, None)
            last = self._alive == 0
        if last:
            self._finish()

    def _leave(self, number: int) -> bool:
        """Retire this worker if the stage has more than it should (never mid-batch)."""
        with self._lock:
            if self._alive <= self.workers:
                return False
            self._alive -= 1
            self._threads.pop(number, None)
            return True

    def _take(self) -> Chunk | None:
        """Wait for a batch: full, or what is there once the linger has passed."""
        inbox = self.inbox
        while not self._abort:
            depth = inbox.depth
            if not depth:
                if inbox.closed:
                    return None
                inbox.wait(0.1)
                continue
            cap = self._cap()
            if depth < _linger_below(cap) and not inbox.closed:
                oldest = inbox.oldest_enqueued()
                if oldest is not None:
                    wait = oldest + self._linger - self._clock()
                    if wait > 0:
                        time.sleep(min(wait, 0.01))
                        continue
            idle = max(1, self.workers - self._busy)
            n = self._batch_for(depth, idle, cap)
            chunk = inbox.get_batch(n)
            if chunk is not None and chunk.items:
                return chunk
        return None

    def _run_one(self, chunk: Chunk) -> None:
        n = len(chunk.items)
        started = self._clock()
        with self._lock:
            bid = next(self._batch_ids)
            self._running[bid] = chunk
            self._busy += 1
            self.received += n
            self._in_flight_items += n
        r = self._run_batch(chunk.items, chunk.ctxs, chunk.attempts, None)
        with self._lock:
            self._busy -= 1
            if self._running.pop(bid, None) is None:
                return  # aborted while running: already reported as unprocessed
            self._in_flight_items -= n
            assert r is not None
            self._count(r)
        letters = [DeadLetter(self.name, item, err, attempts)
                   for _, item, err, attempts in r.failures]
        for letter in letters:
            try:
                self._dead(letter)
            except Exception:
                log.exception("dead-letter handler failed for an item of stage %s", self.name)
        if self._observer is not None:
            try:
                self._observer.on_batch(self, r, started - chunk.enqueued, started, chunk.ctxs)
            except Exception:  # telemetry never breaks the pipeline
                log.debug("telemetry observer failed", exc_info=True)
        if r.outputs:
            self._put_down(Chunk(r.outputs, r.out_ctxs))

    def _count(self, r: BatchResult) -> None:
        """Add a batch to the counters (the caller holds the lock)."""
        super()._count(r)
        self.failed += len(r.failures)  # dead letters are sent after the lock is released

    def _put_down(self, chunk: Chunk) -> None:
        t0 = self._clock()
        try:
            if self._abort:
                raise ChannelClosed
            self._emit(chunk)
        except ChannelClosed:
            with self._lock:
                self._unprocessed.extend(Unprocessed(self._next_name, x, "queued")
                                         for x in chunk.items)
            return
        waited = self._clock() - t0
        with self._lock:
            self.emitted += len(chunk.items)
            if waited > 0.001:
                self.blocked_seconds += waited
