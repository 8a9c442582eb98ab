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
    if cfg.max_memory_mb or run.pipeline.telemetry:
        from pipekit import resources

        gate = resources.MemoryGate.from_megabytes(cfg.max_memory_mb or None,
                                                   cfg.memory_resume_ratio)
        interval = cfg.metrics_interval
        if cfg.max_memory_mb:
            interval = min(interval, 1.0)  # a memory limit needs a quick eye
        monitor = resources.ResourceMonitor(resources.ResourceSampler(), gate, interval,
                                            cpu_limit_percent=cfg.max_cpu_percent)
        ext["monitor"] = monitor
        if cfg.max_memory_mb:
            run._gate = gate
            gate.on_change(lambda paused, reason: _on_gate(run, paused, reason))
        tel = ext.get("telemetry")
        if tel is not None:
            limits: dict[str, float] = {"cpu": cfg.max_cpu_percent / 100.0}
            if cfg.max_memory_mb:
                limits["memory"] = float(cfg.max_memory_mb) * 1024 * 1024
            tel.watch_resources(monitor, gate, limits)
    if cfg.max_open_files and cfg.source_of("max_open_files") != "default":
        # Process-wide state: changed only when the operator asked for it.
        from pipekit import resources

        ext["rlimit"] = resources.apply_open_files_limit(cfg.max_open_files)


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


def after_stop(run: Run) -> None:
    """After stages stopped and hooks ran: stop monitors, restore process limits."""
    monitor = run._ext.get("monitor")
    if monitor is not None:
        monitor.stop(2.0)
    if "rlimit" in run._ext:
        from pipekit import resources

        resources.restore_open_files_limit(run._ext.pop("rlimit"))


def stats_extra(run: Run, stages: tuple[StageStats, ...]) -> dict[str, Any]:
    """Extra fields of ``PipelineStats`` (bottleneck, last decisions)."""
    return {}


def scale_events(run: Run) -> tuple[ScaleEvent, ...]:
    """Every autoscaler decision of the run."""
    return ()


def profiles(run: Run) -> tuple[str, ...]:
    """Paths of the profiles written for the run."""
    return ()
