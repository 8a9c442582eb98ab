"""pipekit: concurrent multi-stage pipelines you can watch, profile and scale.

The public surface is re-exported here; implementation modules are private.
"""

from __future__ import annotations

from pipekit._work import DROP
from pipekit.config import Config
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
from pipekit.pipeline import Pipeline, Run
from pipekit.retry import Retry
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

import logging as _logging

# A library only ever adds a NullHandler; the application decides where logs go.
_logging.getLogger("pipekit").addHandler(_logging.NullHandler())
del _logging

__all__ = [
    "DROP",
    "Config",
    "ConfigError",
    "DeadLetter",
    "ItemTimeoutError",
    "LatencySummary",
    "MissingExtraError",
    "NotPicklableError",
    "PipekitError",
    "Pipeline",
    "PipelineClosedError",
    "PipelineStateError",
    "PipelineStats",
    "ProfilerBusyError",
    "ProfilerError",
    "QueueFullError",
    "Retry",
    "Run",
    "RunReport",
    "ScaleEvent",
    "StageStats",
    "SubmitTimeoutError",
    "Unprocessed",
    "WorkerLostError",
    "__version__",
]
