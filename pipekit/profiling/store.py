"""The profile store: where profiles live, what they are called, and how long they stay.

Layout (every name below is chosen by pipekit, never taken from a request)::

    <root>/                                  created 0o700 when missing
        <pipeline>/                          the pipeline name reduced to [A-Za-z0-9._-], 0o700
            20261203T162501Z-cpu-api.speedscope.json
            20261203T162501Z-cpu-api.svg
            20261203T162501Z-cpu-api.meta.json
            20261203T162533Z-heap-run.bin
            20261203T162533Z-heap-run.html
            20261203T162533Z-heap-run.summary.json
            20261203T162533Z-heap-run.meta.json
            report.html

A profile's id is its file stem (``<UTC time>-<kind>-<trigger>``, with ``-2``, ``-3``...
added when that name is taken). Ids match ``[A-Za-z0-9_-]{1,64}`` and are unique in the
store, so ``find(id)`` and ``artifact_path(id, artifact)`` need no pipeline name; both
check the id against that pattern and the artifact against a fixed table before touching
the file system, and return only regular files inside the store.

The metadata file is written when a profile starts (``"complete": false``) and again when
it ends, so a profile cut short by a crash is still listed. Retention runs after every
profile: the oldest profiles go first until at most ``retain_count`` remain and their files
total at most ``retain_mb``; profiles still running and the one just written are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pipekit.errors import ConfigError, ProfilerError

__all__ = [
    "ARTIFACTS",
    "KINDS",
    "ProfileRecord",
    "ProfileStore",
    "sanitize_name",
]

_log = logging.getLogger("pipekit.profiling")

#: Artifact name -> file suffix. The only file names a lookup can produce.
ARTIFACTS: Final[Mapping[str, str]] = {
    "speedscope": ".speedscope.json",
    "svg": ".svg",
    "bin": ".bin",
    "html": ".html",
    "summary": ".summary.json",
    "meta": ".meta.json",
}

#: Profile kinds and the artifacts each one writes (``meta`` for both).
KINDS: Final[Mapping[str, tuple[str, ...]]] = {
    "cpu": ("speedscope", "svg", "meta"),
    "heap": ("bin", "html", "summary", "meta"),
}

_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TRIGGER_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,15}")
_UNSAFE_RE: Final = re.compile(r"[^A-Za-z0-9._-]")
_DOTS_RE: Final = re.compile(r"\.{2,}")
_META_SUFFIX: Final = ARTIFACTS["meta"]
_MAX_NAME: Final = 64
_MIB: Final = 1024 * 1024


def sanitize_name(name: str) -> str:
    """Reduce a pipeline name to a safe folder name.

    Every character outside ``[A-Za-z0-9._-]`` becomes ``_``, runs of dots become ``_``,
    leading dots are dropped (no hidden folders), and the result is cut to 64 characters.
    The result never contains a path separator or ``..`` and is never empty.

    Args:
        name: the pipeline name as the user gave it.

    Returns:
        The folder name used under the store's root.
    """
    safe = _DOTS_RE.sub("_", _UNSAFE_RE.sub("_", name)).lstrip(".")[:_MAX_NAME]
    return safe or "_"


def valid_id(profile_id: object) -> bool:
    """Tell whether ``profile_id`` has the shape of a profile id (``[A-Za-z0-9_-]{1,64}``)."""
    return isinstance(profile_id, str) and _ID_RE.fullmatch(profile_id) is not None


def check_trigger(trigger: str) -> str:
    """Return ``trigger`` if it is a short lower-case word, else raise :class:`ConfigError`."""
    if not isinstance(trigger, str) or _TRIGGER_RE.fullmatch(trigger) is None:
        raise ConfigError(
            f"trigger must be a lower-case word of 1 to 16 letters, digits or '_' "
            f"(got {trigger!r}); use e.g. 'api', 'ops', 'signal' or 'run'"
        )
    return trigger


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileRecord:
    """One profile in the store.

    Attributes:
        id: the profile id (its file stem), e.g. ``20261203T162501Z-cpu-api``.
        pipeline: the pipeline name as given (its folder name is sanitised).
        kind: ``"cpu"`` or ``"heap"``.
        trigger: what asked for it: ``"api"``, ``"ops"``, ``"signal"``, ``"run"``...
        started_at: when sampling or tracking started (UTC).
        duration: seconds profiled, or ``None`` while the profile is running.
        files: artifact name -> path of each artifact that exists.
        metadata: the content of the metadata file.
    """

    id: str
    pipeline: str
    kind: str
    trigger: str
    started_at: datetime
    duration: float | None
    files: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when the profile finished and its files were written."""
        return bool(self.metadata.get("complete", False))

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-ready plain data (paths as strings)."""
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "kind": self.kind,
            "trigger": self.trigger,
            "started_at": self.started_at.isoformat(),
            "duration": self.duration,
            "files": {name: str(path) for name, path in self.files.items()},
            "metadata": self.metadata,
        }


class ProfileStore:
    """The folder that holds profiles, their metadata and run reports.

    Thread-safe. Several processes may share a folder; each names its files with
    exclusive creation so that none overwrites another's.

    Args:
        root: the folder (the ``profiling_dir`` setting); created 0o700 when missing.
        retain_count: keep at most this many profiles (``profiling_retain_count``).
        retain_mb: keep at most this many MiB of profile files (``profiling_retain_mb``).

    Raises:
        ConfigError: a retention limit is not a positive number.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "profiles",
        *,
        retain_count: int = 50,
        retain_mb: float = 500.0,
    ) -> None:
        if isinstance(retain_count, bool) or not isinstance(retain_count, int) or retain_count < 1:
            raise ConfigError(
                f"profiling_retain_count must be an integer >= 1 (got {retain_count!r})"
            )
        if (
            isinstance(retain_mb, bool)
            or not isinstance(retain_mb, int | float)
            or not math.isfinite(retain_mb)
            or retain_mb <= 0
        ):
            raise ConfigError(f"profiling_retain_mb must be a number > 0 (got {retain_mb!r})")
        self._root = Path(root).absolute()
        self._retain_count = retain_count
        self._retain_bytes = int(retain_mb * _MIB)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ProfileStore({str(self._root)!r}, retain_count={self._retain_count}, "
            f"retain_mb={self._retain_bytes / _MIB:g})"
        )

    @property
    def root(self) -> Path:
        """The store's folder (absolute)."""
        return self._root

    # -- folders -------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the folder if needed and prove that a file can be written in it.

        Call this when a pipeline starts so that a bad folder is reported then, not when
        the first profile is asked for.

        Raises:
            ProfilerError: the folder cannot be created or written; the message names it.
        """
        try:
            self._ensure_dir(self._root)
            fd, name = tempfile.mkstemp(prefix=".pipekit-write-check-", dir=self._root)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            raise self._unwritable(self._root, err) from err

    def pipeline_dir(self, pipeline: str) -> Path:
        """Return the folder of ``pipeline``'s profiles, creating it 0o700 when missing.

        Raises:
            ProfilerError: the folder cannot be created.
        """
        folder = self._root / sanitize_name(pipeline)
        try:
            self._ensure_dir(self._root)
            self._ensure_dir(folder)
        except OSError as err:
            raise self._unwritable(folder, err) from err
        return folder

    def report_path(self, pipeline: str) -> Path:
        """Return where the run report of ``pipeline`` goes (``<root>/<pipeline>/report.html``)."""
        return self.pipeline_dir(pipeline) / "report.html"

    # -- writing -------------------------------------------------------------------

    def create(
        self, *, pipeline: str, kind: str, trigger: str, started_at: datetime
    ) -> tuple[str, Path]:
        """Reserve a new profile id and write its first metadata file.

        Args:
            pipeline: the pipeline name.
            kind: ``"cpu"`` or ``"heap"``.
            trigger: a lower-case word saying what asked for the profile.
            started_at: the start time; its UTC form names the files.

        Returns:
            The id and the folder that holds the profile's files.

        Raises:
            ConfigError: ``kind`` or ``trigger`` is not valid.
            ProfilerError: the folder cannot be written.
        """
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {sorted(KINDS)} (got {kind!r})")
        check_trigger(trigger)
        folder = self.pipeline_dir(pipeline)
        stem = f"{started_at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{kind}-{trigger}"
        with self._lock:
            for n in range(1, 1000):
                profile_id = stem if n == 1 else f"{stem}-{n}"
                if self._locate(profile_id) is not None:
                    continue
                try:
                    fd = os.open(
                        folder / f"{profile_id}{_META_SUFFIX}",
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                        0o600,
                    )
                except FileExistsError:
                    continue
                except OSError as err:
                    raise self._unwritable(folder, err) from err
                os.close(fd)
                return profile_id, folder
        raise ProfilerError(f"no free profile id left for {stem!r}; remove old profiles")

    def path(self, folder: Path, profile_id: str, artifact: str) -> Path:
        """Return the path of ``artifact`` of profile ``profile_id`` inside ``folder``."""
        return folder / f"{profile_id}{ARTIFACTS[artifact]}"

    def write_metadata(self, folder: Path, profile_id: str, metadata: Mapping[str, Any]) -> Path:
        """Write a profile's metadata file atomically (0o600); values fall back to ``repr``.

        Raises:
            ProfilerError: the file cannot be written.
        """
        target = self.path(folder, profile_id, "meta")
        text = json.dumps(dict(metadata), indent=2, sort_keys=True, default=repr)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{profile_id}-", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as err:
            raise self._unwritable(folder, err) from err
        return target

    # -- reading -------------------------------------------------------------------

    def find(self, profile_id: str) -> ProfileRecord | None:
        """Return the profile with id ``profile_id``, or ``None`` (also for a malformed id)."""
        if not valid_id(profile_id):
            return None
        meta = self._locate(profile_id)
        return None if meta is None else self._load(meta)

    def artifact_path(self, profile_id: str, artifact: str) -> Path | None:
        """Return the file of one artifact of a profile, or ``None``.

        Args:
            profile_id: the profile id; anything not matching ``[A-Za-z0-9_-]{1,64}``
                gives ``None``.
            artifact: one of :data:`ARTIFACTS` (``speedscope``, ``svg``, ``bin``,
                ``html``, ``summary``, ``meta``); anything else gives ``None``.

        Returns:
            The path of an existing regular file inside the store, or ``None``.
        """
        if not valid_id(profile_id) or not isinstance(artifact, str) or artifact not in ARTIFACTS:
            return None
        meta = self._locate(profile_id)
        if meta is None:
            return None
        return self._inside(meta.parent / f"{profile_id}{ARTIFACTS[artifact]}")

    def records(self, pipeline: str | None = None) -> list[ProfileRecord]:
        """Return every profile in the store (or of one pipeline), oldest first."""
        folders = [self._root / sanitize_name(pipeline)] if pipeline is not None else None
        found = [self._load(meta) for meta in self._meta_files(folders)]
        return sorted(
            (r for r in found if r is not None), key=lambda r: (r.started_at, r.id)
        )

    # -- retention -----------------------------------------------------------------

    def enforce_retention(self, protect: Collection[str] = ()) -> list[str]:
        """Remove the oldest profiles until the count and size limits hold.

        Args:
            protect: ids never removed (profiles running now, the one just written).

        Returns:
            The ids removed, oldest first.
        """
        with self._lock:
            entries: list[tuple[datetime, str, list[Path], int]] = []
            for record in self.records():
                paths = [p for p in (record.files.get(a) for a in ARTIFACTS) if p is not None]
                size = sum(_size(p) for p in paths)
                entries.append((record.started_at, record.id, paths, size))
            count = len(entries)
            total = sum(e[3] for e in entries)
            removed: list[str] = []
            for _, profile_id, paths, size in entries:
                if count <= self._retain_count and total <= self._retain_bytes:
                    break
                if profile_id in protect:
                    continue
                for p in paths:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                count -= 1
                total -= size
                removed.append(profile_id)
        if removed:
            _log.info("profile retention removed %d profile(s): %s", len(removed), removed)
        return removed

    # -- internals -----------------------------------------------------------------

    def _ensure_dir(self, folder: Path) -> None:
        if folder.is_symlink():
            raise NotADirectoryError(f"{folder} is a symbolic link")
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            if not folder.is_dir():
                raise
            return
        # mkdir's mode is masked by the umask; make it owner-only regardless.
        folder.chmod(0o700)

    def _unwritable(self, folder: Path, err: OSError) -> ProfilerError:
        return ProfilerError(
            f"profile folder {str(folder)!r} is not writable ({type(err).__name__}: "
            f"{err.strerror or err}); make it a writable folder of this user or point the "
            f"profiling_dir setting (PIPEKIT_PROFILING_DIR) at one"
        )

    def _pipeline_folders(self) -> list[Path]:
        try:
            children = sorted(self._root.iterdir())
        except OSError:
            return []
        return [c for c in children if c.is_dir() and not c.is_symlink()]

    def _meta_files(self, folders: list[Path] | None) -> list[Path]:
        out: list[Path] = []
        for folder in self._pipeline_folders() if folders is None else folders:
            if folder.is_symlink() or not folder.is_dir():
                continue
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            for name in names:
                if name.endswith(_META_SUFFIX) and valid_id(name[: -len(_META_SUFFIX)]):
                    meta = self._inside(folder / name)
                    if meta is not None:
                        out.append(meta)
        return out

    def _locate(self, profile_id: str) -> Path | None:
        for folder in self._pipeline_folders():
            meta = self._inside(folder / f"{profile_id}{_META_SUFFIX}")
            if meta is not None:
                return meta
        return None

    def _inside(self, candidate: Path) -> Path | None:
        """Return ``candidate`` if it is a regular file (no symlink) inside the root."""
        try:
            if candidate.is_symlink() or not candidate.is_file():
                return None
            if not candidate.resolve().is_relative_to(self._root.resolve()):
                return None
        except OSError:
            return None
        return candidate

    def _load(self, meta: Path) -> ProfileRecord | None:
        profile_id = meta.name[: -len(_META_SUFFIX)]
        try:
            data = json.loads(meta.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        kind, trigger, started_at = _parse_id(profile_id)
        with contextlib.suppress(KeyError, ValueError):
            started_at = datetime.fromisoformat(str(data["started_at"])).astimezone(UTC)
        duration = data.get("duration")
        files: dict[str, Path] = {}
        for artifact, suffix in ARTIFACTS.items():
            path = self._inside(meta.parent / f"{profile_id}{suffix}")
            if path is not None:
                files[artifact] = path
        return ProfileRecord(
            id=profile_id,
            pipeline=str(data.get("pipeline", meta.parent.name)),
            kind=str(data.get("kind", kind)),
            trigger=str(data.get("trigger", trigger)),
            started_at=started_at,
            duration=float(duration) if isinstance(duration, int | float) else None,
            files=files,
            metadata=data,
        )


def _parse_id(profile_id: str) -> tuple[str, str, datetime]:
    """Read kind, trigger and start time back from an id (for a metadata file cut short)."""
    parts = profile_id.split("-")
    try:
        started = datetime.strptime(parts[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        started = datetime.fromtimestamp(0, UTC)
    kind = parts[1] if len(parts) > 1 else ""
    trigger = parts[2] if len(parts) > 2 else ""
    return kind, trigger, started


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
