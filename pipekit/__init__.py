"""pipekit: concurrent multi-stage pipelines you can watch, profile and scale.

The public surface is re-exported here; implementation modules are private.
"""

from __future__ import annotations

from pipekit.errors import (
    ConfigError,
    ItemTimeoutError,
    MissingExtraError,
    NotPicklableError,
    PipekitError,
    PipelineClosedError,
    PipelineStateError,
    ProfilerBusyError,
    ProfilerError,
    QueueFullError,
    SubmitTimeoutError,
    WorkerLostError,
)
from pipekit.stats import (
    DeadLetter,
    LatencySummary,
    PipelineStats,
    RunReport,
    ScaleEvent,
    StageStats,
    Unprocessed,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeadLetter",
    "ItemTimeoutError",
    "LatencySummary",
    "MissingExtraError",
    "NotPicklableError",
    "PipekitError",
    "PipelineClosedError",
    "PipelineStateError",
    "PipelineStats",
    "ProfilerBusyError",
    "ProfilerError",
    "QueueFullError",
    "RunReport",
    "ScaleEvent",
    "StageStats",
    "SubmitTimeoutError",
    "Unprocessed",
    "WorkerLostError",
    "__version__",
]
