"""The pipeline: a builder of named stages, and the ``Run`` that executes them.

Lifecycle of a run::

    start() -> running --(source exhausted, or shutdown())--> draining -> stopped
                  \\--(memory limit)--> paused --> running

``shutdown(timeout)`` computes one deadline: intake closes, every stage drains its
queue and in-flight batches until the deadline, then whatever is left is collected
into the report's ``unprocessed`` list; ``on_shutdown`` hooks run in reverse stage
order with the time that remains. Every submitted item ends in exactly one place: an
output, the dead-letter path, or ``unprocessed``.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Generator, Hashable, Iterable, Iterator
from datetime import timedelta
from typing import Any, TypeVar, overload

from pipekit.errors import (
    ConfigError,
    NotPicklableError,
    PipelineClosedError,
    PipelineStateError,
    QueueFullError,
    SubmitTimeoutError,
)
from pipekit.queues import Channel, ChannelClosed, ChannelFull, Chunk
from pipekit.retry import NO_RETRY, Retry
from pipekit.stage import StageRunner, StageSpec
from pipekit.stats import DeadLetter, PipelineStats, RunReport, Unprocessed

__all__ = ["Pipeline", "Run"]

log = logging.getLogger("pipekit.pipeline")

F = TypeVar("F", bound=Callable[..., Any])

_EXECUTORS = ("thread", "process", "dask")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= _NAME_OK:
        raise ConfigError(
            f"{kind} name must be 1 to 64 letters, digits, '_', '-' or '.' (got {name!r}); "
            f"it appears in metrics, thread names and file names"
        )
    return name


def _seconds(name: str, value: float | timedelta | None, *, allow_none: bool) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must be a number of seconds (got None)")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(
            f"{name} must be a positive number of seconds or a timedelta (got {value!r}); "
            f"use e.g. {name}=2.0" + (" or None for no limit" if allow_none else "")
        )
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False (got {value!r})")
    return value


def _wait_time(name: str, value: object) -> float | None:
    """A timeout argument: None (wait for ever) or a finite number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be None or a number of seconds >= 0 (got {value!r}); "
                          f"e.g. {name}=1.0")
    return float(value)


def _workers(value: Any, default: int) -> tuple[int, int, int, Any]:
    """Parse ``workers``: an int, a ``(min, max)`` pair, or an autoscaling policy."""
    if value is None:
        return default, default, default, None
    try:
        from pipekit.autoscale import AutoscalePolicy
    except ImportError:  # pragma: no cover - the module ships with pipekit
        AutoscalePolicy = None  # type: ignore[assignment,misc]  # noqa: N806
    if AutoscalePolicy is not None and (isinstance(value, AutoscalePolicy | tuple | list)):
        policy = AutoscalePolicy.from_workers(value)
        if policy.min_workers == policy.max_workers:
            return policy.min_workers, policy.min_workers, policy.min_workers, None
        return policy.min_workers, policy.max_workers, policy.min_workers, policy
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"workers must be a whole number >= 1 or a (min, max) pair (got {value!r}); "
            f"e.g. workers=4 or workers=(1, 16)"
        )
    return value, value, value, None


class Pipeline:
    """A named chain of stages.

    Build it once (usually at import time), then execute it with :meth:`run`,
    :meth:`map` or :meth:`start`; each of those creates an independent :class:`Run`.

    Args:
        name: the pipeline name (letters, digits, ``_ - .``); used in metrics and files.
        config: settings; by default :meth:`pipekit.Config.load` (``pipekit.toml`` and
            ``PIPEKIT_*`` variables).
        ordered: the default ``ordered`` of its stages (``config.ordered`` if None).
        telemetry: turn spans and metrics on or off (``config.telemetry_enabled`` if None).
        tracer_provider: OpenTelemetry tracer provider; the global one by default.
        meter_provider: OpenTelemetry meter provider; the global one by default.
        **settings: overrides of individual settings, e.g. ``buffer_size=100``.

    Raises:
        ConfigError: a bad name or setting.
    """

    def __init__(self, name: str, *, config: Any = None, ordered: bool | None = None,
                 telemetry: bool | None = None, tracer_provider: Any = None,
                 meter_provider: Any = None, **settings: Any) -> None:
        from pipekit.config import Config

        self.name = _check_name("pipeline", name)
        if config is None:
            config = Config.load(**settings)
        elif not isinstance(config, Config):
            raise ConfigError(f"config must be a pipekit.Config (got {type(config).__name__}); "
                              f"build one with pipekit.Config.load()")
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self.ordered = config.ordered if ordered is None else _flag("ordered", ordered)
        self.telemetry = config.telemetry_enabled if telemetry is None \
            else _flag("telemetry", telemetry)
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._specs: list[StageSpec] = []
        self._source: Iterable[Any] | Callable[[], Iterable[Any]] | None = None

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, stages={[s.name for s in self._specs]})"

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        """The stage specs, in order."""
        return tuple(self._specs)

    # -- building --------------------------------------------------------------------

    @overload
    def stage(self, fn: F, /) -> F: ...

    @overload
    def stage(self, fn: None = None, /, **options: Any) -> Callable[[F], F]: ...

    def stage(self, fn: Any = None, /, **options: Any) -> Any:
        """Add the decorated function as the next stage (named after the function).

        Takes the same keyword options as :meth:`add_stage` (``name=`` overrides the
        function name). Returns the function unchanged, so it stays callable and
        testable on its own.
        """
        def register(f: F) -> F:
            name: Any = options.pop("name", None) or getattr(f, "__name__", None)
            self.add_stage(name, f, **options)
            return f

        if fn is not None:
            return register(fn)
        return register

    def add_stage(
        self,
        name: str,
        fn: Callable[[Any], Any],
        *,
        workers: int | tuple[int, int] | Any = None,
        executor: str = "thread",
        batch_size: int | None = None,
        ordered: bool | None = None,
        key: Callable[[Any], Hashable] | None = None,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        on_shutdown: Callable[[], Any] | None = None,
        fanout: bool = False,
        mp_context: str = "forkserver",
    ) -> Pipeline:
        """Append a stage.

        Args:
            name: unique stage name.
            fn: called with one item; returns the output, :data:`pipekit.DROP` to drop
                the item, or (with ``fanout=True``) an iterable of outputs.
            workers: batches in flight at once: an int, ``(min, max)`` to autoscale, or
                an :class:`pipekit.AutoscalePolicy`. Default ``config.workers``.
            executor: ``"thread"``, ``"process"`` or ``"dask"`` (extra ``dask``).
            batch_size: the largest micro-batch (default ``config.batch_size``).
            ordered: emit outputs in the order items entered this stage.
            key: items with the same key run one at a time, in order.
            retry: the retry policy (default: no retry).
            timeout: the longest one call may run, in seconds.
            on_shutdown: called once at shutdown, stages in reverse order.
            fanout: ``fn`` returns an iterable; each element is an output.
            mp_context: start method of process workers.

        Returns:
            The pipeline, so calls chain.

        Raises:
            ConfigError: a bad option (the message names it and the fix).
            NotPicklableError: a process stage whose function cannot be pickled.
        """
        _check_name("stage", name)
        if any(s.name == name for s in self._specs):
            raise ConfigError(f"a stage named {name!r} already exists; stage names must be "
                              f"unique")
        if not callable(fn):
            raise ConfigError(f"stage {name!r}: fn must be callable (got {fn!r})")
        if executor not in _EXECUTORS:
            raise ConfigError(f"stage {name!r}: executor must be one of {_EXECUTORS} "
                              f"(got {executor!r})")
        if mp_context not in ("forkserver", "spawn", "fork"):
            raise ConfigError(f"stage {name!r}: mp_context must be 'forkserver', 'spawn' or "
                              f"'fork' (got {mp_context!r})")
        lo, hi, initial, policy = _workers(workers, self.config.workers)
        if batch_size is None:
            batch_size = self.config.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"stage {name!r}: batch_size must be a whole number >= 1 "
                              f"(got {batch_size!r})")
        if key is not None and not callable(key):
            raise ConfigError(f"stage {name!r}: key must be a function of the item "
                              f"(got {key!r})")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigError(f"stage {name!r}: retry must be a pipekit.Retry "
                              f"(got {retry!r}); e.g. retry=pipekit.Retry(attempts=3)")
        if on_shutdown is not None and not callable(on_shutdown):
            raise ConfigError(f"stage {name!r}: on_shutdown must be callable "
                              f"(got {on_shutdown!r})")
        spec = StageSpec(
            name=name, fn=fn, min_workers=lo, max_workers=hi, workers=initial,
            executor=executor, batch_size=batch_size,
            ordered=self.ordered if ordered is None else _flag(f"stage {name!r}: ordered",
                                                               ordered),
            key=key,
            retry=retry or NO_RETRY,
            timeout=_seconds(f"stage {name!r}: timeout", timeout, allow_none=True),
            on_shutdown=on_shutdown, fanout=_flag(f"stage {name!r}: fanout", fanout),
            autoscale=policy,
            options={"mp_context": mp_context, "dask_address": self.config.dask_address},
        )
        if executor == "dask":
            import pipekit.dask  # noqa: F401  (a missing extra is reported here)
        if executor != "thread":
            _check_picklable(spec)
        self._specs.append(spec)
        return self

    def source(self, src: Iterable[Any] | Callable[[], Iterable[Any]]) -> Pipeline:
        """Give the pipeline its own source: an iterable, or a function returning one.

        A function is called at each run (a generator function gives a fresh generator),
        so :meth:`run` with no argument, and ``pipekit run module:pipe``, can run it.
        """
        if not callable(src) and not hasattr(src, "__iter__"):
            raise ConfigError(f"source must be an iterable or a function returning one "
                              f"(got {type(src).__name__})")
        self._source = src
        return self

    # -- running ---------------------------------------------------------------------

    def start(self, *, sink: Callable[[Any], Any] | None = None,
              dead_letter: Callable[[DeadLetter], Any] | None = None,
              keep_dead_letters: bool | None = None, handle_signals: bool = False,
              shutdown_timeout: float | None = None) -> Run:
        """Start a run that takes items from :meth:`Run.submit` (an embedded pipeline).

        Args:
            sink: called with each output, in a thread of its own; without a sink,
                read outputs with :meth:`Run.results`.
            dead_letter: called with each :class:`pipekit.DeadLetter`.
            keep_dead_letters: keep dead letters in the report too (default: only when
                no ``dead_letter`` callable is given).
            handle_signals: install SIGINT/SIGTERM handlers (main thread only) that
                shut the run down; the previous handlers come back afterwards.
            shutdown_timeout: the default deadline of :meth:`Run.shutdown`.

        Raises:
            PipelineStateError: the pipeline has no stage.
        """
        shutdown_timeout = _seconds("shutdown_timeout", shutdown_timeout, allow_none=True)
        run = Run(self, sink=sink, dead_letter=dead_letter,
                  keep_dead_letters=keep_dead_letters,
                  shutdown_timeout=shutdown_timeout or self.config.shutdown_timeout)
        run._start(handle_signals=handle_signals)
        return run

    def run(self, items: Iterable[Any] | None = None, *,
            sink: Callable[[Any], Any] | None = None,
            dead_letter: Callable[[DeadLetter], Any] | None = None,
            keep_dead_letters: bool | None = None, handle_signals: bool = True,
            shutdown_timeout: float | None = None,
            duration: float | None = None) -> RunReport:
        """Run a batch job over ``items`` (or the pipeline's source) and return the report.

        Blocks until every item is done. In the main thread, SIGINT and SIGTERM start a
        graceful shutdown (a second signal stops at once); the report says so.

        Args:
            items: the input; the pipeline's :meth:`source` when None.
            sink: receives each output (outputs are only counted without one).
            dead_letter: receives each item that failed for good.
            keep_dead_letters: see :meth:`start`.
            handle_signals: handle SIGINT/SIGTERM while running (main thread only).
            shutdown_timeout: deadline for the drain after a signal.
            duration: stop intake after this many seconds (a timed run).
        """
        shutdown_timeout = _seconds("shutdown_timeout", shutdown_timeout, allow_none=True)
        duration = _seconds("duration", duration, allow_none=True)
        src = self._input(items)
        run = Run(self, sink=sink if sink is not None else _discard,
                  dead_letter=dead_letter, keep_dead_letters=keep_dead_letters,
                  shutdown_timeout=shutdown_timeout or self.config.shutdown_timeout)
        run._start(handle_signals=handle_signals)
        run.feed(src)
        return run.wait(duration=duration)

    def map(self, items: Iterable[Any] | None = None, *,
            dead_letter: Callable[[DeadLetter], Any] | None = None) -> Generator[Any, None, None]:
        """Run over ``items`` and yield the outputs as they come.

        Leaving the loop early shuts the run down. Failed items go to ``dead_letter``
        (and are logged when there is none).
        """
        src = self._input(items)
        run = Run(self, sink=None, dead_letter=dead_letter, keep_dead_letters=None,
                  shutdown_timeout=self.config.shutdown_timeout)
        run._start(handle_signals=False)
        run.feed(src)
        exhausted = False
        try:
            yield from run.results()
            exhausted = True
        finally:
            if not exhausted:  # the caller left the loop: stop now, report the rest
                run._abort_now.set()
            run.shutdown()

    def _input(self, items: Iterable[Any] | None) -> Iterable[Any]:
        if items is not None:
            if not hasattr(items, "__iter__"):
                raise ConfigError(f"items must be iterable (got {type(items).__name__})")
            return items
        src = self._source
        if src is None:
            raise PipelineStateError(
                f"pipeline {self.name!r} has no source; pass items to run()/map() or set "
                f"one with pipe.source(...)")
        return src() if callable(src) else src


def _discard(_: Any) -> None:
    return None


def _read_sequence(it: Iterator[Any], size: int,
                   linger: float) -> tuple[list[Any], BaseException | None]:
    import itertools

    try:
        return list(itertools.islice(it, size)), None
    except Exception as exc:  # e.g. a list whose iteration fails
        return [], exc


def _read_iterator(it: Iterator[Any], size: int,
                   linger: float) -> tuple[list[Any], BaseException | None]:
    """Up to ``size`` items; stop early when one took longer than ``linger`` to come."""
    chunk: list[Any] = []
    clock = time.perf_counter
    try:
        for _ in range(size):
            t = clock()
            chunk.append(next(it))
            if clock() - t > linger:
                break  # a slow source: do not hold its items back for the rest
    except StopIteration:
        pass
    except Exception as exc:  # keep what the source yielded before it broke
        return chunk, exc
    return chunk, None


def _check_picklable(spec: StageSpec) -> None:
    import pickle

    for what, obj in (("function", spec.fn), ("key", spec.key), ("retry policy", spec.retry)):
        if obj is None:
            continue
        try:
            pickle.dumps(obj)
        except Exception as err:
            raise NotPicklableError(
                f"stage {spec.name!r} runs on executor={spec.executor!r}, so its {what} must "
                f"pickle, but {obj!r} cannot ({type(err).__name__}: {err}); define it at "
                f"module level (no lambda or closure), or use executor='thread'"
            ) from err


class Run:
    """One execution of a pipeline: submit items, read results, watch it, shut it down.

    Created by :meth:`Pipeline.start` (and used by ``run``/``map``). A context manager:
    leaving the ``with`` block shuts it down gracefully.
    """

    def __init__(self, pipeline: Pipeline, *, sink: Callable[[Any], Any] | None,
                 dead_letter: Callable[[DeadLetter], Any] | None,
                 keep_dead_letters: bool | None, shutdown_timeout: float) -> None:
        if not pipeline._specs:
            raise PipelineStateError(
                f"pipeline {pipeline.name!r} has no stages; add one with @pipe.stage or "
                f"pipe.add_stage(name, fn)")
        self.pipeline = pipeline
        self.name = pipeline.name
        cfg = pipeline.config
        self._cfg = cfg
        self._sink = sink
        self._dead_cb = dead_letter
        self._keep_dead = (dead_letter is None) if keep_dead_letters is None \
            else keep_dead_letters
        self._shutdown_timeout = shutdown_timeout
        self._clock = time.monotonic
        self._dead_lock = threading.Lock()
        self._dead_letters: list[DeadLetter] = []
        self._dead_count = 0
        self._dead_queue: queue.SimpleQueue[DeadLetter | None] = queue.SimpleQueue()
        self._dead_thread: threading.Thread | None = None
        self._dead_delivering: DeadLetter | None = None
        self._submitted = 0
        self._submit_lock = threading.Lock()
        self._outputs = 0
        self._readers = 0  # results() iterators being read
        self._in_hand = 0  # outputs a reader took from the channel and has not yielded yet
        self._intake_rejected: list[Unprocessed] = []
        self._state = "starting"
        self._reason = ""
        self._report: RunReport | None = None
        self._shutdown_lock = threading.Lock()
        self._stopping = threading.Event()
        self._abort_now = threading.Event()
        self._feeder: threading.Thread | None = None
        self._feeder_holding = False  # the source thread has items it has not put yet
        self._feeder_done = threading.Event()
        self._signal_name = ""
        self._feed_error: BaseException | None = None
        self._sink_thread: threading.Thread | None = None
        self._sink_hand: list[Any] | None = None  # the chunk the sink thread is delivering
        self._sink_pos = 0
        self._sink_abandoned = False
        self._hook_errors: list[tuple[str, str]] = []
        self._prev_handlers: dict[int, Any] = {}
        self._signals = 0
        self._started_at = 0.0
        self.ops_url: str | None = None
        self._ext: dict[str, Any] = {}  # telemetry, resources, ops, profiler, autoscaler
        self._dead_hooks: list[Callable[[DeadLetter], Any]] = []
        self._enter_factory: Callable[[str], Callable[[Any], Any]] | None = None
        self._wire: tuple[Callable[[list[Any]], list[Any]],
                          Callable[[list[Any] | None], list[Any] | None]] | None = None
        self._gate: Any = None  # the memory gate, when a limit is set
        specs = pipeline._specs
        self._inboxes = [Channel(cfg.buffer_size) for _ in specs]
        self._out = Channel(cfg.buffer_size)
        self._first_capture: Callable[[], Any] | None = None
        self._observer: Any = None
        self._runners: list[StageRunner] = []

    # -- lifecycle ---------------------------------------------------------------------

    def _start(self, *, handle_signals: bool) -> None:
        from pipekit import _extensions

        _extensions.before_start(self)
        from pipekit._pull import PullRunner, pulls

        specs = self.pipeline._specs
        for i, spec in enumerate(specs):
            nxt = self._inboxes[i + 1] if i + 1 < len(specs) else self._out
            next_name = specs[i + 1].name if i + 1 < len(specs) else "sink"
            runner_class = PullRunner if pulls(spec) else StageRunner
            self._runners.append(runner_class(
                spec, self._inboxes[i], nxt.put_chunk, self._on_dead,
                linger=self._cfg.batch_linger,
                enter=self._enter_factory(spec.name) if self._enter_factory else None,
                wire=self._wire if spec.executor != "thread" else None,
                observer=self._observer,
                on_finished=self._stage_finished, next_name=next_name))
        for r in self._runners:
            r.start()
        if self._dead_cb is not None:
            self._dead_thread = threading.Thread(target=self._dead_loop,
                                                 name=f"pipekit-{self.name}-dead-letters",
                                                 daemon=True)
            self._dead_thread.start()
        if self._sink is not None:
            self._sink_thread = threading.Thread(target=self._sink_loop,
                                                 name=f"pipekit-{self.name}-sink", daemon=True)
            self._sink_thread.start()
        self._started_at = self._clock()
        if handle_signals:
            self._install_signals()
        try:
            _extensions.after_start(self)
        except BaseException:
            # e.g. the ops port is taken: stop what already runs, then report the error
            self._stopping.set()
            self._abort()
            for r in self._runners:
                r.pool.shutdown(wait=False, timeout=5.0)
            _extensions.after_stop(self, 2.0)
            self._restore_signals()
            self._state = "stopped"
            raise
        self._state = "running"
        log.info("pipeline started", extra={"pipekit": {
            "event": "started", "pipeline": self.name,
            "stages": [s.name for s in specs]}})

    def _stage_finished(self, runner: StageRunner) -> None:
        idx = self._runners.index(runner)
        nxt = self._inboxes[idx + 1] if idx + 1 < len(self._inboxes) else self._out
        nxt.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- intake ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stopping.is_set() or self._state in ("draining", "stopped"):
            raise PipelineClosedError(
                f"pipeline {self.name!r} is {self._state}; it accepts no more items")

    def submit(self, item: Any, *, timeout: float | None = None) -> None:
        """Put an item into the first stage, blocking while it is full (backpressure).

        Args:
            item: the item.
            timeout: the longest to wait for room, in seconds (None: no limit).

        Raises:
            SubmitTimeoutError: no room within ``timeout``.
            PipelineClosedError: the run is shutting down or stopped.
            NotPicklableError: the first stage runs on processes and the item cannot be
                pickled.
        """
        timeout = _wait_time("timeout", timeout)
        self._check_open()
        if self._gate is not None and self._gate.paused:
            self._wait_gate(timeout)
        ctx = self._first_capture() if self._first_capture is not None else None
        if self._pickle_check:
            self._check_item(item)
        try:
            self._inboxes[0].put(item, ctx, timeout=timeout)
        except ChannelFull:
            raise SubmitTimeoutError(
                f"pipeline {self.name!r}: no room in stage {self._runners[0].name!r} within "
                f"{timeout} s; raise buffer_size, add workers, or retry later") from None
        except ChannelClosed:
            raise PipelineClosedError(
                f"pipeline {self.name!r} is shutting down; it accepts no more items") from None
        with self._submit_lock:
            self._submitted += 1

    def submit_nowait(self, item: Any) -> None:
        """Put an item into the first stage or raise at once.

        Raises:
            QueueFullError: the first stage's channel is full (or intake is paused).
            PipelineClosedError: the run is shutting down or stopped.
        """
        self._check_open()
        if self._gate is not None and self._gate.paused:
            raise QueueFullError(f"pipeline {self.name!r}: intake is paused "
                                 f"({self._gate.reason}); retry later")
        ctx = self._first_capture() if self._first_capture is not None else None
        if self._pickle_check:
            self._check_item(item)
        try:
            self._inboxes[0].put_nowait(item, ctx)
        except ChannelFull:
            raise QueueFullError(f"pipeline {self.name!r}: stage {self._runners[0].name!r} "
                                 f"is full; retry later or use submit()") from None
        except ChannelClosed:
            raise PipelineClosedError(
                f"pipeline {self.name!r} is shutting down; it accepts no more items") from None
        with self._submit_lock:
            self._submitted += 1

    @property
    def _pickle_check(self) -> bool:
        return self.pipeline._specs[0].executor != "thread"

    def _check_item(self, item: Any) -> None:
        import pickle

        try:
            pickle.dumps(item)
        except Exception as err:
            raise NotPicklableError(
                f"stage {self._runners[0].name!r} runs on processes and cannot take an item "
                f"of type {type(item).__name__} ({type(err).__name__}: {err}); make it "
                f"picklable or use executor='thread'") from err

    def _wait_gate(self, timeout: float | None) -> None:
        if not self._gate.wait_open(timeout):
            raise SubmitTimeoutError(
                f"pipeline {self.name!r}: intake stayed paused for {timeout} s "
                f"({self._gate.reason})")

    def feed(self, src: Iterable[Any]) -> None:
        """Feed an iterable into the first stage from a thread of its own (once per run).

        ``run()`` and ``map()`` use it; call it on a run from :meth:`Pipeline.start` to
        have the run read a source while you keep the handle (for ``stats()``,
        ``ops_url``, profiles). When the source is exhausted, intake closes and
        :meth:`wait` returns the report.

        Raises:
            PipelineStateError: the run already has a source.
        """
        if self._feeder is not None:
            raise PipelineStateError("this run already reads a source; feed() once per run")
        self._feeder = threading.Thread(target=self._feed_loop, args=(src,),
                                        name=f"pipekit-{self.name}-source", daemon=True)
        self._feeder.start()

    def _feed_loop(self, src: Iterable[Any]) -> None:
        inbox = self._inboxes[0]
        size = max(1, min(self._cfg.batch_size, self._cfg.buffer_size))
        capture = self._first_capture
        ctx = capture() if capture is not None else None
        error: BaseException | None = None
        # In-memory sequences never block: take them a chunk at a time at C speed. Other
        # iterables may be slow: pass items on as soon as the source makes them wait.
        read = _read_sequence if isinstance(src, list | tuple | range) else _read_iterator
        try:
            it = iter(src)
            while not self._stopping.is_set() and error is None:
                self._feeder_holding = False
                chunk, error = read(it, size, self._cfg.batch_linger)
                if not chunk:
                    break
                self._feeder_holding = True
                if not self._put_from_source(inbox, chunk, ctx):
                    break
            self._feeder_holding = False
        except BaseException as exc:
            error = exc
        finally:
            self._feeder_holding = False
            self._feeder_done.set()
            if error is not None:
                self._feed_error = error
                self._reason = self._reason or "source_error"
                log.error("the source of pipeline %s raised %r; intake stops", self.name, error,
                          exc_info=error,
                          extra={"pipekit": {"event": "source_failed", "pipeline": self.name}})
            if not self._stopping.is_set():
                inbox.close()

    def _put_from_source(self, inbox: Channel, chunk: list[Any], ctx: Any) -> bool:
        """Put what the source gave; False when intake closed (the chunk is reported)."""
        if self._pickle_check:
            chunk = self._refuse_unpicklable(chunk)
        if self._gate is not None and self._gate.paused:
            while not self._gate.wait_open(0.1):
                if self._stopping.is_set():
                    break
        try:
            inbox.put_chunk(Chunk(chunk, None if ctx is None else [ctx] * len(chunk)))
        except ChannelClosed:
            with self._submit_lock:
                self._submitted += len(chunk)
            self._intake_rejected.extend(
                Unprocessed(self._runners[0].name, x, "intake") for x in chunk)
            return False
        with self._submit_lock:
            self._submitted += len(chunk)
        return True

    def _refuse_unpicklable(self, chunk: list[Any]) -> list[Any]:
        ok = []
        for x in chunk:
            try:
                self._check_item(x)
            except NotPicklableError as err:
                with self._submit_lock:
                    self._submitted += 1
                self._on_dead(DeadLetter(self._runners[0].name, x, err, 0))
            else:
                ok.append(x)
        return ok

    # -- outputs -------------------------------------------------------------------------

    def _sink_loop(self) -> None:
        out, sink = self._out, self._sink
        assert sink is not None
        while True:
            chunk = out.get_batch(self._cfg.batch_size)
            if chunk is None:
                if out.closed and not out.depth:
                    return
                out.wait(0.1)
                continue
            items = chunk.items
            self._sink_hand = items
            for i, x in enumerate(items):
                self._sink_pos = i
                try:
                    sink(x)
                except Exception as exc:
                    if self._sink_abandoned:
                        return
                    self._on_dead(DeadLetter("sink", x, exc, 1))
                else:
                    if self._sink_abandoned:
                        return  # the deadline passed during this call: reported as in flight
                    self._outputs += 1
            self._sink_hand = None

    def results(self, *, timeout: float | None = None) -> Iterator[Any]:
        """Yield outputs as they come, until the run has finished and all were read.

        Args:
            timeout: stop waiting after this many seconds without an output.

        Raises:
            PipelineStateError: the run has a sink (outputs go there).
        """
        if self._sink is not None:
            raise PipelineStateError("this run has a sink; outputs go to it, not results()")
        out = self._out
        with self._submit_lock:
            self._readers += 1
        try:
            while True:
                chunk = out.get_batch(self._cfg.batch_size)
                if chunk is None:
                    if out.closed and not out.depth:
                        return
                    if not out.wait(timeout) and not out.closed:
                        return
                    continue
                items = chunk.items
                with self._submit_lock:
                    self._in_hand += len(items)
                given = 0
                try:
                    for x in items:
                        given += 1
                        with self._submit_lock:
                            self._in_hand -= 1
                            self._outputs += 1
                        yield x
                finally:
                    if given < len(items):  # the reader stopped part way through a chunk
                        rest = items[given:]
                        with self._submit_lock:
                            self._in_hand -= len(rest)
                            self._intake_rejected.extend(
                                Unprocessed("sink", x, "queued") for x in rest)
        finally:
            with self._submit_lock:
                self._readers -= 1

    # -- dead letters --------------------------------------------------------------------

    def _on_dead(self, letter: DeadLetter) -> None:
        if self._dead_hooks:
            from pipekit import _extensions

            _extensions.on_dead(self, letter)
        with self._dead_lock:
            self._dead_count += 1
            if self._keep_dead:
                self._dead_letters.append(letter)
        if self._dead_cb is not None:
            # Stage threads never wait on the application's callback: a slow or stuck
            # one cannot hold up a stage, nor its shutdown.
            self._dead_queue.put(letter)
        elif not self._keep_dead:
            log.warning("item failed at stage %s: %r", letter.stage, letter.error)

    def _dead_loop(self) -> None:
        cb, q = self._dead_cb, self._dead_queue
        assert cb is not None
        while True:
            letter = q.get()
            if letter is None:
                return
            self._dead_delivering = letter
            try:
                cb(letter)
            except Exception:
                log.exception("dead_letter callback raised for an item of stage %s",
                              letter.stage)
            self._dead_delivering = None

    def _finish_dead_letters(self, deadline: float) -> None:
        """Let the callback take the dead letters still queued, until the deadline."""
        thread = self._dead_thread
        if thread is None:
            return
        self._dead_queue.put(None)
        thread.join(max(0.0, deadline - self._clock()))
        if thread.is_alive():
            left = self._undelivered_dead()
            log.error("the dead_letter callback did not take %d dead letter(s) before the "
                      "deadline; they are in the report", len(left),
                      extra={"pipekit": {"event": "dead_letters_undelivered",
                                         "pipeline": self.name, "count": len(left)}})
            with self._dead_lock:
                if not self._keep_dead:
                    self._dead_letters.extend(left)

    def _undelivered_dead(self) -> list[DeadLetter]:
        """Dead letters the callback had not taken (or not finished) by the deadline."""
        left: list[DeadLetter] = []
        current = self._dead_delivering
        if current is not None:
            left.append(current)
        while True:
            try:
                letter = self._dead_queue.get_nowait()
            except queue.Empty:
                return left
            if letter is not None:
                left.append(letter)

    # -- watching ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``starting``, ``running``, ``paused``, ``draining`` or ``stopped``."""
        if self._state == "running" and self._gate is not None and self._gate.paused:
            return "paused"
        return self._state

    def stats(self) -> PipelineStats:
        """A frozen snapshot of every stage and the run."""
        stages = tuple(r.stats() for r in self._runners)
        from pipekit import _extensions

        extra = _extensions.stats_extra(self, stages)
        return PipelineStats(
            pipeline=self.name, state=self.state,
            uptime=self._clock() - self._started_at if self._started_at else 0.0,
            submitted=self._submitted, outputs=self._outputs, dead_letters=self._dead_count,
            stages=stages,
            paused_reason=self._gate.reason if (self._gate is not None and self._gate.paused)
            else "",
            **extra,
        )

    def pending(self) -> int:
        """Items accepted and not yet finished (queued, in flight, or waiting to be read)."""
        return self._submitted - self._outputs - self._dead_count

    # -- profiling -----------------------------------------------------------------------

    def profile_cpu(self, seconds: float, *, rate: int | None = None) -> Any:
        """Take a CPU profile (py-spy) of the running process for ``seconds``; blocks.

        Returns:
            A ``pipekit.profiling.ProfileRecord`` whose ``files`` maps ``speedscope``
            and ``svg`` to the written paths.

        Raises:
            ProfilerBusyError: another CPU profile is running.
            ProfilerError: py-spy is missing or may not attach (the message says why).
            ConfigError: ``seconds`` or ``rate`` out of range.
        """
        from pipekit import _extensions

        return _extensions.profiler(self).cpu(seconds, rate=rate, trigger="api")

    def profile_heap(self, seconds: float) -> Any:
        """Take a heap profile (memray) of the running process for ``seconds``; blocks.

        Returns:
            A ``ProfileRecord`` with the ``bin`` capture, ``html`` flame graph and
            ``summary`` JSON.

        Raises:
            ProfilerBusyError: another heap profile is running.
            MissingExtraError: memray is not installed (``pipekit[profiling]``).
            ConfigError: ``seconds`` out of range.
        """
        from pipekit import _extensions

        return _extensions.profiler(self).heap(seconds, trigger="api")

    # -- shutdown ------------------------------------------------------------------------

    def wait(self, *, duration: float | None = None) -> RunReport:
        """Wait until the input is exhausted and every item is done; return the report.

        Args:
            duration: stop intake after this many seconds and drain.
        """
        end = None if duration is None else self._clock() + duration
        while not self._done():
            if self._stopping.is_set():
                break
            if end is not None and self._clock() >= end:
                self._reason = self._reason or "duration"
                break
            # short waits keep the main thread responsive to signal handlers
            self._out.wait(0.05) if self._sink is None else self._wait_sink(0.05)
        return self.shutdown()

    def _wait_sink(self, t: float) -> None:
        if self._sink_thread is not None:
            self._sink_thread.join(t)

    def _done(self) -> bool:
        if self._feeder is not None and self._feeder.is_alive():
            return False
        if not all(r.finished.is_set() for r in self._runners):
            return False
        if self._readers and (self._out.depth or self._in_hand):
            return False  # a results() reader is still taking the outputs
        return self._sink_thread is None or not self._sink_thread.is_alive()

    def shutdown(self, timeout: float | None = None) -> RunReport:
        """Stop intake, drain until the deadline, run the hooks, and return the report.

        Safe to call more than once and from any thread; later calls return the same
        report once it is ready.

        Args:
            timeout: seconds for the whole shutdown (the run's ``shutdown_timeout`` if
                None). Stages with ``on_shutdown`` hooks get at least a tenth of it.
        """
        with self._shutdown_lock:
            report = self._report
            if report is None:
                timeout = _seconds("timeout", timeout, allow_none=True)
                report = self._shutdown(self._shutdown_timeout if timeout is None else timeout)
        # Signal handlers go back in the main thread (a signal's drain runs elsewhere).
        self._restore_signals()
        return report

    def _shutdown(self, timeout: float) -> RunReport:
        from pipekit import _extensions

        start = self._clock()
        deadline = start + timeout
        has_hooks = any(s.on_shutdown is not None for s in self.pipeline._specs)
        drain_deadline = start + timeout * 0.9 if has_hooks else deadline
        completed_before = self._done()
        self._stopping.set()
        if self._state != "stopped":
            self._state = "draining"
        log.info("pipeline draining", extra={"pipekit": {
            "event": "draining", "pipeline": self.name, "pending": self.pending(),
            "timeout": timeout}})
        _extensions.before_drain(self)
        # Items the source already gave go in (within the deadline); a source blocked
        # waiting for its next item is not waited for.
        while (self._feeder_holding and self._clock() < drain_deadline
               and not self._abort_now.is_set()):
            self._feeder_done.wait(0.01)
        self._inboxes[0].close()
        if self._feeder is not None:
            self._feeder.join(max(0.0, min(0.5, drain_deadline - self._clock())))
        aborted = not self._drain(drain_deadline)
        if aborted:
            self._abort(deadline)
        for r in self._runners:
            r.pool.shutdown(wait=not aborted, timeout=max(0.0, deadline - self._clock()))
        self._finish_dead_letters(drain_deadline)
        self._run_hooks(deadline)
        _extensions.after_stop(self, deadline - self._clock())
        self._restore_signals()
        self._state = "stopped"
        if not self._reason:
            self._reason = "completed" if completed_before else (
                "deadline" if aborted else "shutdown")
        if aborted and self._reason == "signal":
            self._reason = "deadline"
        self._report = self._build_report()
        _extensions.after_report(self, self._report)
        log.info("pipeline stopped", extra={"pipekit": {
            "event": "stopped", "pipeline": self.name, "reason": self._report.reason,
            "outputs": self._report.outputs, "dead_letters": self._report.dead_letter_count,
            "unprocessed": len(self._report.unprocessed)}})
        return self._report

    def _drain(self, deadline: float) -> bool:
        """Wait for every stage and the sink to finish; False if the deadline passed."""
        while not self._done():
            left = deadline - self._clock()
            if left <= 0 or self._abort_now.is_set():
                return False
            for r in self._runners:
                if not r.finished.is_set():
                    r.finished.wait(min(left, 0.05))
                    break
            else:
                if self._sink_thread is not None:
                    self._wait_sink(min(left, 0.05))
                elif self._out.depth:
                    self._out.wait_empty(min(left, 0.05))
                else:
                    time.sleep(min(left, 0.005))  # a reader is yielding what it holds
        return True

    def _abort(self, deadline: float | None = None) -> None:
        for r in self._runners:
            r.abort()
        for ch in self._inboxes:
            ch.close()
        self._out.close()
        end = self._clock() + 1.0 if deadline is None else max(deadline, self._clock() + 0.05)
        for r in self._runners:
            r.join(max(0.0, end - self._clock()))
        if self._sink_thread is not None:
            self._sink_thread.join(max(0.0, end - self._clock()))
            if self._sink_thread.is_alive():  # stuck in the sink: what it holds is left
                self._sink_abandoned = True
                hand = self._sink_hand
                if hand is not None:
                    self._intake_rejected.extend(
                        Unprocessed("sink", x, "in_flight") for x in hand[self._sink_pos:])

    def _run_hooks(self, deadline: float) -> None:
        for spec in reversed(self.pipeline._specs):
            hook = spec.on_shutdown
            if hook is None:
                continue
            left = max(0.05, deadline - self._clock())
            box: list[BaseException] = []

            def call(h: Callable[[], Any] = hook, box: list[BaseException] = box) -> None:
                try:
                    h()
                except BaseException as exc:
                    box.append(exc)

            t = threading.Thread(target=call, name=f"pipekit-{spec.name}-shutdown", daemon=True)
            t.start()
            t.join(left)
            if t.is_alive():
                self._hook_errors.append((spec.name, f"on_shutdown did not finish within "
                                                     f"{left:.2f} s"))
            elif box:
                self._hook_errors.append((spec.name, f"{type(box[0]).__name__}: {box[0]}"))
                log.error("on_shutdown hook of stage %s raised", spec.name,
                          exc_info=box[0])

    def _build_report(self) -> RunReport:
        unprocessed: list[Unprocessed] = list(self._intake_rejected)
        for r in self._runners:
            unprocessed.extend(r.take_unprocessed())
        for chunk in self._out.drain():
            unprocessed.extend(Unprocessed("sink", x, "queued") for x in chunk.items)
        from pipekit import _extensions

        stats = self.stats()
        return RunReport(
            pipeline=self.name, submitted=self._submitted, outputs=self._outputs,
            dead_letters=tuple(self._dead_letters), dead_letter_count=self._dead_count,
            unprocessed=tuple(unprocessed), duration=self._clock() - self._started_at,
            stages=stats.stages, reason=self._reason, hook_errors=tuple(self._hook_errors),
            scale_events=_extensions.scale_events(self),
            profiles=_extensions.profiles(self),
            source_error=repr(self._feed_error) if self._feed_error is not None else "",
            signal=self._signal_name,
        )

    @property
    def report(self) -> RunReport | None:
        """The report, once the run has stopped."""
        return self._report

    # -- signals -------------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._prev_handlers.items():
            signal.signal(sig, prev)
        self._prev_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self._reason = "signal"
            log.warning("received %s: draining (send it again to stop at once)", name,
                        extra={"pipekit": {"event": "signal", "signal": name}})
            self._signal_name = name
            self._stopping.set()
            self._state = "draining"
            # the drain runs outside the handler; run()'s wait() joins it
            threading.Thread(target=self.shutdown, name=f"pipekit-{self.name}-shutdown",
                             daemon=True).start()
        else:
            log.warning("received %s again: stopping now", name,
                        extra={"pipekit": {"event": "signal_again", "signal": name}})
            self._reason = "aborted"
            self._abort_now.set()
            for r in self._runners:
                r.abort()
