"""Stages on a Dask cluster (``executor="dask"``, extra ``dask``).

Data flow of one batch::

    stage dispatcher            client event loop             cluster
    ----------------            -----------------             -------
    DaskPool.submit(batch) --client.submit(_run_batch, key, items, ...)--> scheduler
                                                                               |
                                                          worker: _runners[key](batch)
                                                                               |
    done queue <-- Future <-- _settle (gather the result) <--------------------+
                   Future <-- _on_event ("remove-worker": the batch's worker died)

The stage's function crosses the wire once per worker, not once per batch: the pool
registers a worker plugin holding the pickled :class:`~pipekit._work.StageWork`, the
scheduler hands it to every worker (and to each worker that joins or is restarted
later), and the worker builds the batch loop from it once. A batch then carries only
the stage's key, its items, their trace carriers and their attempt counts.

Each batch is one Dask task with ``retries=0``: a task never fails over silently.
Losing the worker that runs a batch (or holds its finished result) reaches the stage
runner as a worker loss, and the runner's own splitting and retries find the item
that kills its worker, exactly as with a process pool:

* a batch running on a worker that dies ends with ``KilledWorker`` (the local cluster
  runs with ``allowed-failures`` 0, so at the first death);
* on a cluster that would re-run it (``allowed-failures`` above 0), or whose finished
  result was lost with its worker, the scheduler's ``remove-worker`` event names the
  batch's key, and the pool fails the batch at once and releases the task.

Delivery is therefore *at least once*: the items of a batch that was lost may have run,
in part, before the loss, and run again.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from pipekit._work import BatchResult, Progress, StageWork, make_runner
from pipekit.errors import ConfigError, ItemTimeoutError, NotPicklableError, WorkerLostError
from pipekit.errors import missing_extra as _missing_extra
from pipekit.executors import StagePool
from pipekit.retry import Retry

try:
    import distributed
    from distributed.comm.core import CommClosedError
    from distributed.diagnostics.plugin import WorkerPlugin
    from distributed.scheduler import KilledWorker
except ImportError as _err:  # the optional extra is not installed
    raise _missing_extra("executor='dask'", "dask", "distributed", _err) from _err

# distributed's constructors are untyped: bound once as Any, so call sites stay typed
_Client: Any = distributed.Client
_LocalCluster: Any = distributed.LocalCluster

__all__ = ["DaskPool"]

log = logging.getLogger("pipekit.dask")

# How often a worker's batch loop checks a call against the stage's timeout.
_TICK = 0.05
# The least time given to closing a local cluster, whatever the shutdown deadline:
# leaving its worker processes behind would be worse than a late report.
_CLOSE_FLOOR = 5.0

# Stage runners installed in this worker process, by stage key (see _Install).
_runners: dict[str, Callable[..., BatchResult | None]] = {}


class _Install(WorkerPlugin):
    """Worker plugin: unpickle a stage's work once in each worker and build its loop."""

    idempotent = False

    def __init__(self, key: str, stage: str, payload: bytes) -> None:
        self.key = key
        self.stage = stage
        self.payload = payload

    def setup(self, worker: Any) -> None:
        """Install the stage's batch loop in this worker process."""
        work: StageWork = pickle.loads(self.payload)
        _runners[self.key] = _worker_runner(self.stage, work)

    def teardown(self, worker: Any) -> None:
        """Forget the stage (the pipeline shut down, or the worker is closing)."""
        _runners.pop(self.key, None)


def _run_batch(key: str, items: list[Any], ctxs: list[Any] | None,
               attempts: list[int] | None) -> BatchResult | None:
    """The Dask task: run one batch with the stage installed in this worker."""
    try:
        run = _runners[key]
    except KeyError:
        raise WorkerLostError(
            f"stage {key!r} is not installed on this worker; it joined without the "
            f"pipeline's plugin (the pipeline may be shutting down)") from None
    return run(items, ctxs, attempts, None)


def _worker_runner(stage: str, work: StageWork) -> Callable[..., BatchResult | None]:
    """The batch loop a cluster worker runs: the usual one, under a timeout watch if set.

    A Dask task runs in a worker's thread, where SIGALRM cannot reach, so a stage with
    a timeout runs each batch in a helper thread that a watch loop can abandon.
    """
    run = make_runner(work, alarm=False)
    if work.timeout is None:
        return run
    return _deadline_runner(stage, run, work.timeout, work.retry)


def _deadline_runner(stage: str, run: Callable[..., BatchResult | None], timeout: float,
                     policy: Retry) -> Callable[..., BatchResult]:
    """Run batches in a helper thread; a call past ``timeout`` is abandoned (its thread
    is left behind) and the rest of the batch goes on in a fresh thread."""
    perf = time.perf_counter

    def run_timed(items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
                  progress: Progress | None = None) -> BatchResult:
        t0 = perf()
        n = len(items)
        atts = list(attempts) if attempts is not None else [0] * n
        acc = BatchResult([], [] if ctxs is not None else None, [], 0, 0, 0, 0, 0.0, 0.0, n)
        start = 0
        while start < n:
            stuck = _run_part(run, stage, items, ctxs, atts, start=start, timeout=timeout,
                              acc=acc)
            if stuck is None:
                break
            i, attempt = stuck
            tries = atts[i] + attempt
            err = ItemTimeoutError(
                f"stage {stage!r} call ran longer than its timeout of {timeout} s")
            acc.timed_out += 1
            if policy.retries(err) and tries < policy.attempts:
                acc.retries += 1
                atts[i] = tries
                start = i
            else:
                acc.failures.append((i, items[i], err, tries))
                start = i + 1
        acc.succeeded = n - len(acc.failures)
        acc.busy = perf() - t0
        return acc

    return run_timed


def _run_part(run: Callable[..., BatchResult | None], stage: str, items: list[Any],
              ctxs: list[Any] | None, atts: list[int], *, start: int, timeout: float,
              acc: BatchResult) -> tuple[int, int] | None:
    """Run ``items[start:]`` in a helper thread and add what finished to ``acc``.

    Returns None when the part ran to its end, else ``(index, attempt)`` of the call
    that ran past the timeout.
    """
    p = Progress()
    box: list[BatchResult | None] = []
    errors: list[BaseException] = []
    part_ctxs = ctxs[start:] if ctxs is not None else None

    def work() -> None:
        try:
            box.append(run(items[start:], part_ctxs, atts[start:], p))
        except BaseException as exc:  # fails the batch in the task thread, not here
            errors.append(exc)

    t = threading.Thread(target=work, name=f"pipekit-{stage}-call", daemon=True)
    t.start()
    while True:
        t.join(min(timeout, _TICK))
        if not t.is_alive():
            if errors:
                raise errors[0]
            r = box[0]
            assert r is not None  # only an abandoned part returns None
            _merge(acc, start, r.outputs, r.out_ctxs, failures=r.failures, dropped=r.dropped,
                   retries=r.retries)
            acc.cpu += r.cpu
            return None
        with p.lock:
            if p.attempt and time.perf_counter() - p.started > timeout:
                p.abandoned = True
                _merge(acc, start, list(p.out), p.out_ctxs, failures=list(p.failures),
                       dropped=p.dropped, retries=p.retries)
                return start + p.done, p.attempt


def _merge(acc: BatchResult, start: int, out: list[Any], out_ctxs: list[Any] | None, *,
           failures: list[tuple[int, Any, BaseException, int]], dropped: int,
           retries: int) -> None:
    """Add a part's outcome to the batch's (failure indices shifted by ``start``)."""
    acc.outputs.extend(out)
    if acc.out_ctxs is not None and out_ctxs is not None:
        acc.out_ctxs.extend(out_ctxs)
    acc.failures.extend((start + i, x, e, a) for i, x, e, a in failures)
    acc.dropped += dropped
    acc.retries += retries


class DaskPool(StagePool):
    """A stage on a Dask cluster; the stage function is shipped once per worker.

    Args:
        stage: the stage name.
        work: the function and its policies; must pickle.
        max_workers: the top of the stage's scaling range; the size of the local
            cluster started when no address is given.
        options: ``dask_address``: the scheduler to connect to (``"tcp://host:8786"``);
            None starts a local cluster of ``max_workers`` single-threaded worker
            processes that closes with the pool.

    Raises:
        NotPicklableError: the function or a policy cannot be pickled, or the
            cluster's workers cannot unpickle it.
        ConfigError: the scheduler at ``dask_address`` cannot be reached.
    """

    kind = "dask"
    watch_progress = False
    # A task costs milliseconds of scheduling and round trips: longer batches amortise it.
    batch_seconds = 0.25

    def __init__(self, stage: str, work: StageWork, max_workers: int,
                 options: dict[str, Any] | None = None) -> None:
        try:
            payload = pickle.dumps(work)
        except Exception as err:
            raise NotPicklableError(
                f"stage {stage!r} runs on a Dask cluster, so its function must pickle, but "
                f"{work.fn!r} cannot ({type(err).__name__}: {err}); define it at module "
                f"level (no lambda or closure), or use executor='thread'"
            ) from err
        self._stage = stage
        self._key = f"pipekit-{stage}-{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Any, Future[BatchResult | None]]] = {}
        self._gen = 0
        self._closed = False
        address = (options or {}).get("dask_address")
        self.address: str
        self._cluster: Any = None
        self._client: Any = None
        self._client = self._connect(address, max_workers)
        try:
            self._client.register_plugin(_Install(self._key, stage, payload), name=self._key)
            self._client.subscribe_topic("all", self._on_event)
        except (OSError, TimeoutError) as err:  # CommClosedError is an OSError
            self._close(_CLOSE_FLOOR)
            raise ConfigError(
                f"lost the Dask scheduler at dask_address={self.address!r} while installing "
                f"stage {stage!r} ({type(err).__name__}: {err}); check the cluster, or "
                f"unset dask_address to start a local cluster") from err
        except Exception as err:
            self._close(_CLOSE_FLOOR)
            raise NotPicklableError(
                f"the Dask workers could not load the function of stage {stage!r} "
                f"({type(err).__name__}: {err}); make pipekit and the module that defines it "
                f"importable on every worker") from err

    def _connect(self, address: str | None, max_workers: int) -> Any:
        if address:
            try:
                client = _Client(address, set_as_default=False)
            except (OSError, TimeoutError) as err:
                raise ConfigError(
                    f"cannot reach the Dask scheduler at dask_address={address!r} "
                    f"({type(err).__name__}: {err}); start it, fix the address, or unset "
                    f"dask_address to start a local cluster") from err
            self.address = address
            return client
        self._cluster = _LocalCluster(
            n_workers=max_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, silence_logs=logging.CRITICAL,
            scheduler_kwargs={
                # a batch that kills its worker fails at once, and pipekit's own
                # splitting finds the culprit (the scheduler would re-run it 3 times)
                "allowed_failures": 0,
                # no dashboard; the scheduler's small HTTP server takes a free port
                "dashboard_address": "127.0.0.1:0",
            })
        try:
            # fetch results straight from the workers, not through the scheduler
            client = _Client(self._cluster, set_as_default=False, direct_to_workers=True)
        except BaseException:
            self._cluster.close()
            raise
        self.address = self._cluster.scheduler_address
        return client

    # -- the hot path --------------------------------------------------------------

    def submit(self, items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
               progress: Progress | None) -> Future[BatchResult | None]:
        """Run one batch as one Dask task."""
        fut: Future[BatchResult | None] = Future()
        key = f"{self._key}-{next(self._ids)}"
        pending = self._pending
        with self._lock:
            if self._closed:
                fut.set_exception(CancelledError(
                    f"the Dask pool of stage {self._stage!r} is shut down"))
                return fut
            pending[key] = (None, fut)  # before the task exists: no loss event is missed
        try:
            dfut = self._client.submit(_run_batch, self._key, items, ctxs, attempts,
                                       key=key, retries=0, pure=False)
        except Exception as exc:  # e.g. an item that does not pickle
            with self._lock:
                del pending[key]
            fut.set_exception(exc)
            return fut
        with self._lock:
            pending[key] = (dfut, fut)
        self._client.loop.add_callback(self._settle, key, dfut, fut)
        return fut

    async def _settle(self, key: str, dfut: Any, fut: Future[BatchResult | None]) -> None:
        """On the client's event loop: pass the task's outcome to the stage's future."""
        try:
            result = await self._client.gather(dfut, asynchronous=True)
        except BaseException as exc:  # the task failed, was cancelled or was lost
            _resolve(fut, None, exc)
        else:
            _resolve(fut, result, None)
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _on_event(self, event: tuple[float, Any]) -> None:
        """Scheduler events: a worker that died took these batches (or their results)."""
        msg = event[1]
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker" \
                or msg.get("expected"):
            return
        keys = set(msg.get("processing-tasks", ())) | set(msg.get("lost-computed-tasks", ()))
        worker = msg.get("worker", "?")
        with self._lock:
            hit = [(k, self._pending[k]) for k in keys if k in self._pending]
        for key, (dfut, fut) in hit:
            err = WorkerLostError(f"the Dask worker {worker} running task {key} was lost")
            if _resolve(fut, None, err) and dfut is not None:
                dfut.release()  # the scheduler must not run it again behind our back

    # -- the StagePool surface ---------------------------------------------------------

    def resize(self, workers: int) -> None:
        """Nothing to do: the stage's dispatcher keeps ``workers`` batches in flight, and
        the cluster's size is the cluster's business (a local one has ``max_workers``)."""

    def is_worker_loss(self, exc: BaseException) -> bool:
        """Whether a batch's error means its cluster worker (or the cluster) was lost."""
        if isinstance(exc, KilledWorker | WorkerLostError | CommClosedError):
            return True
        # cancelled by the scheduler (e.g. its connection was lost), not by our shutdown
        return isinstance(exc, CancelledError) and not self._closed

    @property
    def generation(self) -> int:
        """Bumped once per worker loss (the cluster replaces its workers itself)."""
        return self._gen

    def rebuild(self, generation: int) -> None:
        """A worker was lost: nothing to rebuild (a nanny restarts it); count the loss."""
        with self._lock:
            if generation != self._gen:
                return
            self._gen += 1
        log.warning("Dask worker lost; its batches run again", extra={"pipekit": {
            "event": "worker_lost", "stage": self._stage, "generation": self._gen}})

    def shutdown(self, wait: bool, timeout: float | None) -> None:
        """Release batches still out, remove the stage from the cluster, disconnect, and
        close the local cluster if this pool started one.

        Args:
            wait: unused: a drained stage has nothing out, and after an abort its batches
                are released at once (one already running ends on its worker, unread).
            timeout: the time left for the whole shutdown; closing a local cluster gets
                at least 5 s whatever it says.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
        for dfut, fut in pending:
            if _resolve(fut, None, CancelledError("the pipeline shut down")) \
                    and dfut is not None:
                dfut.release()
        self._close(_CLOSE_FLOOR if timeout is None else timeout)

    def _close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client, cluster = self._client, self._cluster
        if client is not None:
            try:
                client.unsubscribe_topic("all")
                if cluster is None:  # a shared cluster: take the stage's code back out
                    client.unregister_worker_plugin(self._key)
            except Exception:
                log.debug("could not remove stage %s from the cluster", self._stage,
                          exc_info=True)
            try:
                client.close(timeout=max(1.0, deadline - time.monotonic()))
            except Exception:
                log.debug("closing the Dask client failed", exc_info=True)
        if cluster is not None:
            try:
                cluster.close(timeout=max(_CLOSE_FLOOR, deadline - time.monotonic()))
            except Exception:
                log.warning("the local Dask cluster of stage %s did not close cleanly",
                            self._stage, exc_info=True)


def _resolve(fut: Future[BatchResult | None], result: BatchResult | None,
             exc: BaseException | None) -> bool:
    """Settle ``fut`` unless someone already did; True when this call settled it."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        return False
    return True
