"""What runs inside a worker: a stage function over one micro-batch.

The same code runs in a worker thread and in a worker process. The loop is chosen
once per stage (:func:`make_runner`): the common case (no timeout, no per-item trace
context) is a tight ``for`` loop that calls the function directly and enters the
retry machinery only for an item that raised.
"""

from __future__ import annotations

import math
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipekit.errors import ItemTimeoutError
from pipekit.retry import Retry, retry_call

__all__ = ["DROP", "BatchResult", "Progress", "StageWork", "make_runner"]


class _Drop:
    """The type of :data:`DROP`."""

    _instance: _Drop | None = None

    def __new__(cls) -> _Drop:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "pipekit.DROP"

    def __reduce__(self) -> str:
        return "DROP"


DROP = _Drop()
"""Return this from a stage function to drop the item: it produces no output."""


@dataclass(slots=True)
class BatchResult:
    """What one batch produced.

    ``outputs`` (and ``out_ctxs``, parallel to it when contexts travel) go downstream;
    ``failures`` hold ``(index, item, error, attempts)`` for items that failed for good;
    ``done`` counts items finished (``succeeded + len(failures)``), which is less than
    the batch size only when the batch was abandoned part way.
    """

    outputs: list[Any]
    out_ctxs: list[Any] | None
    failures: list[tuple[int, Any, BaseException, int]]
    succeeded: int
    dropped: int
    retries: int
    timed_out: int
    busy: float
    cpu: float
    done: int


class Progress:
    """Shared between a thread worker and the dispatcher's watchdog (timeouts only).

    The worker commits each finished item under ``lock``; the watchdog, under the same
    lock, can abandon the batch and take what was committed so far.
    """

    __slots__ = ("abandoned", "attempt", "done", "dropped", "failures", "lock", "out",
                 "out_ctxs", "retries", "started")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.attempt = 0
        self.started = 0.0
        self.done = 0
        self.out: list[Any] = []
        self.out_ctxs: list[Any] | None = None
        self.failures: list[tuple[int, Any, BaseException, int]] = []
        self.dropped = 0
        self.retries = 0


@dataclass(frozen=True, slots=True)
class StageWork:
    """Everything a worker needs to run a stage's function (pickled once per process)."""

    fn: Callable[[Any], Any]
    retry: Retry
    timeout: float | None
    fanout: bool
    enter: Callable[[Any], Any] | None = None  # ctx -> context manager, when contexts travel


def make_runner(work: StageWork, *, alarm: bool) -> Callable[..., BatchResult | None]:
    """Build the batch loop for a stage, once.

    Args:
        work: the stage function and its policies.
        alarm: enforce ``timeout`` with SIGALRM (a process worker's main thread);
            otherwise a thread worker publishes its progress for the watchdog.
    """
    fn, policy, timeout, fanout = work.fn, work.retry, work.timeout, work.fanout
    enter = work.enter
    perf, cpu = time.perf_counter, time.thread_time

    def finish(outputs: list[Any], out_ctxs: list[Any] | None,
               failures: list[tuple[int, Any, BaseException, int]], succeeded: int,
               dropped: int, retries: int, timed_out: int, t0: float, c0: float,
               done: int) -> BatchResult:
        return BatchResult(outputs, out_ctxs, failures, succeeded, dropped, retries,
                           timed_out, perf() - t0, cpu() - c0, done)

    fast = _fast_runner(fn, policy, fanout, finish)
    if timeout is None and enter is None:
        return fast
    careful = _careful_runner(work, alarm, finish)
    if timeout is not None:
        return careful

    def run(items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
            progress: Progress | None = None) -> BatchResult | None:
        # Contexts travel only with sampled items: untraced runs of a batch take the
        # fast loop, each traced item the careful one.
        if ctxs is None:
            return fast(items, ctxs, attempts, progress)
        return _mixed(fast, careful, items, ctxs, attempts)

    return run


def _mixed(fast: Callable[..., BatchResult | None], careful: Callable[..., BatchResult | None],
           items: list[Any], ctxs: list[Any], attempts: list[int] | None) -> BatchResult:
    t0, c0 = time.perf_counter(), time.thread_time()
    out: list[Any] = []
    out_ctxs: list[Any] = []
    failures: list[tuple[int, Any, BaseException, int]] = []
    succeeded = dropped = retries = timed_out = 0
    n = len(items)
    i = 0
    while i < n:
        j = i + 1
        traced = ctxs[i] is not None
        if not traced:
            while j < n and ctxs[j] is None:
                j += 1
        part = (careful if traced else fast)(
            items[i:j], ctxs[i:j] if traced else None,
            attempts[i:j] if attempts is not None else None, None)
        assert part is not None  # no watchdog without a timeout
        out.extend(part.outputs)
        out_ctxs.extend(part.out_ctxs if part.out_ctxs is not None
                        else [None] * len(part.outputs))
        failures.extend((k + i, x, e, a) for k, x, e, a in part.failures)
        succeeded += part.succeeded
        dropped += part.dropped
        retries += part.retries
        timed_out += part.timed_out
        i = j
    return BatchResult(out, out_ctxs, failures, succeeded, dropped, retries, timed_out,
                       time.perf_counter() - t0, time.thread_time() - c0, n)


def _fast_runner(fn: Callable[[Any], Any], policy: Retry, fanout: bool,
                 finish: Callable[..., BatchResult]) -> Callable[..., BatchResult | None]:
    perf, cpu = time.perf_counter, time.thread_time

    def run(items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
            progress: Progress | None = None) -> BatchResult:
        t0, c0 = perf(), cpu()
        out: list[Any] = []
        append = out.extend if fanout else out.append
        failures: list[tuple[int, Any, BaseException, int]] = []
        n = len(items)
        start = retries = dropped = 0
        before = 0
        while start < n:
            i = start
            try:
                if fanout:
                    for i in range(start, n):
                        before = len(out)
                        out.extend(fn(items[i]))
                        if len(out) == before:
                            dropped += 1
                else:
                    for i in range(start, n):
                        r = fn(items[i])
                        if r is DROP:
                            dropped += 1
                        else:
                            append(r)
                break
            except Exception as exc:
                if fanout:
                    del out[before:]
                prior = attempts[i] if attempts is not None else 0
                made, gone_empty = _recover(fn, policy, fanout, items[i], exc, prior, i, out,
                                            failures)
                retries += made
                dropped += gone_empty
                start = i + 1
        failed = len(failures)
        return finish(out, None, failures, n - failed, dropped, retries, 0, t0, c0, n)

    return run


def _recover(fn: Callable[[Any], Any], policy: Retry, fanout: bool, item: Any,
             exc: BaseException, prior: int, index: int, out: list[Any],
             failures: list[tuple[int, Any, BaseException, int]],
             should_stop: Callable[[], bool] | None = None) -> tuple[int, int]:
    """Retry one failed item; append its output or record its failure.

    Returns ``(retries made, 1 if it succeeded with no output else 0)``.
    """
    if policy.retries(exc) and prior + 1 < policy.attempts:
        left = Retry(attempts=policy.attempts - prior, backoff=policy.backoff,
                     max_backoff=policy.max_backoff, jitter=policy.jitter,
                     on=policy.on) if prior else policy
        result, made, err = retry_call(left, fn, item, should_stop=should_stop)
        if err is None:
            if fanout:
                before = len(out)
                out.extend(result)
                return made, int(len(out) == before)
            if result is DROP:
                return made, 1
            out.append(result)
            return made, 0
        failures.append((index, item, err, prior + 1 + made))
        return made, 0
    failures.append((index, item, exc, prior + 1))
    return 0, 0


def _careful_runner(work: StageWork, alarm: bool,
                    finish: Callable[..., BatchResult]) -> Callable[..., BatchResult | None]:
    """The loop with timeouts and/or per-item contexts: bookkeeping per item."""
    fn, policy, timeout, fanout, enter = (work.fn, work.retry, work.timeout, work.fanout,
                                          work.enter)
    perf, cpu = time.perf_counter, time.thread_time
    threaded_timeout = timeout is not None and not alarm

    def run(items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
            progress: Progress | None = None) -> BatchResult | None:
        t0, c0 = perf(), cpu()
        p = progress if (threaded_timeout and progress is not None) else Progress()
        p.out_ctxs = [] if ctxs is not None else None
        timed_out = 0

        def call(x: Any) -> Any:
            if threaded_timeout:
                with p.lock:
                    if p.abandoned:
                        raise _Gone
                    p.attempt += 1
                    p.started = perf()
                try:
                    return fn(x)
                finally:
                    # the wait before a retry is not part of a call's time
                    p.started = math.inf
            elif timeout is not None:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    return fn(x)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            return fn(x)

        def gone() -> bool:
            return p.abandoned

        for i, x in enumerate(items):
            ctx = ctxs[i] if ctxs is not None else None
            tmp: list[Any] = []
            fails: list[tuple[int, Any, BaseException, int]] = []
            made = empty = 0
            cm = enter(ctx) if (enter is not None and ctx is not None) else None
            if cm is not None:
                cm.__enter__()
            try:
                _call_one(call, x, fanout, tmp)
                if not fanout and tmp[0] is DROP:
                    tmp.clear()
                empty = int(not tmp)
            except _Gone:
                return None
            except Exception as exc:
                tmp.clear()
                prior = attempts[i] if attempts is not None else 0
                made, empty = _recover(call, policy, fanout, x, exc, prior, i, tmp, fails,
                                       gone)
            finally:
                if cm is not None:
                    cm.__exit__(None, None, None)
            with p.lock:
                if p.abandoned:
                    return None
                p.retries += made
                if fails:
                    p.failures.extend(fails)
                    if isinstance(fails[0][2], ItemTimeoutError):
                        timed_out += 1
                else:
                    p.dropped += empty
                    p.out.extend(tmp)
                    if p.out_ctxs is not None and tmp:
                        p.out_ctxs.extend([ctx] * len(tmp))
                p.done = i + 1
                p.attempt = 0  # attempts are counted per item
        with p.lock:
            if p.abandoned:
                return None
            return finish(p.out, p.out_ctxs, p.failures, len(items) - len(p.failures),
                          p.dropped, p.retries, timed_out, t0, c0, len(items))

    return run


def _call_one(call: Callable[[Any], Any], x: Any, fanout: bool, out: list[Any]) -> None:
    if fanout:
        out.extend(call(x))
    else:
        out.append(call(x))


class _Gone(BaseException):
    """Internal: the watchdog abandoned this batch; stop at once."""


# -- process workers -----------------------------------------------------------------

_installed: dict[str, Callable[..., BatchResult | None]] = {}


def _on_alarm(signum: int, frame: Any) -> None:
    raise ItemTimeoutError("stage call timed out")


def install(key: str, payload: bytes) -> None:
    """Process-pool initializer: unpickle the stage's work once per worker process."""
    work: StageWork = pickle.loads(payload)
    if work.timeout is not None:
        signal.signal(signal.SIGALRM, _on_alarm)
    # A worker process leaves SIGINT to its parent: Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _installed[key] = make_runner(work, alarm=True)


def run_installed(key: str, items: list[Any], ctxs: list[Any] | None,
                  attempts: list[int] | None) -> BatchResult | None:
    """Run a batch in a worker process with the stage installed by :func:`install`."""
    result = _installed[key](items, ctxs, attempts, None)
    if result is not None and result.failures:
        # An error that does not survive pickling would break the whole pool when the
        # parent unpickles the result (it looks like a dead worker): send a copy.
        result.failures = [(i, x, _portable(err), a) for i, x, err, a in result.failures]
    return result


def _portable(err: BaseException) -> Any:
    """``err``, or a stand-in that unpickles as the same exception type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        pass
    else:
        return err
    state: dict[str, Any] = {}
    for name, value in getattr(err, "__dict__", {}).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        state[name] = value
    args: tuple[Any, ...] = err.args
    try:
        pickle.dumps(args)
    except Exception:
        args = (str(err),)
    copy = _ErrorCopy(type(err), args, state, str(err))
    try:
        pickle.dumps(copy)
    except Exception:  # the type itself cannot be imported by the parent
        return RuntimeError(f"{type(err).__module__}.{type(err).__qualname__}: {err}")
    return copy


class _ErrorCopy:
    """Pickles as the exception it copies, rebuilt without calling its ``__init__``."""

    __slots__ = ("args", "cls", "state", "text")

    def __init__(self, cls: type[BaseException], args: tuple[Any, ...],
                 state: dict[str, Any], text: str) -> None:
        self.cls, self.args, self.state, self.text = cls, args, state, text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.cls, self.args, self.state, self.text))


def _rebuild_error(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any],
                   text: str) -> BaseException:
    try:
        err = cls.__new__(cls)
        err.args = args
        if state:
            err.__dict__.update(state)
    except Exception:
        return RuntimeError(f"{cls.__module__}.{cls.__qualname__}: {text}")
    return err
