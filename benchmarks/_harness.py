"""Shared machinery for pipekit's benchmarks: workloads, child runs, rounds and the table.

Benchmarks are not tests. They print ratios measured side by side in one run and never
assert: the machines are shared and noisy, so only a ratio between contenders measured in
the same run, interleaved, means anything.

How one run goes::

    parent (core.py / peers.py)                       child (fresh interpreter)
    ---------------------------                       -------------------------
    calibrate the CPU loop, measure sleep(1 ms)
    for each workload:
      for round r:                                    python -c "import _harness; ..."
        for each contender (rotated by r):  ------->    import the contender's module
          spawn one child, wait, read JSON  <-------    setup (untimed), run (timed),
                                                         check outputs, report peak RSS
      median items/s per contender, ratio to the
      workload's base measured in this same run
    print the table (and --json PATH)

Every measurement runs in its own child interpreter, so its peak RSS (``ru_maxrss`` of
the child itself, and separately of the worker processes it waited for) belongs to that
contender alone, and no thread or process of one contender outlives into the next. The
parent's own ``RUSAGE_CHILDREN`` cannot do this: it keeps the maximum over every child
ever reaped, so a small contender measured after a big one would inherit its peak.

A contender is a function ``fn(params: Params) -> Timed`` in an importable module of this
folder. It does its own untimed setup (a Dask cluster, imports), times only the work with
:func:`timed`, and returns what the workload's check needs (a sum, or the keyed outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import random
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

TRIVIAL = "trivial"
IO = "io"
CPU = "cpu"
KEYED = "keyed"
WORKLOADS = (TRIVIAL, IO, CPU, KEYED)

# The keyed workload's middle stage sleeps a little for some items so that a contender
# running it on several workers reorders items unless it keeps each key on one lane.
_KEYED_JITTER = (0.0, 0.0001, 0.0, 0.0003)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """What every contender of one workload receives; the same for all of them.

    Attributes:
        workload: one of ``trivial``, ``io``, ``cpu``, ``keyed``.
        n: items to push through.
        io_sleep: seconds the I/O workload's middle stage sleeps per item.
        io_workers: concurrency of the I/O workload's middle stage.
        cpu_loops: iterations of the CPU workload's pure-Python loop (calibrated to ~1.5 ms).
        cpu_acc: the loop's result, computed once by the parent, for the output check.
        cpu_procs: processes for the CPU workload.
        keys: distinct keys of the keyed workload.
        keyed_workers: concurrency of the keyed workload's middle stage.
        batch_size: batch size for the batching contenders.
        chunk: chunk size for the chunking contenders (Dask ``client.map``).
    """

    workload: str
    n: int
    io_sleep: float = 0.001
    io_workers: int = 16
    cpu_loops: int = 20_000
    cpu_acc: int = 0
    cpu_procs: int = 2
    keys: int = 100
    keyed_workers: int = 8
    batch_size: int = 100
    chunk: int = 1000

    def __post_init__(self) -> None:
        """Reject settings no workload can run.

        Raises:
            ValueError: for an unknown workload or a non-positive count.
        """
        if self.workload not in WORKLOADS:
            msg = f"workload must be one of {WORKLOADS} (got workload={self.workload!r})"
            raise ValueError(msg)
        if self.n < 1:
            msg = f"n must be >= 1 (got n={self.n}); pass a larger --n or drop --quick"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timed:
    """One timed run of a contender.

    Attributes:
        elapsed: wall seconds of the timed region (setup and teardown excluded).
        result: what the workload's check reads: the sum of the outputs, or for the keyed
            workload the outputs as a list of ``(key, seq)`` in the order they came out.
        note: anything the contender wants printed beside its row (empty by default).
    """

    elapsed: float
    result: Any
    note: str = ""


def timed(run: Callable[[], Any]) -> Timed:
    """Time ``run()`` with ``perf_counter`` and keep its result.

    Args:
        run: the work to time; its return value becomes ``Timed.result``.

    Returns:
        The elapsed wall time and the result.
    """
    start = time.perf_counter()
    result = run()
    return Timed(elapsed=time.perf_counter() - start, result=result)


# --------------------------------------------------------------------------- workloads


def add1(x: int) -> int:
    """The trivial stage: one addition, so the pipeline's own overhead is what is measured."""
    return x + 1


def io_stage(x: int, delay: float = 0.001) -> int:
    """The I/O stage: sleep ``delay`` seconds (releasing the GIL) and pass the item on."""
    time.sleep(delay)
    return x


def io_stage_for(params: Params) -> Callable[[int], int]:
    """The I/O stage bound to the run's sleep; a picklable ``functools.partial``."""
    return functools.partial(io_stage, delay=params.io_sleep)


def spin(loops: int) -> int:
    """The pure-Python loop behind the CPU stage; its result depends only on ``loops``."""
    acc = 0
    for i in range(loops):
        acc = (acc * 31 + i) & 0xFFFFFF
    return acc


def cpu_stage(x: int, loops: int = 20_000) -> int:
    """The CPU stage: about 1.5 ms of pure-Python work (calibrated), holding the GIL."""
    return x + spin(loops)


def cpu_stage_for(params: Params) -> Callable[[int], int]:
    """The CPU stage bound to the run's calibrated loop count; a picklable partial."""
    return functools.partial(cpu_stage, loops=params.cpu_loops)


def cpu_chunk(xs: Sequence[int], loops: int) -> list[int]:
    """The CPU stage over a chunk, for contenders that ship chunks to workers."""
    return [cpu_stage(x, loops) for x in xs]


def keyed_items(n: int, keys: int, seed: int = 20240601) -> Iterator[tuple[int, int]]:
    """``n`` items ``(key, seq)`` over ``keys`` keys, ``seq`` counting from 0 per key.

    Keys come in short runs (1 to 4 items of one key in a row, keys drawn from a seeded
    generator, so every run yields the same items): items of one key then sit close
    together in the stream, where concurrent workers can overtake one another.
    """
    rng = random.Random(seed)
    seqs = [0] * keys
    produced = 0
    while produced < n:
        k = rng.randrange(keys)
        for _ in range(min(rng.randint(1, 4), n - produced)):
            yield (k, seqs[k])
            seqs[k] += 1
            produced += 1


def item_key(item: tuple[int, int]) -> int:
    """The key of a keyed item."""
    return item[0]


def keyed_pass(item: tuple[int, int]) -> tuple[int, int]:
    """The keyed workload's first and last stages: hand the item on unchanged."""
    return item


def keyed_work(item: tuple[int, int]) -> tuple[int, int]:
    """The keyed middle stage: sleep 0 to 0.3 ms depending on the item, then pass it on."""
    delay = _KEYED_JITTER[(item[0] * 31 + item[1]) % len(_KEYED_JITTER)]
    if delay:
        time.sleep(delay)
    return item


def keyed_chunk(items: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The keyed workload's three stages over a chunk, in order."""
    return [keyed_pass(keyed_work(keyed_pass(it))) for it in items]


def trivial_chunk(xs: Iterable[int]) -> list[int]:
    """The trivial workload's three stages over a chunk."""
    return [add1(add1(add1(x))) for x in xs]


def io_chunk(xs: Iterable[int], delay: float) -> list[int]:
    """The I/O workload's three stages over a chunk."""
    return [add1(io_stage(add1(x), delay)) for x in xs]


def chunks(n: int, size: int) -> list[range]:
    """``range(n)`` cut into ranges of ``size`` (cheap to pickle)."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def expected_sum(params: Params) -> int:
    """The sum every correct contender of the sum-checked workloads must return."""
    base = params.n * (params.n - 1) // 2
    if params.workload == TRIVIAL:
        return base + 3 * params.n
    if params.workload == IO:
        return base + 2 * params.n
    if params.workload == CPU:
        return base + params.cpu_acc * params.n
    msg = f"workload {params.workload!r} is not sum-checked; use check_keyed for keyed"
    raise ValueError(msg)


def check_keyed(outputs: Sequence[tuple[int, int]], params: Params) -> str:
    """Check completeness and per-key order of the keyed workload's outputs.

    Returns:
        ``"order OK"``, ``"order BROKEN (<n> inversions)"`` or ``"lost items: ..."``.
    """
    if len(outputs) != params.n:
        return f"lost items: got {len(outputs)} of {params.n}"
    last = [-1] * params.keys
    seen = [0] * params.keys
    inversions = 0
    for k, s in outputs:
        if s < last[k]:
            inversions += 1
        last[k] = max(last[k], s)
        seen[k] += 1
    expected = [0] * params.keys
    for k, _ in keyed_items(params.n, params.keys):
        expected[k] += 1
    if seen != expected:
        return "lost items: per-key counts differ"
    return "order OK" if inversions == 0 else f"order BROKEN ({inversions} inversions)"


def check(timed_run: Timed, params: Params) -> tuple[bool, str]:
    """Check a contender's result against the workload; returns (ok, text for the table)."""
    if params.workload == KEYED:
        text = check_keyed(timed_run.result, params)
        return (not text.startswith("lost"), text)
    want = expected_sum(params)
    if timed_run.result == want:
        return (True, "sum OK")
    return (False, f"sum WRONG ({timed_run.result} != {want})")


def calibrate_cpu(target_s: float = 0.0015) -> tuple[int, float]:
    """Loop count for ``spin`` that takes about ``target_s`` here, and its measured time."""
    loops = 5_000
    per_loop = _median_time(lambda: spin(loops), 15) / loops
    loops = max(1_000, round(target_s / per_loop))
    return loops, _median_time(lambda: spin(loops), 15)


def measure_sleep(delay: float, repeat: int = 100) -> float:
    """The median real duration of ``time.sleep(delay)`` on this machine."""
    return _median_time(lambda: time.sleep(delay), repeat)


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True, slots=True, kw_only=True)
class Contender:
    """One row of a workload's table.

    Attributes:
        name: the row label, saying the configuration (``pypeln thread, 16 workers``).
        target: ``"module:function"`` run in a child, or ``None`` for a cell that is n/a.
        na: why the contender cannot do this workload (printed when ``target`` is None).
        scale: fraction of the workload's ``n`` this contender runs (slow contenders run
            fewer items so the full run stays within minutes; items/s stays comparable).
        goal: the figure quoted in the issues, printed beside the measurement.
    """

    name: str
    target: str | None = None
    na: str = ""
    scale: float = 1.0
    goal: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    """A workload, its sizes, its contenders and what their ratio is taken against.

    Attributes:
        workload: the workload name.
        title: the heading printed above its table.
        n_full: items in the default mode.
        n_quick: items with ``--quick``.
        contenders: the rows, in order.
        base: name of the contender every ratio is taken against, or ``"ideal"`` for the
            I/O workload (``io_workers / io_sleep`` items/s, computed, not measured).
    """

    workload: str
    title: str
    n_full: int
    n_quick: int
    contenders: tuple[Contender, ...]
    base: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetCheck:
    """A ratio quoted in an issue, printed (never asserted) under the tables.

    Attributes:
        workload: where both contenders are measured.
        contender: the numerator's row name.
        reference: the denominator's row name, or ``"ideal"``.
        minimum: the quoted target ratio.
    """

    workload: str
    contender: str
    reference: str
    minimum: float


@dataclass(slots=True)
class Cell:
    """The measurements of one contender on one workload across rounds."""

    contender: Contender
    n: int
    rates: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    child_rss_kib: list[int] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failure: str = ""
    leftovers: int = 0

    def median_rate(self) -> float | None:
        """The median items/s over the rounds, or None when nothing was measured."""
        return statistics.median(self.rates) if self.rates else None


# --------------------------------------------------------------------------- child side


def child_main(argv: Sequence[str]) -> int:
    """Run one contender once and print one JSON line; the entry point of every child.

    Args:
        argv: ``[target, params_json]``.

    Returns:
        The process exit status (0 even when the contender failed: the JSON says how).
    """
    target, params_json = argv
    params = Params(**json.loads(params_json))
    module_name, func_name = target.split(":")
    report: dict[str, Any]
    try:
        module = __import__(module_name)
        fn = getattr(module, func_name)
        run = fn(params)
    except Unavailable as err:
        report = {"unavailable": str(err)}
    except Exception as err:
        report = {"error": f"{type(err).__name__}: {err}"}
    else:
        ok, text = check(run, params)
        report = {"elapsed": run.elapsed, "ok": ok, "check": text, "note": run.note}
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    child_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["rss_kib"] = self_usage.ru_maxrss
    report["child_rss_kib"] = child_usage.ru_maxrss
    sys.stdout.write("\n@@RESULT@@" + json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


class Unavailable(Exception):
    """Raised by a contender whose package is missing or cannot run here."""


# --------------------------------------------------------------------------- parent side


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """How the parent runs the suite.

    Attributes:
        quick: smoke-test sizes and one round.
        rounds: rounds per workload.
        timeout: seconds one child may run before it is killed.
        only: workloads to run (all when empty).
        json_path: where to write the JSON report, if anywhere.
        verbose: print each child's outcome as it finishes.
    """

    quick: bool
    rounds: int
    timeout: float
    only: tuple[str, ...]
    json_path: Path | None
    verbose: bool


def parse_args(description: str, argv: Sequence[str] | None = None) -> RunConfig:
    """The command line every benchmark script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small N, one round (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child run")
    parser.add_argument(
        "--only", action="append", choices=WORKLOADS, default=[], help="run only this workload"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each child run")
    ns = parser.parse_args(argv)
    rounds = ns.rounds if ns.rounds is not None else (1 if ns.quick else 3)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1 (got {rounds})")
    timeout = ns.timeout if ns.timeout is not None else (30.0 if ns.quick else 180.0)
    return RunConfig(
        quick=ns.quick,
        rounds=rounds,
        timeout=timeout,
        only=tuple(ns.only),
        json_path=ns.json,
        verbose=ns.verbose,
    )


def machine_info() -> dict[str, Any]:
    """CPU count, Python, platform and the exact command, for the report's header."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def run_child(target: str, params: Params, timeout: float) -> dict[str, Any]:
    """Run one contender in a fresh interpreter and return its JSON report.

    The child runs in its own session, so that its whole process group (pool workers, a
    Dask cluster, a forkserver) can be killed by the group id of the child we started: on
    timeout, and after it exits, so no leftover process steals a core from the next run.
    While it runs, the summed RSS of its descendant processes is sampled every 50 ms
    (``tree_rss_kib``): process pools started through a forkserver or a Dask nanny are
    not reaped by the child itself, so its ``RUSAGE_CHILDREN`` misses them.
    """
    import psutil

    env = dict(os.environ)
    paths = [str(BENCH_DIR), str(REPO_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    code = "import sys, _harness; sys.exit(_harness.child_main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, target, json.dumps(dataclasses.asdict(params))]
    deadline = time.monotonic() + timeout
    tree_peak = 0
    with subprocess.Popen(
        args,
        cwd=str(BENCH_DIR),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        watched = psutil.Process(proc.pid)
        while True:
            try:
                out, err = proc.communicate(timeout=_SAMPLE_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                tree_peak = max(tree_peak, _descendants_rss(watched))
                if time.monotonic() > deadline:
                    _kill_group(proc.pid)
                    proc.communicate()
                    return {"error": f"timeout after {timeout:.0f} s (killed)"}
        leftovers = _kill_group(proc.pid, grace=_LEFTOVER_GRACE)
    for line in reversed(out.splitlines()):
        if line.startswith("@@RESULT@@"):
            result: dict[str, Any] = json.loads(line[len("@@RESULT@@") :])
            result["tree_rss_kib"] = tree_peak // 1024
            result["leftovers"] = leftovers
            return result
    tail = " | ".join(err.strip().splitlines()[-3:])
    return {"error": f"child exited {proc.returncode} without a result: {tail}"}


_SAMPLE_INTERVAL = 0.05
_LEFTOVER_GRACE = 1.0  # a forkserver or pool worker may take a moment to notice


def _descendants_rss(proc: Any) -> int:
    import psutil

    total = 0
    try:
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            total += kid.memory_info().rss
    return total


def _kill_group(pgid: int, grace: float = 0.0) -> bool:
    """SIGKILL what is left of the process group we started, after up to ``grace`` seconds.

    Returns:
        True when a live (non-zombie) process of the group outlived the grace period.
    """
    deadline = time.monotonic() + grace
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return True
        time.sleep(_SAMPLE_INTERVAL)
    return False


def _group_alive(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def run_suite(
    title: str,
    specs: Sequence[WorkloadSpec],
    config: RunConfig,
    *,
    checks: Sequence[TargetCheck] = (),
    extra_sections: Sequence[Callable[[], list[str]]] = (),
) -> dict[str, Any]:
    """Measure every contender of every workload in interleaved rounds and print the tables.

    Args:
        title: the report's first line.
        specs: the workloads and their contenders.
        config: the command line.
        checks: issue targets to print under the tables.
        extra_sections: functions returning lines printed after the tables.

    Returns:
        The whole report as a JSON-ready dict (also written to ``config.json_path``).
    """
    info = machine_info()
    loops, cpu_item = calibrate_cpu()
    probe = Params(workload=CPU, n=1, cpu_loops=loops)
    sleep_real = measure_sleep(probe.io_sleep)
    info.update(
        cpu_loops=loops,
        cpu_item_ms=round(cpu_item * 1e3, 3),
        sleep_1ms_real_ms=round(sleep_real * 1e3, 3),
    )
    mode = "quick" if config.quick else "full"
    _print_header(title, info, config, mode)
    report: dict[str, Any] = {"title": title, "mode": mode, "machine": info, "workloads": {}}
    all_cells: dict[str, dict[str, Cell]] = {}
    for spec in specs:
        if config.only and spec.workload not in config.only:
            continue
        n = spec.n_quick if config.quick else spec.n_full
        base_params = Params(workload=spec.workload, n=n, cpu_loops=loops, cpu_acc=spin(loops))
        cells = _measure_workload(spec, base_params, config)
        all_cells[spec.workload] = cells
        lines = _table(spec, cells, base_params)
        print("\n".join(lines), flush=True)
        report["workloads"][spec.workload] = _json_cells(spec, cells, base_params)
    target_lines = _target_lines(checks, all_cells)
    if target_lines:
        print("\n".join(target_lines), flush=True)
        report["targets"] = target_lines[2:]
    for section in extra_sections:
        lines = section()
        print("\n" + "\n".join(lines), flush=True)
        report.setdefault("sections", []).append(lines)
    if config.json_path is not None:
        config.json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON written to {config.json_path}")
    return report


def _print_header(title: str, info: dict[str, Any], config: RunConfig, mode: str) -> None:
    print(title)
    print("=" * len(title))
    print(f"command : {info['command']}")
    print(
        f"machine : {info['cpu_count']} cpus (affinity {info['cpu_affinity']}), "
        f"{info['implementation']} {info['python']}, {info['platform']}"
    )
    print(
        f"mode    : {mode}, {config.rounds} round(s) per workload, contenders interleaved "
        f"and rotated each round, each run in a fresh subprocess; medians shown"
    )
    print(
        f"calib.  : cpu stage = spin({info['cpu_loops']}) ~ {info['cpu_item_ms']} ms/item; "
        f"time.sleep(0.001) really takes {info['sleep_1ms_real_ms']} ms"
    )
    print("note    : benchmarks never assert; absolute numbers drift on a shared machine,")
    print("          compare the ratios measured in this run", flush=True)


def _measure_workload(spec: WorkloadSpec, params: Params, config: RunConfig) -> dict[str, Cell]:
    cells = {
        c.name: Cell(contender=c, n=max(1, round(params.n * c.scale))) for c in spec.contenders
    }
    runnable = [c for c in spec.contenders if c.target is not None]
    for r in range(config.rounds):
        shift = r % len(runnable) if runnable else 0
        for contender in runnable[shift:] + runnable[:shift]:
            cell = cells[contender.name]
            if cell.failure or contender.target is None:
                continue  # a contender that failed once is not retried in later rounds
            p = dataclasses.replace(params, n=cell.n)
            res = run_child(contender.target, p, config.timeout)
            _record(cell, res)
            if config.verbose:
                print(f"  [{spec.workload} r{r + 1}] {contender.name}: {res}", flush=True)
    return cells


def _record(cell: Cell, res: dict[str, Any]) -> None:
    if "unavailable" in res:
        cell.failure = str(res["unavailable"])
        return
    if "error" in res:
        cell.failure = f"error: {res['error']}"
        return
    cell.rates.append(cell.n / res["elapsed"] if res["elapsed"] > 0 else float("inf"))
    cell.rss_kib.append(int(res["rss_kib"]))
    cell.child_rss_kib.append(max(int(res["child_rss_kib"]), int(res["tree_rss_kib"])))
    if res.get("leftovers"):
        cell.leftovers += 1
    cell.checks.append(res["check"])
    if res.get("note"):
        cell.notes.append(res["note"])


def _base_rate(spec: WorkloadSpec, cells: dict[str, Cell], params: Params) -> float | None:
    if spec.base == "ideal":
        return params.io_workers / params.io_sleep
    base = cells.get(spec.base)
    return base.median_rate() if base else None


def _fmt_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M"
    if rate >= 1e4:
        return f"{rate / 1e3:.0f}k"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k"
    return f"{rate:.0f}"


def _table(spec: WorkloadSpec, cells: dict[str, Cell], params: Params) -> list[str]:
    base_rate = _base_rate(spec, cells, params)
    base_label = (
        f"ideal = {params.io_workers} workers / {params.io_sleep * 1e3:g} ms "
        f"= {_fmt_rate(params.io_workers / params.io_sleep)} items/s"
        if spec.base == "ideal"
        else spec.base
    )
    w = max(len(c.name) for c in spec.contenders)
    header = (
        f"{'contender':<{w}} {'n':>7} {'items/s':>8} {'spread':>7} {'ratio':>7} "
        f"{'issue target':>14} {'peak MiB':>8} {'wrk MiB':>7}  check"
    )
    lines = ["", f"{spec.title}  (ratio vs {base_label})", header, "-" * len(header)]
    for c in spec.contenders:
        cell = cells[c.name]
        rate = cell.median_rate()
        if c.target is None:
            lines.append(f"{c.name:<{w}} n/a: {c.na}")
            continue
        if rate is None:
            lines.append(f"{c.name:<{w}} {cell.failure}")
            continue
        spread = (
            f"{(max(cell.rates) - min(cell.rates)) / rate * 100:.0f}%"
            if len(cell.rates) > 1
            else "-"
        )
        ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
        rss = statistics.median(cell.rss_kib) / 1024
        wrk = max(cell.child_rss_kib) / 1024
        check_text = _summarise_checks(cell.checks)
        extra = f"  [{cell.failure}]" if cell.failure else ""
        note = f"  ({cell.notes[-1]})" if cell.notes else ""
        if cell.leftovers:
            note += f"  (processes outlived the run {cell.leftovers}x: killed after 1 s)"
        lines.append(
            f"{c.name:<{w}} {cell.n:>7} {_fmt_rate(rate):>8} {spread:>7} {ratio:>7} "
            f"{c.goal:>14} {rss:>8.0f} {(f'{wrk:.0f}' if wrk else '-'):>7}  "
            f"{check_text}{note}{extra}"
        )
    return lines


def _summarise_checks(checks: list[str]) -> str:
    distinct = sorted(set(checks))
    if len(distinct) == 1:
        return distinct[0]
    return "; ".join(f"{text} x{checks.count(text)}" for text in distinct)


def _target_lines(
    checks: Sequence[TargetCheck],
    all_cells: dict[str, dict[str, Cell]],
) -> list[str]:
    lines = ["", "Issue targets (printed, never asserted)"]
    for t in checks:
        cells = all_cells.get(t.workload)
        label = f"{t.workload}: {t.contender} / {t.reference} >= {t.minimum:g}"
        if cells is None or t.contender not in cells:
            continue  # workload left out with --only
        num = cells[t.contender].median_rate()
        if t.reference == "ideal":
            p = Params(workload=t.workload, n=1)
            den: float | None = p.io_workers / p.io_sleep
        else:
            ref = cells.get(t.reference)
            den = ref.median_rate() if ref else None
        if num is None or not den:
            lines.append(f"  {'not measured':>14}  {label}")
            continue
        ratio = num / den
        verdict = "meets" if ratio >= t.minimum else "below"
        lines.append(f"  {ratio:7.2f} {verdict:>6}  {label}")
    return lines if len(lines) > 2 else []


def _json_cells(spec: WorkloadSpec, cells: dict[str, Cell], params: Params) -> dict[str, Any]:
    base_rate = _base_rate(spec, cells, params)
    out: dict[str, Any] = {"n": params.n, "base": spec.base, "base_rate": base_rate, "rows": {}}
    for name, cell in cells.items():
        rate = cell.median_rate()
        out["rows"][name] = {
            "target": cell.contender.target,
            "na": cell.contender.na or None,
            "n": cell.n,
            "goal": cell.contender.goal or None,
            "rates": cell.rates,
            "median_rate": rate,
            "ratio": (rate / base_rate) if rate and base_rate else None,
            "rss_kib": cell.rss_kib,
            "child_rss_kib": cell.child_rss_kib,
            "checks": cell.checks,
            "notes": cell.notes,
            "failure": cell.failure or None,
            "runs_with_leftover_processes": cell.leftovers,
        }
    return out
