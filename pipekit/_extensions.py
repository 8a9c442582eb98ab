"""Where the optional parts of a run plug in: telemetry, resource limits, the ops
server, profiling and the autoscaler.

The core (``pipeline``) calls these hooks at fixed points of a run's life; each hook
imports its feature only when the run's settings ask for it, so ``import pipekit``
and a run with everything off stay light. Each feature's live object is kept on the
run's ``_ext`` dict under its name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipekit.pipeline import Run
    from pipekit.stats import DeadLetter, ScaleEvent, StageStats

log = logging.getLogger("pipekit.pipeline")


def before_start(run: Run) -> None:
    """Before stage runners exist: telemetry hooks and the memory gate."""
    cfg = run._cfg
    ext = run._ext
    if run.pipeline.telemetry:
        from pipekit import telemetry

        tel = telemetry.Telemetry(run, tracer_provider=run.pipeline.tracer_provider,
                                  meter_provider=run.pipeline.meter_provider)
        ext["telemetry"] = tel
        run._first_capture = telemetry.capture
        run._enter_factory = tel.enter_for
        run._wire = (telemetry.to_wire, telemetry.from_wire)
        run._observer = tel
        run._dead_hooks.append(tel.on_dead)
    autoscaled = any(s.autoscale is not None for s in run.pipeline._specs)
    if cfg.max_memory_mb or run.pipeline.telemetry or autoscaled:
        from pipekit import resources

        gate = resources.MemoryGate.from_megabytes(cfg.max_memory_mb or None,
                                                   cfg.memory_resume_ratio)
        interval = cfg.metrics_interval
        if cfg.max_memory_mb or any(s.autoscale is not None for s in run.pipeline._specs):
            # a memory limit, and the autoscaler's CPU guard, need a quick eye
            interval = min(interval, 1.0)
        monitor = resources.ResourceMonitor(resources.ResourceSampler(), gate, interval,
                                            )
        ext["monitor"] = monitor
        if cfg.max_memory_mb:
            run._gate = gate
            gate.on_change(lambda paused, reason: _on_gate(run, paused, reason))
        watcher = ext.get("telemetry")
        if watcher is not None:
            limits: dict[str, float] = {"cpu": cfg.max_cpu_percent / 100.0}
            if cfg.max_memory_mb:
                limits["memory"] = float(cfg.max_memory_mb) * 1024 * 1024
            watcher.watch_resources(monitor, gate, limits)
    if cfg.profiling_enabled or cfg.ops_enabled or cfg.profiling_signal:
        profiler(run)  # an unwritable profile folder is reported now, not at shutdown
    if cfg.max_open_files and cfg.source_of("max_open_files") != "default":
        # Process-wide state: changed only when the operator asked for it.
        from pipekit import resources

        ext["rlimit"] = resources.apply_open_files_limit(cfg.max_open_files)


def profiler(run: Run) -> Any:
    """The run's profiler, created on first use (checks the profile folder)."""
    prof = run._ext.get("profiler")
    if prof is None:
        from pipekit.profiling import Profiler, ProfileStore

        cfg = run._cfg
        store = ProfileStore(cfg.profiling_dir, retain_count=cfg.profiling_retain_count,
                             retain_mb=cfg.profiling_retain_mb)
        store.check_writable()
        prof = Profiler(store, pipeline=run.name, rate=cfg.profiling_rate,
                        max_seconds=cfg.profiling_max_seconds,
                        stats_provider=lambda: [_stage_dict(s) for s in run.stats().stages])
        run._ext["profiler"] = prof
    return prof


def _stage_dict(s: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(s)


def _start_profiles(run: Run) -> None:
    cfg = run._cfg
    if cfg.profiling_enabled:
        try:
            profiler(run).start_run_profiles(cfg.profiling_kinds)
        except Exception as exc:  # the pipeline keeps running without them
            run._ext["profile_error"] = str(exc)
            log.error("whole-run profiling could not start: %s", exc,
                      extra={"pipekit": {"event": "profiling_failed", "pipeline": run.name}})
    if cfg.profiling_signal:
        _install_profile_signal(run, cfg.profiling_signal)


#: How long a profile asked for by signal runs (bounded by profiling_max_seconds).
SIGNAL_PROFILE_SECONDS = 30.0


def _install_profile_signal(run: Run, name: str) -> None:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        log.warning("profiling_signal=%s ignored: signals can only be handled from the main "
                    "thread; start the pipeline from the main thread", name)
        return
    sig = getattr(signal, name)
    seconds = min(SIGNAL_PROFILE_SECONDS, run._cfg.profiling_max_seconds)

    def on_signal(signum: int, frame: Any) -> None:
        profiler(run).spawn("cpu", seconds, trigger="signal")

    run._ext["profile_signal"] = (sig, signal.signal(sig, on_signal))


def _stop_profiles(run: Run, timeout: float) -> None:
    prev = run._ext.pop("profile_signal", None)
    if prev is not None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(prev[0], prev[1])
    prof = run._ext.get("profiler")
    if prof is not None:
        try:
            prof.close(timeout=max(1.0, timeout))
        except Exception as exc:
            log.error("profiles could not be finished: %s", exc)


def after_report(run: Run, report: Any) -> None:
    """Write the run report (report.html) next to the profiles, when profiling is on."""
    prof = run._ext.get("profiler")
    if prof is None or not run._cfg.profiling_enabled:
        return
    from pipekit.profiling import write_report

    try:
        data = report.to_dict()
        st = run.stats()
        if st.bottleneck:
            data["bottleneck"] = {"stage": st.bottleneck, "reason": st.bottleneck_reason}
        write_report(prof.store.report_path(run.name), data, prof.records())
    except Exception as exc:
        log.error("run report could not be written: %s", exc)


def _on_gate(run: Run, paused: bool, reason: str) -> None:
    log.log(logging.WARNING if paused else logging.INFO,
            "intake %s: %s", "paused" if paused else "resumed", reason,
            extra={"pipekit": {"event": "intake_paused" if paused else "intake_resumed",
                               "pipeline": run.name, "reason": reason}})


def after_start(run: Run) -> None:
    """Once stages run: start the resource monitor (and later features)."""
    monitor = run._ext.get("monitor")
    if monitor is not None:
        monitor.start()
    _start_profiles(run)
    _start_autoscaler(run)
    if run._cfg.ops_enabled:
        _start_ops(run)


def _start_autoscaler(run: Run) -> None:
    """Scale the stages declared with a (min, max) range; name the bottleneck."""
    specs = run.pipeline._specs
    policies = {s.name: s.autoscale for s in specs if s.autoscale is not None}
    if not policies and not run.pipeline.telemetry:
        return
    from pipekit.autoscale import AutoscaleController

    runners = {r.name: r for r in run._runners}
    monitor = run._ext.get("monitor")
    gate = run._gate
    tel = run._ext.get("telemetry")
    ctl = AutoscaleController(
        policies, sample=lambda: _samples(run), apply=lambda name, n: runners[name].set_workers(n),
        pipeline=run.name, interval=run._cfg.autoscale_interval,
        # percent of all available CPUs, the unit of max_cpu_percent
        cpu_percent=(lambda: monitor.latest.cpu_utilization * 100 if monitor.latest else None)
        if monitor is not None else None,
        intake_paused=(lambda: bool(gate.paused)) if gate is not None else None,
        max_cpu_percent=run._cfg.max_cpu_percent,
        on_decision=tel.on_decision if tel is not None else None,
    )
    run._ext["autoscaler"] = ctl
    ctl.start()


def _samples(run: Run) -> list[Any]:
    from pipekit.autoscale import StageSample

    out = []
    runners = run._runners
    for i, r in enumerate(runners):
        nxt = run._inboxes[i + 1] if i + 1 < len(runners) else run._out
        out.append(StageSample(
            stage=r.name, now=run._clock(), received=r.inbox.statistics().put_total,
            completed=r.succeeded + r.failed, busy_seconds=r.busy_seconds,
            queue_depth=r.inbox.depth, queue_capacity=r.inbox.capacity,
            in_flight=max(0, r._in_flight_items), workers=r.workers,
            downstream_full=nxt.full))
    return out


def _start_ops(run: Run) -> None:
    from pipekit._ops_backend import RunBackend
    from pipekit.ops import OpsServer

    cfg = run._cfg
    server = OpsServer(RunBackend(run, liveness_timeout=cfg.liveness_timeout),
                       host=cfg.ops_host, port=cfg.ops_port, token=cfg.ops_token,
                       max_profile_seconds=cfg.profiling_max_seconds)
    server.start()
    run._ext["ops"] = server
    run.ops_url = server.url
    log.info("ops server listening on %s", server.url,
             extra={"pipekit": {"event": "ops_started", "pipeline": run.name,
                                "url": server.url}})


def on_dead(run: Run, letter: DeadLetter) -> None:
    """Each dead letter, for telemetry."""
    for hook in run._dead_hooks:
        try:
            hook(letter)
        except Exception:  # telemetry never breaks the pipeline
            log.debug("dead-letter hook failed", exc_info=True)


def before_drain(run: Run) -> None:
    """When shutdown begins: wake producers held by the memory gate."""
    gate = run._gate
    if gate is not None:
        gate.close()


def after_stop(run: Run, time_left: float = 30.0) -> None:
    """After stages stopped and hooks ran: finish profiles, stop monitors, restore limits."""
    ctl = run._ext.get("autoscaler")
    if ctl is not None:
        ctl.stop(2.0)
    tel = run._ext.get("telemetry")
    if tel is not None:
        tel.close(min(2.0, max(0.1, time_left)))
    _stop_profiles(run, time_left)
    server = run._ext.pop("ops", None)
    if server is not None:
        server.stop(2.0)
    monitor = run._ext.get("monitor")
    if monitor is not None:
        monitor.stop(2.0)
    if "rlimit" in run._ext:
        from pipekit import resources

        resources.restore_open_files_limit(run._ext.pop("rlimit"))


def stats_extra(run: Run, stages: tuple[StageStats, ...]) -> dict[str, Any]:
    """Extra fields of ``PipelineStats`` (bottleneck, last decisions)."""
    ctl = run._ext.get("autoscaler")
    if ctl is None:
        return {}
    b = ctl.bottleneck()
    return {"bottleneck": b.stage, "bottleneck_reason": b.reason,
            "bottleneck_gain": b.estimate, "last_decisions": tuple(ctl.events())[-20:]}


def scale_events(run: Run) -> tuple[ScaleEvent, ...]:
    """Every autoscaler decision of the run that changed a worker count."""
    ctl = run._ext.get("autoscaler")
    return tuple(ctl.changes()) if ctl is not None else ()


def profiles(run: Run) -> tuple[str, ...]:
    """Paths of the profiles written for the run (and its report.html, when written)."""
    prof = run._ext.get("profiler")
    if prof is None:
        return ()
    paths = [str(p) for r in prof.records() for p in r.files.values()]
    if run._cfg.profiling_enabled:
        paths.append(str(prof.store.report_path(run.name)))
    return tuple(paths)
