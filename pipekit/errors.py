"""Exceptions raised by pipekit.

Every exception pipekit raises derives from :class:`PipekitError`, and also from the
builtin that matches its meaning, so ``except ValueError`` keeps working::

    PipekitError
    ├── ConfigError (ValueError)            a setting or argument is invalid
    ├── MissingExtraError (ImportError)     an optional package is not installed
    ├── PipelineStateError (RuntimeError)   the call does not fit the pipeline's state
    │   └── PipelineClosedError             intake is closed (shutting down or stopped)
    ├── SubmitTimeoutError (TimeoutError)   submit() waited longer than its timeout
    ├── QueueFullError                      submit_nowait() found the first channel full
    ├── NotPicklableError (TypeError)       a process stage got something it cannot pickle
    ├── ItemTimeoutError (TimeoutError)     one call of a stage function ran too long
    ├── WorkerLostError (RuntimeError)      a worker process died while running a batch
    └── ProfilerError (RuntimeError)        a profile could not be taken
        └── ProfilerBusyError               another profile of that kind is running

Messages are one lower-case sentence that names the bad value and the fix.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ItemTimeoutError",
    "MissingExtraError",
    "NotPicklableError",
    "PipekitError",
    "PipelineClosedError",
    "PipelineStateError",
    "ProfilerBusyError",
    "ProfilerError",
    "QueueFullError",
    "SubmitTimeoutError",
    "WorkerLostError",
]


class PipekitError(Exception):
    """Base class of every exception raised by pipekit."""


class ConfigError(PipekitError, ValueError):
    """A setting or argument is invalid; the message names it, its value and the fix."""


class MissingExtraError(PipekitError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs the optional package {package!r}; "
            f"install it with: pip install 'pipekit[{extra}]'"
        )
        self.extra = extra
        self.package = package


class PipelineStateError(PipekitError, RuntimeError):
    """The call does not fit the pipeline's current state."""


class PipelineClosedError(PipelineStateError):
    """Intake is closed: the run is shutting down or has stopped."""


class SubmitTimeoutError(PipekitError, TimeoutError):
    """``submit(item, timeout=...)`` could not enqueue the item in time."""


class QueueFullError(PipekitError):
    """``submit_nowait(item)`` found the first stage's channel full."""


class NotPicklableError(PipekitError, TypeError):
    """A process or cluster stage was given a function or item that cannot be pickled."""


class ItemTimeoutError(PipekitError, TimeoutError):
    """One call of a stage function ran longer than the stage's ``timeout``."""


class WorkerLostError(PipekitError, RuntimeError):
    """A worker process died (or a cluster worker was lost) while running a batch."""


class ProfilerError(PipekitError, RuntimeError):
    """A profile could not be started or written; the message names the cause and fix."""


class ProfilerBusyError(ProfilerError):
    """A profile of the same kind is already running; only one runs at a time."""


def missing_extra(feature: str, extra: str, package: str, err: ImportError) -> MissingExtraError:
    """Build the error for a missing optional package, chained to the import error."""
    exc = MissingExtraError(feature, extra, package)
    exc.__cause__ = err
    return exc
