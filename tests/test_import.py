"""``import pipekit`` stays light, and its public surface is exactly the pinned list."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pipekit

# Heavy or edge modules that `import pipekit` (and a run with every extra off) must not
# load: the OpenTelemetry SDK, psutil, memray, dask, an HTTP server, and pipekit's own
# edge modules.
HEAVY = (
    "opentelemetry.sdk",
    "psutil",
    "memray",
    "dask",
    "distributed",
    "http.server",
    "pipekit.ops",
    "pipekit.profiling",
    "pipekit.otel_setup",
    "pipekit.cli",
)

PUBLIC = [
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


def _modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return its sorted ``sys.modules``."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    modules: list[str] = json.loads(out.strip().splitlines()[-1])
    return modules


def _loaded(modules: list[str], name: str) -> list[str]:
    return [m for m in modules if m == name or m.startswith(name + ".")]


def test_import_pipekit_loads_no_heavy_module() -> None:
    modules = _modules_after("import pipekit")
    assert "pipekit" in modules
    loaded = {name: _loaded(modules, name) for name in HEAVY}
    assert not any(loaded.values()), {k: v for k, v in loaded.items() if v}


def test_a_run_with_every_extra_off_stays_light() -> None:
    modules = _modules_after("""
        import pipekit
        pipe = pipekit.Pipeline("light", telemetry=False, max_memory_mb=None)
        pipe.add_stage("a", lambda x: x + 1)
        assert pipe.run(range(10)).outputs == 10
    """)
    loaded = {name: _loaded(modules, name) for name in HEAVY}
    assert not any(loaded.values()), {k: v for k, v in loaded.items() if v}


def _isort_key(name: str) -> tuple[int, str]:
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_the_public_surface_is_exactly_the_pinned_list() -> None:
    assert pipekit.__all__ == PUBLIC
    # sorted the way ruff's RUF022 sorts: CONSTANTS, then Classes, then the rest
    assert sorted(pipekit.__all__, key=_isort_key) == pipekit.__all__
    for name in PUBLIC:
        assert getattr(pipekit, name) is not None, name


def test_every_public_object_has_a_docstring() -> None:
    for name in PUBLIC:
        obj = getattr(pipekit, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__doc__, f"pipekit.{name} has no docstring"


def test_the_exception_tree_matches_the_builtins() -> None:
    assert issubclass(pipekit.ConfigError, ValueError)
    assert issubclass(pipekit.PipelineClosedError, pipekit.PipelineStateError)
    assert issubclass(pipekit.PipelineStateError, RuntimeError)
    assert issubclass(pipekit.SubmitTimeoutError, TimeoutError)
    assert issubclass(pipekit.ItemTimeoutError, TimeoutError)
    assert issubclass(pipekit.NotPicklableError, TypeError)
    assert issubclass(pipekit.WorkerLostError, RuntimeError)
    assert issubclass(pipekit.MissingExtraError, ImportError)
    for name in PUBLIC:
        obj = getattr(pipekit, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, pipekit.PipekitError), name
