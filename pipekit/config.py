"""Settings of a pipekit run: one frozen :class:`Config`, loaded from four layers.

Each layer overrides the one before it::

    defaults  <  file  <  PIPEKIT_* environment variables  <  arguments

The file is ``path`` when given, else the file named by ``PIPEKIT_CONFIG``, else
``pipekit.toml`` in the working directory (settings as top-level keys), else the
``[tool.pipekit]`` table of ``pyproject.toml`` there. Text from files and the environment
is parsed here, and only here; direct construction (``Config(workers=4)``) and
:func:`dataclasses.replace` take Python values and check them strictly. Every bad value
raises :class:`~pipekit.errors.ConfigError` naming the setting, the value, where it came
from and the fix. ``ops_token`` is a secret: it never appears in ``repr()``,
:meth:`Config.describe` or an error message.

The settings are declared once, as the fields of :class:`Config` (type, default, rule
and help text together); :data:`SETTINGS` is the table built from them that the docs
and the ``pipekit config`` command read.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import signal
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipekit.errors import ConfigError

__all__ = ["CONFIG_ENV_VAR", "ENV_PREFIX", "PROFILE_KINDS", "SETTINGS", "Config", "Setting"]

_log = logging.getLogger("pipekit.config")

ENV_PREFIX = "PIPEKIT_"
"""Prefix of the environment variables that set a setting: ``PIPEKIT_<NAME>``."""

CONFIG_ENV_VAR = "PIPEKIT_CONFIG"
"""Environment variable naming the settings file to read instead of discovering one."""

PROFILE_KINDS = ("cpu", "heap")
"""The profile kinds ``profiling_kinds`` may name, in their canonical order."""

_FILE_NAME = "pipekit.toml"
_PYPROJECT_NAME = "pyproject.toml"
_META_KEY = "pipekit"
_NONE_WORDS = frozenset({"", "none", "off"})
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# "ms" must be tried before "s" and "m": "500ms" also ends with "s".
_DURATION_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
_UNUSABLE_SIGNALS = frozenset({"SIGKILL", "SIGSTOP", "SIGINT", "SIGTERM"})
_SHOWN_MAX = 60
_MASK = "***"
_PROFILE_DIR = Path("profiles")


class _RuleError(Exception):
    """A value broke a rule; optionally replaces the requirement or the fix of the message."""

    def __init__(self, requirement: str | None = None, fix: str | None = None) -> None:
        super().__init__(requirement)
        self.requirement = requirement
        self.fix = fix


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one setting's values are checked, parsed from text and described."""

    type_name: str
    requirement: str
    text_fix: str  # the fix when the value came from a file or the environment
    arg_fix: str  # the fix when the value came from Python code
    check: Callable[[object], object]  # Python value -> normalised value, or _RuleError
    parse: Callable[[str], object]  # text -> normalised value, or _RuleError


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _int_rule(
    minimum: int,
    maximum: int | None = None,
    *,
    optional: bool = False,
    zero_disables: bool = False,
    example: str = "4",
) -> _Rule:
    def check(value: object) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _RuleError
        if zero_disables and value == 0:
            return None
        if value < minimum or (maximum is not None and value > maximum):
            raise _RuleError
        return value

    def parse(text: str) -> int | None:
        word = text.strip().lower()
        if optional and word in _NONE_WORDS:
            return None
        try:
            number = int(word)
        except ValueError:
            raise _RuleError from None
        return check(number)

    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
    disable = ", or 0 or none to disable" if zero_disables else ", or none" if optional else ""
    return _Rule(
        type_name="int | None" if optional else "int",
        requirement=f"an integer {bounds}{disable}",
        text_fix=f"set it to a whole number such as {example}",
        arg_fix=f"pass an int such as {example}" + (" or None" if optional else ""),
        check=check,
        parse=parse,
    )


def _float_rule(
    minimum: float,
    maximum: float | None = None,
    *,
    open_min: bool = False,
    open_max: bool = False,
    seconds: bool = False,
    example: str = "30",
) -> _Rule:
    def check(value: object) -> float:
        if seconds and isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _RuleError
        try:
            number = float(value)
        except OverflowError:
            raise _RuleError from None
        too_low = number <= minimum if open_min else number < minimum
        too_high = maximum is not None and (number >= maximum if open_max else number > maximum)
        if not math.isfinite(number) or too_low or too_high:
            raise _RuleError
        return number

    def parse(text: str) -> float:
        word, scale = text.strip().lower(), 1.0
        if seconds:
            for suffix, factor in _DURATION_UNITS:
                if word.endswith(suffix):
                    word, scale = word[: -len(suffix)].strip(), factor
                    break
        try:
            number = float(word)
        except ValueError:
            raise _RuleError from None
        return check(number * scale)

    bounds = f"{'>' if open_min else '>='} {_num(minimum)}"
    if maximum is not None:
        bounds += f" and {'<' if open_max else '<='} {_num(maximum)}"
    if seconds:
        return _Rule(
            type_name="float (seconds)",
            requirement=f"a duration in seconds {bounds}",
            text_fix=f"set it to a number of seconds such as {example} "
            "or a duration such as '500ms', '30s' or '2m'",
            arg_fix=f"pass a number of seconds such as {example} or a datetime.timedelta",
            check=check,
            parse=parse,
        )
    return _Rule(
        type_name="float",
        requirement=f"a number {bounds}",
        text_fix=f"set it to a number such as {example}",
        arg_fix=f"pass a float such as {example}",
        check=check,
        parse=parse,
    )


def _bool_rule() -> _Rule:
    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise _RuleError
        return value

    def parse(text: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _RuleError

    return _Rule(
        type_name="bool",
        requirement="true or false",
        text_fix="set it to true or false (1/0, yes/no and on/off also work)",
        arg_fix="pass True or False",
        check=check,
        parse=parse,
    )


def _text_rule(
    *, optional: bool, type_name: str, requirement: str, text_fix: str, arg_fix: str
) -> _Rule:
    def check(value: object) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise _RuleError
        if any(c.isspace() or not c.isprintable() for c in value):
            raise _RuleError
        return value

    def parse(text: str) -> str | None:
        word = text.strip()
        if optional and word.lower() in _NONE_WORDS:
            return None
        return check(word)

    return _Rule(type_name, requirement, text_fix, arg_fix, check, parse)


def _path_rule() -> _Rule:
    def check(value: object) -> Path:
        try:
            text = os.fspath(value) if isinstance(value, os.PathLike) else value
        except TypeError:
            raise _RuleError from None
        if not isinstance(text, str) or not text.strip() or "\0" in text:
            raise _RuleError
        return Path(text)

    return _Rule(
        type_name="path",
        requirement="a directory path",
        text_fix="set it to a directory such as 'profiles' or '/var/lib/app/profiles'",
        arg_fix="pass a str or pathlib.Path such as Path('profiles')",
        check=check,
        parse=lambda text: check(text.strip()),
    )


def _kinds_rule() -> _Rule:
    def check(value: object) -> tuple[str, ...]:
        if not isinstance(value, tuple | list | set | frozenset):
            raise _RuleError
        kinds = set()
        for item in value:
            if not isinstance(item, str) or item.strip().lower() not in PROFILE_KINDS:
                raise _RuleError
            kinds.add(item.strip().lower())
        if not kinds:
            raise _RuleError
        return tuple(kind for kind in PROFILE_KINDS if kind in kinds)

    return _Rule(
        type_name="list of 'cpu', 'heap'",
        requirement="one or more of 'cpu' and 'heap'",
        text_fix="set it to 'cpu', 'heap' or 'cpu,heap'",
        arg_fix="pass a tuple such as ('cpu', 'heap')",
        check=check,
        parse=lambda text: check([part for part in text.split(",") if part.strip()]),
    )


def _signal_rule() -> _Rule:
    members = signal.Signals.__members__

    def check(value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _RuleError
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        member = members.get(name)
        if member is None:
            close = difflib.get_close_matches(name, list(members), n=1)
            raise _RuleError(fix=f"did you mean {close[0]!r}?") if close else _RuleError
        if member.name in _UNUSABLE_SIGNALS:
            raise _RuleError(
                requirement="a signal pipekit may take over, so not SIGKILL, SIGSTOP, SIGINT "
                "or SIGTERM",
                fix="use 'SIGUSR1' or 'SIGUSR2' (SIGKILL and SIGSTOP cannot be caught, "
                "and SIGINT and SIGTERM stop the run)",
            )
        return member.name

    def parse(text: str) -> str | None:
        return None if text.strip().lower() in _NONE_WORDS else check(text)

    return _Rule(
        type_name="signal name | None",
        requirement="the name of a signal such as 'SIGUSR1' or 'USR1', or none",
        text_fix="set it to a name such as 'SIGUSR1', or none to turn it off",
        arg_fix="pass a name such as 'SIGUSR1', or None",
        check=check,
        parse=parse,
    )


def _format(value: object) -> str:
    """Render a value in the syntax the environment variables accept."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _shown(value: object, secret: bool) -> str:
    """Render a bad value for an error message: masked when secret, truncated when long."""
    if secret:
        return repr(_MASK) if isinstance(value, str) else f"a {type(value).__name__}"
    try:
        text = repr(value)
    except Exception:  # a repr that raises must not hide the real error
        return f"a {type(value).__name__}"
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One setting: its name, type, default, environment variable and meaning.

    Attributes:
        name: the field name on :class:`Config` and the key in files.
        type_name: the type as documented, e.g. ``"int"`` or ``"float (seconds)"``.
        default: the default, rendered as text (``"os.cpu_count()"`` for ``workers``).
        help: one line saying what the setting does.
        secret: True for settings never shown (``ops_token``).
    """

    name: str
    type_name: str
    default: str
    help: str
    secret: bool = False
    _rule: _Rule = field(repr=False, compare=False)

    @property
    def env_var(self) -> str:
        """The environment variable that sets it, e.g. ``PIPEKIT_WORKERS``."""
        return ENV_PREFIX + self.name.upper()

    def parse(self, text: str, *, origin: str = "argument") -> Any:
        """Parse a value written as text, as in a file or an environment variable.

        Args:
            text: the text, e.g. ``"4"``, ``"30s"``, ``"cpu,heap"``, ``"none"``.
            origin: where the text came from, for the error message.

        Returns:
            The checked, normalised value.

        Raises:
            ConfigError: the text is not a valid value of this setting.
        """
        try:
            return self._rule.parse(text)
        except _RuleError as exc:
            raise self._error(text, origin, exc, text_fix=True) from None

    def check(self, value: object, *, origin: str = "argument") -> Any:
        """Check a Python value strictly (types and ranges), as ``Config(...)`` does.

        Args:
            value: the value, e.g. ``4`` or ``timedelta(seconds=30)``.
            origin: where the value came from, for the error message.

        Returns:
            The normalised value (ints as floats, timedeltas as seconds, kinds sorted).

        Raises:
            ConfigError: the value has the wrong type or is out of range.
        """
        return self._validate(value, origin, text_fix=False)

    def format(self, value: object) -> str:
        """Render a value of this setting as text, ``***`` for a secret that is set."""
        return _MASK if self.secret and value is not None else _format(value)

    def _validate(self, value: object, origin: str, *, text_fix: bool) -> Any:
        try:
            return self._rule.check(value)
        except _RuleError as exc:
            raise self._error(value, origin, exc, text_fix=text_fix) from None

    def _error(self, value: object, origin: str, exc: _RuleError, *, text_fix: bool) -> ConfigError:
        requirement = exc.requirement or self._rule.requirement
        fix = exc.fix or (self._rule.text_fix if text_fix else self._rule.arg_fix)
        shown = _shown(value, self.secret)
        return ConfigError(f"{self.name} must be {requirement} (got {shown} from {origin}); {fix}")


def _setting(
    rule: _Rule,
    doc: str,
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    shown_default: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare a :class:`Config` field together with its rule and help text."""
    meta = {_META_KEY: (rule, doc, shown_default, secret)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _cpu_count() -> int:
    return os.cpu_count() or 1


_seconds = _float_rule(0.0, open_min=True, seconds=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The settings of a pipeline run; immutable and safe to share between threads.

    Build one with :meth:`load` (defaults < file < environment < arguments) or directly
    (``Config(workers=4)``: Python values, checked strictly). Make variants with
    :func:`dataclasses.replace`, which checks again. :meth:`source_of` tells where a
    value came from. The fields are listed below and in :data:`SETTINGS`.

    Raises:
        ConfigError: a value has the wrong type or is out of range.
    """

    workers: int = _setting(
        _int_rule(1), "default worker count of a stage",
        factory=_cpu_count, shown_default="os.cpu_count()",
    )
    buffer_size: int = _setting(
        _int_rule(1, example="1000"), "capacity of each stage's input channel, in items", 1000
    )
    batch_size: int = _setting(
        _int_rule(1, example="100"), "largest micro-batch a stage hands to one worker", 100
    )
    batch_linger: float = _setting(
        _float_rule(0.0, 10.0, seconds=True, example="0.002"),
        "seconds a dispatcher waits for a micro-batch to fill", 0.002,
    )
    shutdown_timeout: float = _setting(
        _seconds, "seconds a run may take to drain at shutdown", 30.0
    )
    ordered: bool = _setting(
        _bool_rule(), "default for stages: emit outputs in input order", False
    )
    profiling_enabled: bool = _setting(
        _bool_rule(), "profile the whole run and write the profiles at shutdown", False
    )
    profiling_kinds: tuple[str, ...] = _setting(
        _kinds_rule(), "profiles to take: cpu (py-spy), heap (memray) or both", ("cpu",)
    )
    # Path is immutable; ruff cannot tell through the _setting() wrapper.
    profiling_dir: Path = _setting(  # noqa: RUF009
        _path_rule(), "directory where profiles are written", _PROFILE_DIR
    )
    profiling_rate: int = _setting(
        _int_rule(1, 1000, example="100"), "py-spy sampling rate, in samples per second", 100
    )
    profiling_max_seconds: float = _setting(
        _float_rule(0.0, open_min=True, seconds=True, example="300"),
        "longest on-demand profile, in seconds", 300.0,
    )
    profiling_retain_count: int = _setting(
        _int_rule(1, example="50"), "profiles kept before the oldest are deleted", 50
    )
    profiling_retain_mb: int = _setting(
        _int_rule(1, example="500"), "megabytes of profiles kept before the oldest are deleted",
        500,
    )
    profiling_signal: str | None = _setting(
        _signal_rule(), "signal that starts an on-demand CPU profile, e.g. SIGUSR1; none: off",
        None,
    )
    metrics_interval: float = _setting(
        _float_rule(0.0, open_min=True, seconds=True, example="10"),
        "seconds between resource samples", 10.0,
    )
    telemetry_enabled: bool = _setting(
        _bool_rule(), "record OpenTelemetry spans and metrics", True
    )
    ops_enabled: bool = _setting(_bool_rule(), "serve the ops HTTP endpoints", False)
    ops_host: str = _setting(
        _text_rule(
            optional=False, type_name="str",
            requirement="a host name or IP address without spaces",
            text_fix="set it to an address such as 127.0.0.1 (0.0.0.0 listens on every interface)",
            arg_fix="pass a str such as '127.0.0.1'",
        ),
        "address the ops server binds", "127.0.0.1",
    )
    ops_port: int = _setting(
        _int_rule(0, 65535, example="8080"), "port of the ops server; 0 picks a free port", 8080
    )
    ops_token: str | None = _setting(
        _text_rule(
            optional=True, type_name="str | None (secret)",
            requirement="a string of printable characters without spaces, or none",
            text_fix="set it to the bearer token that callers of the debug endpoints send",
            arg_fix="pass the token as a str, or None",
        ),
        "bearer token the debug endpoints require; never shown", None, secret=True,
    )
    liveness_timeout: float = _setting(
        _float_rule(0.0, open_min=True, seconds=True, example="60"),
        "seconds with work pending and nothing completing before /livez fails", 60.0,
    )
    max_memory_mb: int | None = _setting(
        _int_rule(1, optional=True, zero_disables=True, example="1024"),
        "resident memory in MB above which intake pauses; 0 or none: no limit", 1024,
    )
    memory_resume_ratio: float = _setting(
        _float_rule(0.0, 1.0, open_min=True, open_max=True, example="0.9"),
        "intake resumes below this fraction of max_memory_mb", 0.9,
    )
    max_cpu_percent: float = _setting(
        _float_rule(1.0, 100.0, example="80"),
        "process CPU, in percent of all available CPUs, above which the autoscaler adds no "
        "workers", 80.0,
    )
    max_open_files: int | None = _setting(
        _int_rule(1, optional=True, example="1000"),
        "soft limit on open files (RLIMIT_NOFILE) set at start; none: leave it", 1000,
    )
    autoscale_interval: float = _setting(
        _float_rule(0.0, open_min=True, seconds=True, example="1"),
        "seconds between autoscaler decisions", 1.0,
    )
    dask_address: str | None = _setting(
        _text_rule(
            optional=True, type_name="str | None",
            requirement="a scheduler address without spaces such as 'tcp://10.0.0.5:8786', "
            "or none",
            text_fix="set it to the scheduler address, or none to start a local cluster",
            arg_fix="pass the address as a str, or None",
        ),
        "scheduler address for executor='dask'; none: start a local cluster", None,
    )
    # Where each value came from, with the value it had then: {name: (source, value)}.
    # A value that no longer matches (changed by dataclasses.replace) counts as "argument".
    _sources: Mapping[str, tuple[str, Any]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        given = self._sources if isinstance(self._sources, Mapping) else {}
        resolved: dict[str, tuple[str, Any]] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            source = _source_for(setting.name, value, given.get(setting.name))
            checked = setting.check(value, origin=_origin(source))
            object.__setattr__(self, setting.name, checked)
            resolved[setting.name] = (source, checked)
        object.__setattr__(self, "_sources", resolved)

    def __repr__(self) -> str:
        parts = (
            f"{s.name}={_MASK!r}" if s.secret and getattr(self, s.name) is not None
            else f"{s.name}={getattr(self, s.name)!r}"
            for s in SETTINGS
        )
        return f"Config({', '.join(parts)})"

    @classmethod
    def load(
        cls,
        *,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> Config:
        """Build a config from defaults, a file, the environment and arguments.

        Args:
            path: the settings file; it must exist. When None, ``PIPEKIT_CONFIG`` names
                it, else ``pipekit.toml`` in ``cwd``, else ``[tool.pipekit]`` in
                ``pyproject.toml`` in ``cwd``, else there is none. A file called
                ``pyproject.toml`` is read from its ``[tool.pipekit]`` table, any other
                file from its top-level keys.
            env: the environment to read ``PIPEKIT_*`` variables from; ``os.environ``
                when None.
            cwd: the directory to look for files in and resolve relative paths against;
                the process's working directory when None.
            **overrides: settings as Python values, checked like ``Config(...)``; they
                win over every other layer. Pass only the ones you mean to set.

        Returns:
            The config, remembering where each value came from.

        Raises:
            ConfigError: a file is missing or malformed, a name is unknown (the message
                suggests the nearest valid one) or a value is invalid.
        """
        environ = os.environ if env is None else env
        base = Path.cwd() if cwd is None else Path(cwd)
        entries: list[tuple[str, Any, str]] = []
        located = _locate(path, environ, base)
        if located is not None:
            entries += _file_entries(*located)
        entries += _env_entries(environ)
        entries += _argument_entries(overrides)
        values = {name: value for name, value, _ in entries}
        sources = {name: (source, value) for name, value, source in entries}
        return cls(**values, _sources=sources)

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some settings changed, checked like ``Config(...)``.

        The same as :func:`dataclasses.replace`, except that an unknown name raises
        :class:`~pipekit.errors.ConfigError` suggesting the nearest setting instead of a
        ``TypeError``. Changed settings report ``"argument"`` from :meth:`source_of`.

        Raises:
            ConfigError: a name is unknown or a value is invalid.
        """
        for key in changes:
            if key not in _BY_NAME:
                raise _unknown(key, _BY_NAME, f"unknown setting {key!r} given as an argument")
        return dataclasses.replace(self, **changes)

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Return the names of every setting, in declaration order."""
        return tuple(s.name for s in SETTINGS)

    def source_of(self, name: str) -> str:
        """Return where the value of setting ``name`` came from.

        Returns:
            ``"default"``, ``"file <path>"``, ``"environment PIPEKIT_<NAME>"`` or
            ``"argument"`` (passed to :meth:`load`, ``Config(...)`` or changed by
            :func:`dataclasses.replace`).

        Raises:
            ConfigError: there is no setting called ``name``.
        """
        record = self._sources.get(name)
        if record is None:
            raise _unknown(name, _BY_NAME, f"unknown setting {name!r}")
        return record[0]

    def describe(self) -> list[tuple[str, str, str]]:
        """Return one ``(name, value, source)`` row per setting, the token masked.

        Values are written in the syntax ``PIPEKIT_*`` variables accept, so every row but
        the token's can be pasted back into the environment.
        """
        return [
            (s.name, s.format(getattr(self, s.name)), self._sources[s.name][0])
            for s in SETTINGS
        ]


def _source_for(name: str, value: object, record: object) -> str:
    """Keep the recorded source while the value is unchanged; otherwise default or argument."""
    if (
        isinstance(record, tuple)
        and len(record) == 2
        and isinstance(record[0], str)
        and type(record[1]) is type(value)
        and record[1] == value
    ):
        return record[0]
    default = _DEFAULTS[name]()
    if type(default) is type(value) and default == value:
        return "default"
    return "argument"


def _origin(source: str) -> str:
    """Turn a source as :meth:`Config.source_of` gives it into words for an error message."""
    if source.startswith("environment "):
        return "environment variable " + source.removeprefix("environment ")
    if source.startswith("file "):
        path = source.removeprefix("file ")
        return path + " [tool.pipekit]" if Path(path).name == _PYPROJECT_NAME else path
    return source


def _unknown(word: str, known: Iterable[str], message: str, *, env: bool = False) -> ConfigError:
    """Build the error for an unknown name, suggesting the nearest valid one."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if close:
        return ConfigError(f"{message}; did you mean {close[0] if env else repr(close[0])}?")
    valid = ", ".join(s.name for s in SETTINGS)
    if env:
        return ConfigError(f"{message}; remove it, or name a setting as {ENV_PREFIX}<SETTING> "
                           f"with one of: {valid}")
    return ConfigError(f"{message}; remove it or use one of the settings: {valid}")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # an over-long name, a NUL byte
        return False


def _locate(
    path: object, environ: Mapping[str, str], base: Path
) -> tuple[Path, bool] | None:
    """Find the settings file: returns it and whether it was named explicitly."""
    if path is not None:
        text = os.fspath(path) if isinstance(path, str | os.PathLike) else None
        if not isinstance(text, str):
            raise ConfigError(
                f"path must be a str or os.PathLike (got a {type(path).__name__}); "
                "pass the settings file's path"
            )
        return _must_exist(base / text, "given as the path argument", "fix the path"), True
    named = environ.get(CONFIG_ENV_VAR, "").strip()
    if named:
        how = f"named by environment variable {CONFIG_ENV_VAR}"
        return _must_exist(base / named, how, f"fix {CONFIG_ENV_VAR} or unset it"), True
    local, pyproject = base / _FILE_NAME, base / _PYPROJECT_NAME
    if _is_file(local):
        if _is_file(pyproject) and _has_tool_table(pyproject):
            _log.warning("reading settings from %s; [tool.pipekit] in %s is ignored",
                         local, pyproject)
        return local, False
    return (pyproject, False) if _is_file(pyproject) else None


def _must_exist(candidate: Path, how: str, fix: str) -> Path:
    if not _is_file(candidate):
        raise ConfigError(
            f"settings file {str(candidate)!r} ({how}) does not exist or is not a file; {fix}"
        )
    return candidate


def _has_tool_table(pyproject: Path) -> bool:
    try:
        return _tool_table(_read_toml(pyproject), pyproject) is not None
    except ConfigError:
        return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read settings file {str(path)!r} ({err.strerror or err}); "
            "check that it is a readable file"
        ) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"settings file {str(path)!r} is not valid utf-8 text; save it as utf-8"
        ) from None
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as err:
        detail = str(err) or type(err).__name__
        raise ConfigError(
            f"settings file {str(path)!r} is not valid toml: {detail[:1].lower()}{detail[1:]}; "
            "fix the toml syntax"
        ) from err


def _tool_table(doc: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    tool = doc.get("tool")
    table = tool.get("pipekit") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(
            f"tool.pipekit in {str(path)!r} must be a table (got a {type(table).__name__}); "
            "put the settings under a [tool.pipekit] header"
        )
    return table


def _file_entries(path: Path, explicit: bool) -> list[tuple[str, Any, str]]:
    """Read the settings of a file as ``(name, value, source)`` entries."""
    doc = _read_toml(path)
    if path.name == _PYPROJECT_NAME:
        table = _tool_table(doc, path)
        if table is None:
            if explicit:
                raise ConfigError(
                    f"settings file {str(path)!r} has no [tool.pipekit] table; "
                    "put the settings under a [tool.pipekit] header"
                )
            return []
        where = f"{path} [tool.pipekit]"
    else:
        table, where = doc, str(path)
    entries = []
    for key, raw in table.items():
        setting = _BY_NAME.get(key)
        if setting is None:
            raise _unknown_file_key(key, raw, where, pyproject=path.name == _PYPROJECT_NAME)
        if isinstance(raw, str):
            value = setting.parse(raw, origin=where)
        else:
            value = setting._validate(raw, where, text_fix=True)
        entries.append((key, value, f"file {path}"))
    return entries


def _unknown_file_key(key: str, raw: object, where: str, *, pyproject: bool) -> ConfigError:
    message = f"unknown setting {_shown(key, secret=False)} in {where}"
    if not pyproject and key in ("pipekit", "tool") and isinstance(raw, dict):
        header = "[pipekit]" if key == "pipekit" else "[tool.pipekit]"
        return ConfigError(
            f"{message}; {_FILE_NAME} takes settings as top-level keys, "
            f"so move them out of the {header} table"
        )
    return _unknown(key, _BY_NAME, message)


def _env_entries(environ: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    """Read the ``PIPEKIT_*`` variables as ``(name, value, source)`` entries."""
    entries = []
    for key in sorted(k for k in environ if k.startswith(ENV_PREFIX) and k != CONFIG_ENV_VAR):
        setting = _BY_ENV_VAR.get(key)
        if setting is None:
            known = [*_BY_ENV_VAR, CONFIG_ENV_VAR]
            raise _unknown(key, known, f"unknown environment variable {key}", env=True)
        value = setting.parse(environ[key], origin=f"environment variable {key}")
        entries.append((setting.name, value, f"environment {key}"))
    return entries


def _argument_entries(overrides: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """Check the arguments given to :meth:`Config.load` as ``(name, value, source)``."""
    entries = []
    for key, raw in overrides.items():
        setting = _BY_NAME.get(key)
        if setting is None:
            raise _unknown(key, _BY_NAME, f"unknown setting {key!r} given as an argument")
        entries.append((key, setting.check(raw, origin="argument"), "argument"))
    return entries


def _build_settings() -> tuple[tuple[Setting, ...], dict[str, Callable[[], Any]]]:
    settings, defaults = [], {}
    for f in dataclasses.fields(Config):
        if _META_KEY not in f.metadata:
            continue
        rule, doc, shown_default, secret = f.metadata[_META_KEY]
        if f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory
        else:
            defaults[f.name] = lambda value=f.default: value
        default_text = shown_default or _format(defaults[f.name]())
        settings.append(Setting(name=f.name, type_name=rule.type_name, default=default_text,
                                help=doc, secret=secret, _rule=rule))
    return tuple(settings), defaults


_TABLE = _build_settings()
SETTINGS: tuple[Setting, ...] = _TABLE[0]
"""Every setting, in declaration order: the table the docs and ``pipekit config`` show."""
_DEFAULTS = _TABLE[1]

_BY_NAME = {s.name: s for s in SETTINGS}
_BY_ENV_VAR = {s.env_var: s for s in SETTINGS}

Config.__doc__ = (Config.__doc__ or "") + "\n    Attributes:\n" + "".join(
    f"        {s.name}: {s.help} (default {s.default}).\n" for s in SETTINGS
)
