"""The ``pipekit`` command: run a pipeline as a service, the demo, settings and profiles.

::

    pipekit run module:attribute [--set name=value ...] [--duration S] ...
    pipekit demo [--items N | --duration S] [--ops-port P] [--profile cpu,heap]
    pipekit config [--set name=value ...]
    pipekit profile URL (--cpu S | --heap S) [--token T] [--rate R] [-o DIR]

The command owns its process, so unlike the library it may set up logging (a handler
on the ``pipekit`` logger), OpenTelemetry (:func:`pipekit.otel_setup.configure`) and
signal handling (``Pipeline.run``'s: SIGINT/SIGTERM drain, a second one stops at once).
Exit codes, for supervisors and scripts (``docs/cli.md``):

====  =====================================================================
0     done: the input was exhausted (or ``--duration`` passed) and every item
      reached an output or was dropped
1     failed: the source raised, an ``on_shutdown`` hook failed, or (profile)
      the ops server or the network failed
2     usage: a bad argument, target or setting; nothing ran
3     done, but some items ended as dead letters
4     items that entered the pipeline were left unprocessed: the shutdown
      deadline passed, or a second signal stopped the run at once
130   stopped by SIGINT and drained in time (143 for SIGTERM: 128 + signal)
====  =====================================================================

When several apply, the first in the order 2, 1, 4, 130/143, 3 wins. Items the source
had yielded but intake refused because it was closing ("not taken" in the summary)
never entered the pipeline; they are reported but do not make a graceful stop a 4.
The demo exits 0 after Ctrl-C or with dead letters (its store fails on purpose).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import functools
import http.client
import importlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

import pipekit
from pipekit import demo, otel_setup
from pipekit.config import SETTINGS, Config, Setting
from pipekit.errors import ConfigError, MissingExtraError, PipekitError, PipelineStateError
from pipekit.logs import JsonFormatter
from pipekit.ops import is_loopback
from pipekit.pipeline import Pipeline, Run
from pipekit.stats import DeadLetter, PipelineStats, RunReport

__all__ = [
    "EXIT_DEAD_LETTERS",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNPROCESSED",
    "EXIT_USAGE",
    "ServerError",
    "UsageError",
    "build_parser",
    "exit_code",
    "load_pipeline",
    "main",
    "parse_duration",
    "setting_overrides",
]

log = logging.getLogger("pipekit.cli")

EXIT_OK = 0
"""Every item reached an output or was dropped."""
EXIT_FAILED = 1
"""The source raised, a shutdown hook failed, or the ops server or network failed."""
EXIT_USAGE = 2
"""A bad argument, target or setting: nothing ran."""
EXIT_DEAD_LETTERS = 3
"""The run finished, but some items ended as dead letters."""
EXIT_UNPROCESSED = 4
"""Items were left unprocessed (shutdown deadline, or a second signal)."""

_EXIT_HELP = """exit codes:
  0        done: every item reached an output (or was dropped)
  1        the source raised or an on_shutdown hook failed
  2        bad arguments, target or settings (nothing ran)
  3        done, with dead letters
  4        items were left unprocessed (shutdown deadline, or a second signal)
  130/143  stopped by SIGINT/SIGTERM and drained in time
"""
_TOKEN_ENV = "PIPEKIT_OPS_TOKEN"
_BY_NAME = {s.name: s for s in SETTINGS}
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_REASONS = {
    "completed": "completed",
    "duration": "stopped after --duration and drained",
    "signal": "drained after a signal",
    "deadline": "stopped at the shutdown deadline",
    "aborted": "stopped at once by a second signal",
    "shutdown": "shut down",
    "source_error": "stopped: its source raised",
}
_DEAD_LOGGED = 3  # dead letters logged per (stage, error type); the rest are counted
_PROFILE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class UsageError(PipekitError, ValueError):
    """A command-line mistake (bad target, flag or URL): one line on stderr, exit 2."""


class ServerError(PipekitError, RuntimeError):
    """The ops server or the network failed a ``pipekit profile`` request: exit 1."""


# -- arguments ------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Parse a duration such as ``30``, ``30s``, ``500ms``, ``2m`` or ``1h`` into seconds.

    Raises:
        argparse.ArgumentTypeError: not a positive, finite duration.
    """
    word, scale = text.strip().lower(), 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if word.endswith(suffix):
            word, scale = word[: -len(suffix)].strip(), factor
            break
    try:
        seconds = float(word) * scale
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(
            f"a duration must be a positive number of seconds such as 30, 30s, 500ms or 2m "
            f"(got {text!r})")
    return seconds


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("logging")
    group.add_argument("--log-level", default="warning",
                       choices=("debug", "info", "warning", "error"),
                       help="level of the pipekit logger (default: warning)")
    group.add_argument("--log-format", default="text", choices=("text", "json"),
                       help="log lines as text or one JSON object each (default: text)")
    return common


def _settings_options(*, workers: bool) -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("settings (layered over pipekit.toml and PIPEKIT_*)")
    group.add_argument("--config", metavar="FILE", help="settings file instead of pipekit.toml")
    group.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="set any setting (repeatable); see 'pipekit config'")
    if workers:
        group.add_argument("--workers", metavar="N", help="default worker count of a stage")
    group.add_argument("--shutdown-timeout", metavar="SECONDS",
                       help="deadline of the drain at shutdown, e.g. 30 or 2m")
    group.add_argument("--ops-port", metavar="PORT",
                       help="serve the ops endpoints on this port (0: a free port)")
    group.add_argument("--ops-host", metavar="HOST",
                       help="address of the ops server (default 127.0.0.1)")
    group.add_argument("--profile", metavar="KINDS",
                       help="profile the whole run (cpu, heap or cpu,heap); written at exit")
    return parent


def _run_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--duration", type=parse_duration, metavar="SECONDS",
                     help="stop reading the source after this long, then drain (e.g. 30, 5m)")
    cmd.add_argument("--no-telemetry", action="store_true",
                     help="no OpenTelemetry set-up and no instrumentation (no /metrics data)")
    cmd.add_argument("--no-progress", action="store_true",
                     help="no progress bar even on a terminal")
    cmd.add_argument("--report-json", metavar="FILE",
                     help="also write the run report as JSON to FILE")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``pipekit`` argument parser (every command and flag)."""
    parser = _Parser(prog="pipekit", description="Run, watch and profile pipekit pipelines.")
    parser.add_argument("--version", action="version", version=f"pipekit {pipekit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    run = sub.add_parser("run", parents=[common, _settings_options(workers=True)],
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="run a pipeline from your code as a service",
                         description="Load a Pipeline (or a function returning one) and run "
                                     "it over its own source until the source ends, "
                                     "--duration passes, or SIGINT/SIGTERM.")
    run.epilog = _EXIT_HELP
    run.add_argument("target", help="module:attribute, e.g. myapp.pipelines:pipe")
    _run_options(run)
    run.set_defaults(handler=_cmd_run)
    demo = sub.add_parser("demo", parents=[common, _settings_options(workers=False)],
                          help="run the built-in card-transaction demo",
                          description="A five-stage pipeline over synthetic transactions, "
                                      "with the ops server on 127.0.0.1:8080.")
    demo.add_argument("--items", type=_count, metavar="N",
                      help="process N transactions and stop (default: until Ctrl-C)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    _run_options(demo)
    demo.set_defaults(handler=_cmd_demo)
    config = sub.add_parser("config", parents=[common, _settings_options(workers=True)],
                            help="show the effective settings and where each came from")
    config.add_argument("--json", action="store_true", help="print JSON instead of a table")
    config.set_defaults(handler=_cmd_config)
    _profile_parser(sub, common)
    return parser


def _profile_parser(sub: Any, common: _Parser) -> None:
    prof = sub.add_parser("profile", parents=[common], help="take a profile of a running pipeline",
                          description="Ask a pipeline's ops server for a CPU or heap profile "
                                      "and download its files.")
    prof.add_argument("url", help="the ops server, e.g. http://127.0.0.1:8080")
    kind = prof.add_mutually_exclusive_group(required=True)
    kind.add_argument("--cpu", type=parse_duration, metavar="SECONDS", help="CPU profile (py-spy)")
    kind.add_argument("--heap", type=parse_duration, metavar="SECONDS",
                      help="heap profile (memray)")
    prof.add_argument("--token", help=f"bearer token (default: ${_TOKEN_ENV})")
    prof.add_argument("--rate", type=_count, metavar="HZ", help="CPU samples per second (1-1000)")
    prof.add_argument("-o", "--output", default=".", metavar="DIR",
                      help="folder for the files (default: the current one)")
    prof.set_defaults(handler=_cmd_profile)


# -- settings -------------------------------------------------------------------------


def _setting(name: str, origin: str) -> Setting:
    found = _BY_NAME.get(name)
    if found is None:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "'pipekit config' lists them"
        raise UsageError(f"unknown setting {name!r} in {origin}; {hint}")
    return found


def setting_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings given on the command line, parsed and checked.

    ``--set`` comes first; a convenience flag (``--workers``, ``--ops-port``...) wins over
    a ``--set`` of the same setting. ``--ops-port``/``--ops-host`` also turn the ops
    server on, and ``--profile`` turns whole-run profiling on.

    Returns:
        ``(overrides, origins)``: setting name to value, and to the flag that set it.

    Raises:
        UsageError: ``--set`` without ``=``, or an unknown setting.
        ConfigError: a value that does not parse.
    """
    texts: dict[str, tuple[str, str]] = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set takes name=value (got {item!r}); e.g. --set workers=4")
        texts[name.strip()] = (text, f"--set {name.strip()}")
    flags = (("workers", "workers"), ("shutdown_timeout", "shutdown_timeout"),
             ("ops_port", "ops_port"), ("ops_host", "ops_host"), ("profile", "profiling_kinds"))
    for attr, name in flags:
        text = getattr(args, attr, None)
        if text is not None:
            flag = "--" + attr.replace("_", "-")
            texts[name] = (text, flag)
            if name in ("ops_port", "ops_host"):
                texts["ops_enabled"] = ("true", flag)
            elif name == "profiling_kinds":
                texts["profiling_enabled"] = ("true", flag)
    if getattr(args, "no_telemetry", False):
        texts["telemetry_enabled"] = ("false", "--no-telemetry")
    values = {name: _setting(name, origin).parse(text, origin=origin)
              for name, (text, origin) in texts.items()}
    return values, {name: origin for name, (_, origin) in texts.items()}


def _export(overrides: dict[str, Any], config_path: str | None) -> None:
    """Put the overrides in ``PIPEKIT_*`` so every ``Config.load()`` in the process sees them.

    The user's module builds its ``Pipeline`` at import, and its stages take their
    defaults (``workers``, ``batch_size``, ``ordered``) from the config at that moment.
    """
    if config_path is not None:
        os.environ["PIPEKIT_CONFIG"] = str(Path(config_path).resolve())
    for name, value in overrides.items():
        setting = _BY_NAME[name]
        text = str(value) if setting.secret and value is not None else setting.format(value)
        os.environ[setting.env_var] = text


def _apply(pipe: Pipeline, overrides: dict[str, Any]) -> None:
    """Layer the overrides last on the loaded pipeline's config (and what derives from it)."""
    if not overrides:
        return
    pipe.config = pipe.config.replace(**overrides)
    if "ordered" in overrides:
        pipe.ordered = pipe.config.ordered
    if "telemetry_enabled" in overrides:
        pipe.telemetry = pipe.config.telemetry_enabled


# -- loading the user's pipeline ------------------------------------------------------


def _raised(what: str, err: BaseException) -> UsageError:
    """One line for an exception raised by the user's code, with where it was raised."""
    where = ""
    if isinstance(err, SyntaxError) and err.filename:
        where = f" ({err.filename}:{err.lineno})"
    elif err.__traceback__ is not None:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f" ({frame.filename}:{frame.lineno})"
    if isinstance(err, PipekitError):
        return UsageError(f"{what}: {err}")
    return UsageError(f"{what} raised {type(err).__name__}: {err}{where}")


def _import(module_name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: the working directory's modules
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise UsageError(
                f"no module named {module_name!r}; check the name, and run from the folder "
                f"that contains it or add that folder to PYTHONPATH") from None
        raise _raised(f"importing {module_name!r}", err) from None
    except Exception as err:  # the user's module failed: say where, in one line
        raise _raised(f"importing {module_name!r}", err) from None


def load_pipeline(target: str) -> Pipeline:
    """Load the pipeline named by ``module:attribute`` (a ``Pipeline`` or a factory).

    The working directory is importable, as with ``python -m``. A factory is called
    with no arguments and must return a :class:`pipekit.Pipeline`.

    Raises:
        UsageError: a malformed target, a module that cannot be imported, a missing
            attribute, or something that is not a pipeline (the message names it).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"the target must be module:attribute, e.g. myapp.pipelines:pipe "
                         f"(got {target!r})")
    module = _import(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
            hint = f"; pipelines there: {', '.join(found)}" if found else ""
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if isinstance(obj, Pipeline):
        return obj
    if callable(obj) and not isinstance(obj, type):
        try:
            made = obj()
        except Exception as err:
            raise _raised(f"calling {target}()", err) from None
        if isinstance(made, Pipeline):
            return made
        raise UsageError(f"{target}() returned {_a(type(made))}, not a "
                         f"pipekit.Pipeline; return the pipeline from the function")
    raise UsageError(f"{target} is {_a(type(obj))}, not a pipekit.Pipeline or a "
                     f"function returning one")


# -- running --------------------------------------------------------------------------


class _Source:
    """The pipeline's input, counting what was read and keeping the error it raised."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items
        self.read = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.items:
                self.read += 1
                yield item
        except Exception as err:
            self.error = err
            raise


class _DeadLetters:
    """The run's dead-letter callable: counts by stage and error type, logs the first few."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.counts: Counter[tuple[str, str]] = Counter()
        self.first: dict[tuple[str, str], str] = {}

    def __call__(self, letter: DeadLetter) -> None:
        kind = (letter.stage, type(letter.error).__name__)
        self.counts[kind] += 1
        n = self.counts[kind]
        if n == 1:
            self.first[kind] = str(letter.error)[:160]
        if n <= _DEAD_LOGGED:
            log.log(self.level, "dead letter at stage %s after %d attempt(s): %s: %s",
                    letter.stage, letter.attempts, kind[1], letter.error)
            if n == _DEAD_LOGGED:
                log.log(self.level, "further %s dead letters at stage %s are counted, not "
                        "logged", kind[1], letter.stage)


class _Watcher:
    """Samples the run's stats: a progress bar, mean worker counts, live bottlenecks."""

    def __init__(self, run: Run, source: _Source, total: int | None) -> None:
        self.run = run
        self.source = source
        self.total = total
        self.worker_sums: Counter[str] = Counter()
        self.samples = 0
        self.running = 0  # samples taken while the run was running (not draining)
        self.bottlenecks: Counter[tuple[str, str]] = Counter()
        self._fanout = any(s.fanout for s in run.pipeline.stages)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipekit-cli-watch",
                                        daemon=True)

    def start(self) -> None:
        """Start sampling, on a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and close the progress bar."""
        self._stop.set()
        self._thread.join(2.0)

    def _done(self, stats: PipelineStats) -> int:
        if self._fanout:  # outputs do not map to inputs: show what was read
            return self.source.read
        dropped = sum(s.dropped for s in stats.stages)
        return stats.outputs + stats.dead_letters + dropped

    def _loop(self) -> None:
        bar = _progress_bar(self.total) if self.total is not None else None
        try:
            while not self._stop.wait(0.25):
                stats = self.run.stats()
                self.samples += 1
                for s in stats.stages:
                    self.worker_sums[s.name] += s.workers
                self.running += stats.state == "running"
                if stats.bottleneck and stats.state == "running":
                    self.bottlenecks[(stats.bottleneck, stats.bottleneck_reason)] += 1
                if bar is not None:
                    if stats.state in ("draining", "stopped"):
                        bar.close()  # log lines about the drain read better without it
                        bar = None
                    else:
                        bar.update(max(0, self._done(stats) - bar.n))
        finally:
            if bar is not None:
                bar.close()


def _progress_bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the cli extra is not installed: stay quiet
        return None
    return tqdm(total=total, unit="item", file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=0.25, smoothing=0.1)


@dataclass(slots=True)
class _Outcome:
    report: RunReport
    signum: int | None
    source_error: Exception | None
    watcher: _Watcher
    dead: _DeadLetters
    notes: list[str] = field(default_factory=list)


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _relay(seen: list[int], inner: Callable[[int, Any], Any], signum: int, frame: Any) -> None:
    seen.append(signum)
    inner(signum, frame)


def _note_signals(seen: list[int]) -> None:
    """Record which signal stopped the run, then let the run's own handler act on it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        inner = signal.getsignal(sig)
        if callable(inner):
            signal.signal(sig, functools.partial(_relay, seen, inner))


def _discard(_: Any) -> None:
    return None


def _execute(pipe: Pipeline, *, duration: float | None, progress: bool,
             dead: _DeadLetters, started: Callable[[Run], None]) -> _Outcome:
    """Run the pipeline over its own source, as ``Pipeline.run()`` does, with a handle."""
    items = pipe._input(None)
    source = _Source(items)
    seen: list[int] = []
    try:
        run = pipe.start(sink=_discard, dead_letter=dead, keep_dead_letters=False,
                         handle_signals=True)
    except OSError as err:  # the ops port is taken, the profile folder is not writable...
        raise UsageError(f"pipeline {pipe.name!r} could not start: {err}") from None
    watcher = _Watcher(run, source, _length(items) if progress else None)
    try:
        _note_signals(seen)
        started(run)
        watcher.start()
        run.feed(source)
        report = run.wait(duration=duration)
    except BaseException:
        run.shutdown()
        raise
    finally:
        watcher.stop()
    return _Outcome(report, seen[0] if seen else None, source.error, watcher, dead)


def exit_code(report: RunReport, *, signum: int | None = None, failed: bool = False,
              demo: bool = False) -> int:
    """The exit code of a finished run (see the module docstring for the table).

    Args:
        report: the run's report.
        signum: the signal that stopped it, if one did.
        failed: the source raised (also read from the report, with hook errors).
        demo: the demo's rules: dead letters (simulated) and Ctrl-C are a normal end.
    """
    if failed or report.hook_errors or report.source_error:
        return EXIT_FAILED
    entered = [u for u in report.unprocessed if u.where != "intake"]
    if entered or report.reason == "deadline" or (report.reason == "aborted"
                                                  and report.unprocessed):
        return EXIT_UNPROCESSED
    if demo:
        return EXIT_OK
    if signum is None and report.reason in ("signal", "aborted"):
        signum = signal.SIGTERM
    if signum is not None:
        return 128 + signum
    return EXIT_DEAD_LETTERS if report.dead_letter_count else EXIT_OK


# -- the summary ----------------------------------------------------------------------


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return "0" if ms <= 0 else "<0.001" if ms < 0.001 else f"{ms:.3g}"


def _a(kind: type) -> str:
    name = kind.__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _bottleneck(outcome: _Outcome) -> str:
    report, w = outcome.report, outcome.watcher
    if w.bottlenecks:  # the run's own verdict, the one it gave most often
        (name, reason), n = w.bottlenecks.most_common(1)[0]
        share = f"{n / max(w.running, 1):.0%} of the time"
        if reason == "starved":
            return f"none: no stage was under pressure {share} (the source or the CPU set " \
                   f"the pace)"
        return f"{name} ({reason}, {share})"
    best, best_util = "", 0.0
    for s in report.stages:
        workers = w.worker_sums[s.name] / w.samples if w.samples else s.workers
        util = s.busy_seconds / (report.duration * max(workers, 1.0)) if report.duration else 0
        if util > best_util:
            best, best_util = s.name, util
    if not best:
        return "none (nothing ran)"
    if best_util < 0.5:
        return f"none: the busiest stage, {best}, was busy {best_util:.0%} of the time"
    return f"{best} (busy {best_util:.0%} of the time per worker)"


def _stage_table(report: RunReport) -> list[str]:
    head = ("stage", "executor", "workers", "in", "ok", "failed", "retried", "p50 ms", "p95 ms")
    rows = [head] + [
        (s.name, s.executor, str(s.workers), f"{s.received:,}", f"{s.succeeded:,}",
         f"{s.failed:,}", f"{s.retried:,}", _ms(s.latency.p50), _ms(s.latency.p95))
        for s in report.stages
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  " + "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                             for i, c in enumerate(r)) for r in rows]


def _unprocessed(report: RunReport) -> list[str]:
    places = Counter((u.stage, u.where) for u in report.unprocessed if u.where != "intake")
    lines = []
    if places:
        where = ", ".join(f"{n:,} {where.replace('_', ' ')} at {stage}"
                          for (stage, where), n in places.most_common(4))
        lines.append(f"  unprocessed {where}")
    refused = sum(1 for u in report.unprocessed if u.where == "intake")
    if refused:
        lines.append(f"  not taken   {refused:,} read from the source as intake closed "
                     f"(they never entered the pipeline)")
    return lines


def _summary(outcome: _Outcome) -> list[str]:
    """The lines printed when a run ends."""
    r = outcome.report
    reason = _REASONS.get(r.reason, r.reason)
    if outcome.signum is not None and r.reason == "signal":
        reason = f"drained after {signal.Signals(outcome.signum).name}"
    refused = sum(1 for u in r.unprocessed if u.where == "intake")
    not_taken = f", {refused:,} not taken" if refused else ""
    lines = [
        f"pipekit: {r.pipeline!r} {reason} (ran {r.duration:.3g} s)",
        f"  items       {r.submitted - refused:,} in, {r.outputs:,} out, "
        f"{r.dead_letter_count:,} dead letters, {len(r.unprocessed) - refused:,} unprocessed"
        f"{not_taken} ({r.throughput:,.0f} items/s)",
        *_stage_table(r),
        f"  bottleneck  {_bottleneck(outcome)}",
    ]
    dead = outcome.dead
    for (stage, kind), n in dead.counts.most_common(5):
        lines.append(f"  dead        {n:,} at {stage}: {kind}: {dead.first[(stage, kind)]}")
    lines += _unprocessed(r)
    if outcome.source_error is not None:
        err = outcome.source_error
        lines.append(f"  source      raised {type(err).__name__}: {err}")
    elif r.source_error:
        lines.append(f"  source      raised {r.source_error}")
    lines += [f"  hook error  {stage}: {text}" for stage, text in r.hook_errors]
    lines += [f"  profile     {path}" for path in r.profiles]
    lines += [f"  {note}" for note in outcome.notes]
    return lines


# -- commands -------------------------------------------------------------------------


def _telemetry(pipe: Pipeline) -> tuple[Any, str]:
    """Install the OpenTelemetry SDK for this process; return it, or why metrics are off."""
    if not pipe.telemetry:
        return None, "off (telemetry_enabled is false)"
    try:
        setup = otel_setup.configure(service_name=pipe.name)
    except MissingExtraError:
        return None, "off: install 'pipekit[otel]' for /metrics and OTLP export"
    return setup, ""


def _finish(outcome: _Outcome, code: int, *, report_json: str | None, out: TextIO) -> int:
    for line in _summary(outcome):
        print(line, file=out)
    print(f"  exit        {code}", file=out, flush=True)
    if report_json:
        data = outcome.report.to_dict() | {"exit_code": code}
        Path(report_json).write_text(json.dumps(data, indent=2, default=repr) + "\n")
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    overrides, _ = setting_overrides(args)
    Config.load(path=args.config, **overrides)  # a bad file or variable fails here, clearly
    _export(overrides, args.config)
    pipe = load_pipeline(args.target)
    _apply(pipe, overrides)
    setup, note = _telemetry(pipe)
    progress = sys.stderr.isatty() and not args.no_progress

    def started(run: Run) -> None:
        stages = " -> ".join(s.name for s in pipe.stages)
        ops = f"; ops {run.ops_url}" if run.ops_url else ""
        print(f"pipekit: running {pipe.name!r} ({stages}){ops}; Ctrl-C drains, twice stops",
              flush=True)

    try:
        outcome = _execute(pipe, duration=args.duration, progress=progress,
                           dead=_DeadLetters(logging.WARNING), started=started)
    finally:
        if setup is not None:
            setup.shutdown()
    if note:
        outcome.notes.append(f"metrics     {note}")
    code = exit_code(outcome.report, signum=outcome.signum,
                     failed=outcome.source_error is not None)
    return _finish(outcome, code, report_json=args.report_json, out=sys.stdout)


def _port_free(host: str, port: int) -> bool:
    """Tell whether ``host:port`` can be bound now (False only for "address in use")."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return True  # the ops server reports an unusable address itself
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the ops server does
        try:
            sock.bind(addr)
        except OSError as err:
            return err.errno != errno.EADDRINUSE
    return True


def _demo_banner(run: Run, config: Config, metrics_off: str, notes: list[str]) -> list[str]:
    lines = ["pipekit demo: synthetic card transactions, Ctrl-C drains and prints a summary",
             "  stages    parse -> enrich (I/O: 2-16 threads, autoscaled) -> score (CPU: 2 "
             "processes)",
             "            -> aggregate (in order per user) -> store (flaky: retries, dead letters)"]
    url = run.ops_url
    if url:
        token = " (Authorization: Bearer $PIPEKIT_OPS_TOKEN)" if config.ops_token else ""
        lines += [f"  ops       {url}",
                  f"  metrics   {metrics_off or url + '/metrics'}",
                  f"  health    {url}/livez  {url}/readyz",
                  f"  debug     {url}/debug/pipeline{token}",
                  f"  profile   pipekit profile {url} --cpu 10"]
    elif config.ops_enabled:
        lines.append("  ops       not started (see the log above)")
    lines.append(f"  profiles  {Path(config.profiling_dir) / run.name}/")
    return lines + [f"  {note}" for note in notes]


def _cmd_demo(args: argparse.Namespace) -> int:
    overrides, _ = setting_overrides(args)
    overrides.setdefault("ops_enabled", True)
    config = Config.load(path=args.config, **overrides)
    notes = []
    if config.ops_enabled and config.ops_port and not _port_free(config.ops_host,
                                                                config.ops_port):
        notes.append(f"note      port {config.ops_port} is taken; the ops server uses a free "
                     f"port instead")
        config = config.replace(ops_port=0)
    pipe, state = demo.build(config, seed=args.seed, items=args.items)
    setup, metrics_off = _telemetry(pipe)

    def started(run: Run) -> None:
        print("\n".join(_demo_banner(run, config, metrics_off, notes)), flush=True)

    try:
        outcome = _execute(pipe, duration=args.duration,
                           progress=sys.stderr.isatty() and not args.no_progress,
                           dead=_DeadLetters(logging.INFO), started=started)
    finally:
        if setup is not None:
            setup.shutdown()
    outcome.notes.insert(0, f"store       {state.rows:,} rows written, {state.flagged:,} "
                            f"flagged as risky, {state.transient_errors:,} transient errors")
    if metrics_off:
        outcome.notes.append(f"metrics     {metrics_off}")
    code = exit_code(outcome.report, signum=outcome.signum,
                     failed=outcome.source_error is not None, demo=True)
    return _finish(outcome, code, report_json=args.report_json, out=sys.stdout)


def _cmd_config(args: argparse.Namespace) -> int:
    overrides, origins = setting_overrides(args)
    config = Config.load(path=args.config, **overrides)
    rows = [(name, value, f"flag {origins[name]}" if source == "argument" and name in origins
             else source) for name, value, source in config.describe()]
    if args.json:
        print(json.dumps([{"setting": n, "value": v, "source": s} for n, v, s in rows],
                         indent=2))
        return EXIT_OK
    rows.insert(0, ("setting", "value", "source"))
    wide = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, value, source in rows:
        print(f"{name.ljust(wide[0])}  {value.ljust(wide[1])}  {source}".rstrip())
    return EXIT_OK


# -- pipekit profile: a small urllib client of the ops server ---------------------------


def _base_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"the URL must start with http:// or https:// and name the ops "
                         f"server, e.g. http://127.0.0.1:8080 (got {text!r})")
    if parts.query or parts.fragment:
        raise UsageError(f"give the ops server's base URL without a query, e.g. "
                         f"{parts.scheme}://{parts.netloc} (got {text!r})")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _seconds_text(seconds: float) -> str:
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    if text == "0":
        raise UsageError(f"a profile must last at least 1 ms (got {seconds!r} s)")
    return text


def _server_says(body: bytes) -> str:
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return "".join(c for c in (lines[0] if lines else "") if c.isprintable())[:200]


def _http_failure(status: int, body: bytes, url: str, *, download: bool) -> PipekitError:
    says = _server_says(body)
    if status == 401:
        return UsageError(f"the ops server refused the token: set --token or {_TOKEN_ENV}")
    if status in (400, 403):
        return UsageError(f"the ops server refused the request ({status}): {says}")
    if status == 404 and not download:
        return UsageError(f"{url} is not a pipekit profile endpoint (404); give the ops "
                          f"server's base URL, e.g. http://127.0.0.1:8080")
    if status == 409:
        return ServerError("the ops server is already taking a profile of that kind "
                           "(409 busy); retry when it finishes")
    return ServerError(f"the ops server answered {status} for {url}: {says or 'no detail'}")


class _Client:
    """Requests to one ops server: bearer token, no proxy for loopback, one-line errors."""

    def __init__(self, base: str, token: str | None) -> None:
        if token is not None and (not token.isprintable() or " " in token):
            raise UsageError(f"the token must be printable without spaces; check --token or "
                             f"{_TOKEN_ENV}")
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(
            urlsplit(base).hostname or "") else []
        self._opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, *, method: str, timeout: float) -> bytes:
        url = self.base + path
        req = urllib.request.Request(url, data=b"" if method == "POST" else None,
                                     headers=self.headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as err:
            raise _http_failure(err.code, err.read(), url, download=method == "GET") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ConnectionRefusedError):
                raise ServerError(f"cannot connect to {self.base}: connection refused; is the "
                                  f"pipeline running with the ops server on that port?") from None
            raise ServerError(f"cannot reach {self.base}: {reason}") from None
        except TimeoutError:
            raise ServerError(f"{url} did not answer within {timeout:.0f} s") from None
        except (OSError, http.client.HTTPException) as err:
            raise ServerError(f"the connection to {self.base} failed: "
                              f"{type(err).__name__}: {err}") from None


def _profile_answer(data: bytes) -> tuple[str, dict[str, str]]:
    try:
        answer = json.loads(data)
        profile_id, files = str(answer["id"]), answer["files"]
        if not _PROFILE_ID.fullmatch(profile_id) or not isinstance(files, dict):
            raise ValueError(profile_id)
    except (ValueError, KeyError, TypeError) as err:
        raise ServerError(f"the ops server's answer is not a profile record ({err!r})") from None
    return profile_id, {str(k): str(v) for k, v in files.items()}


def _cmd_profile(args: argparse.Namespace) -> int:
    kind, seconds = ("cpu", args.cpu) if args.cpu is not None else ("heap", args.heap)
    if args.rate is not None and (kind == "heap" or args.rate > 1000):
        raise UsageError("--rate applies to --cpu profiles and is 1 to 1000 samples per second "
                         f"(got {args.rate} with --{kind})")
    client = _Client(_base_url(args.url), args.token or os.environ.get(_TOKEN_ENV) or None)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {args.output!r} is not a folder; name a folder for the files")
    query = f"seconds={_seconds_text(seconds)}" + (f"&rate={args.rate}" if args.rate else "")
    if sys.stderr.isatty():
        print(f"pipekit: taking a {seconds:g} s {kind} profile of {client.base} ...",
              file=sys.stderr, flush=True)
    data = client.request(f"/debug/profile/{kind}?{query}", method="POST",
                          timeout=seconds + 120.0)
    profile_id, files = _profile_answer(data)
    out.mkdir(parents=True, exist_ok=True)
    for artifact, name in sorted(files.items()):
        if not _PROFILE_ID.fullmatch(artifact):
            continue
        body = client.request(f"/debug/profiles/{profile_id}/{artifact}", method="GET",
                              timeout=120.0)
        target = out / (name if _FILE_NAME.fullmatch(name) else f"{profile_id}-{artifact}")
        target.write_bytes(body)
        print(target, flush=True)
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------


def _setup_logging(level: str, fmt: str) -> None:
    """Give the ``pipekit`` logger a stderr handler (the command owns its process)."""
    logger = logging.getLogger("pipekit")
    for old in [h for h in logger.handlers if getattr(h, "_pipekit_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._pipekit_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False  # the command's handler is the one place pipekit logs go


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pipekit`` command; return its exit code.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.log_level, args.log_format)
    try:
        return int(args.handler(args))
    except (UsageError, ConfigError, MissingExtraError, PipelineStateError) as err:
        _fail(err)
        return EXIT_USAGE
    except (ServerError, PipekitError) as err:
        _fail(err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pipekit: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the exit flush
        return EXIT_FAILED


def _fail(err: BaseException) -> None:
    text = " ".join(str(err).split()) or type(err).__name__
    print(f"pipekit: error: {text}", file=sys.stderr)
