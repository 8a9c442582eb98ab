"""Where the optional parts of a run plug in: telemetry, resource limits, the ops
server, profiling and the autoscaler.

The core (``pipeline``) calls these hooks at fixed points of a run's life; each hook
imports its feature only when the run's settings ask for it, so ``import pipekit``
and a run with everything off stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipekit.pipeline import Run
    from pipekit.stats import ScaleEvent, StageStats


def before_start(run: Run) -> None:
    """Before stage runners exist: set the run's capture/enter/observer/gate hooks."""


def after_start(run: Run) -> None:
    """Once stages run: start monitors, the ops server, the autoscaler, run profiles."""


def before_drain(run: Run) -> None:
    """When shutdown begins (readiness already reports draining)."""


def after_stop(run: Run) -> None:
    """After stages stopped and hooks ran: stop monitors and servers, write profiles."""


def stats_extra(run: Run, stages: tuple[StageStats, ...]) -> dict[str, Any]:
    """Extra fields of ``PipelineStats`` (bottleneck, last decisions)."""
    return {}


def scale_events(run: Run) -> tuple[ScaleEvent, ...]:
    """Every autoscaler decision of the run."""
    return ()


def profiles(run: Run) -> tuple[str, ...]:
    """Paths of the profiles written for the run."""
    return ()
