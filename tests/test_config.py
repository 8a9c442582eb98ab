"""Tests for pipekit.config: layers, precedence, parsing, errors and secret masking."""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
import pickle
import string
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipekit.config import CONFIG_ENV_VAR, PROFILE_KINDS, SETTINGS, Config, Setting
from pipekit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
NAMES = [s.name for s in SETTINGS]
BY_NAME = {s.name: s for s in SETTINGS}
TOKEN = "tok-Zq8vW2nKp4LxR7sT"
FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(value)


def toml_doc(table: dict[str, Any], header: str | None = None) -> str:
    lines = [f"[{header}]"] if header else []
    lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load(cwd: Path, env: dict[str, str] | None = None, **kwargs: Any) -> Config:
    return Config.load(env=env or {}, cwd=cwd, **kwargs)


def full_error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# One invalid value per setting: as text (environment, or a string in a file) and as a
# Python / TOML value (an argument, or a non-string value in a file).
BAD: dict[str, tuple[str, Any]] = {
    "workers": ("zero", 0),
    "buffer_size": ("-1", 0),
    "batch_size": ("1.5", 1.5),
    "batch_linger": ("11s", 10.5),
    "shutdown_timeout": ("0", 0),
    "ordered": ("maybe", 1),
    "profiling_enabled": ("2", 0),
    "profiling_kinds": ("cpu,gpu", ["gpu"]),
    "profiling_dir": ("", 5),
    "profiling_rate": ("1001", 0),
    "profiling_max_seconds": ("-1s", -1.0),
    "profiling_retain_count": ("0", 0),
    "profiling_retain_mb": ("lots", 0),
    "profiling_signal": ("SIGNOPE", 10),
    "metrics_interval": ("0ms", 0.0),
    "telemetry_enabled": ("enabled", 1),
    "ops_enabled": ("nope", 0),
    "ops_host": ("local host", 8080),
    "ops_port": ("65536", 70000),
    "ops_token": (TOKEN + " x", 12345),
    "liveness_timeout": ("soon", -5),
    "max_memory_mb": ("1GB", -1),
    "memory_resume_ratio": ("1", 1.0),
    "max_cpu_percent": ("0.5", 0.5),
    "max_open_files": ("0", 0),
    "autoscale_interval": ("0", 0),
    "dask_address": ("tcp://a b", 7),
}


def assert_names_bad_value(exc: ConfigError, name: str, value: Any, origin: str) -> None:
    message = str(exc)
    assert message.startswith(f"{name} must be "), message
    assert f"from {origin})" in message, message
    assert "; " in message, message  # the fix follows
    if name == "ops_token":
        assert TOKEN not in full_error_text(exc)
    else:
        assert f"got {value!r} from" in message, message


# ---------------------------------------------------------------- the table


def test_settings_table_lists_every_field_in_order() -> None:
    fields = [f.name for f in dataclasses.fields(Config) if not f.name.startswith("_")]
    assert fields == NAMES
    assert Config.setting_names() == tuple(fields)
    assert set(BAD) == set(NAMES)  # a new setting needs a bad-value case here
    for s in SETTINGS:
        assert s.env_var == "PIPEKIT_" + s.name.upper()
        assert s.help
        assert s.type_name
        assert s.default
        assert f"{s.name}: " in (Config.__doc__ or "")


def test_defaults_match_the_documented_table() -> None:
    config = Config()
    assert config.workers == (os.cpu_count() or 1)
    assert config.profiling_kinds == ("cpu",)
    assert config.profiling_dir == Path("profiles")
    assert config.ops_host == "127.0.0.1"
    assert config.ops_token is None
    assert config.max_memory_mb == 1024
    for s in SETTINGS:
        assert config.source_of(s.name) == "default"
        if s.name != "workers":
            assert s.format(getattr(config, s.name)) == s.default


def test_docs_reference_table_matches_settings() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for s in SETTINGS:
        type_name = s.type_name.replace("|", "\\|")
        row = f"| `{s.name}` | `{s.env_var}` | {type_name} | `{s.default}` | {s.help} |"
        assert row in doc, f"docs/configuration.md lacks or misstates the row: {row}"


def test_module_imports_only_the_stdlib_and_errors() -> None:
    tree = ast.parse((ROOT / "pipekit" / "config.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            assert module == "pipekit.errors" or module.split(".")[0] in (
                sys.stdlib_module_names | {"__future__"}
            ), module


# ---------------------------------------------------------------- precedence


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", toml_doc(
        {"workers": 2, "buffer_size": 10, "batch_size": 5, "ordered": True}
    ))
    env = {"PIPEKIT_BUFFER_SIZE": "20", "PIPEKIT_BATCH_SIZE": "6"}
    config = load(tmp_path, env, batch_size=7)
    file_source = f"file {tmp_path / 'pipekit.toml'}"
    assert (config.workers, config.buffer_size, config.batch_size) == (2, 20, 7)
    assert config.ordered is True
    assert config.source_of("workers") == file_source
    assert config.source_of("ordered") == file_source
    assert config.source_of("buffer_size") == "environment PIPEKIT_BUFFER_SIZE"
    assert config.source_of("batch_size") == "argument"
    assert config.source_of("shutdown_timeout") == "default"
    assert config.shutdown_timeout == 30.0


def test_env_defaults_to_os_environ_and_cwd_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "pipekit.toml", "workers = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPEKIT_BATCH_SIZE", "9")
    config = Config.load()
    assert (config.workers, config.batch_size) == (3, 9)
    assert config.source_of("workers") == f"file {Path.cwd() / 'pipekit.toml'}"


def test_no_file_and_no_environment_gives_defaults(tmp_path: Path) -> None:
    assert load(tmp_path) == Config()


# ---------------------------------------------------------------- files


def test_pyproject_tool_table_is_read(tmp_path: Path) -> None:
    write(tmp_path, "pyproject.toml",
          '[project]\nname = "x"\n\n[tool.pipekit]\nworkers = 6\nshutdown_timeout = "2m"\n')
    config = load(tmp_path)
    assert (config.workers, config.shutdown_timeout) == (6, 120.0)
    assert config.source_of("workers") == f"file {tmp_path / 'pyproject.toml'}"


def test_pyproject_without_tool_table_is_ignored(tmp_path: Path) -> None:
    write(tmp_path, "pyproject.toml", '[project]\nname = "x"\n[tool.ruff]\nline-length = 9\n')
    config = load(tmp_path)
    assert config == Config()
    assert config.source_of("workers") == "default"


def test_pipekit_toml_wins_over_pyproject_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "pyproject.toml", "[tool.pipekit]\nworkers = 6\nbatch_size = 8\n")
    write(tmp_path, "pipekit.toml", "workers = 2\n")
    with caplog.at_level(logging.WARNING, logger="pipekit.config"):
        config = load(tmp_path)
    assert (config.workers, config.batch_size) == (2, 100)
    assert "[tool.pipekit]" in caplog.text
    assert "ignored" in caplog.text


def test_pyproject_errors_name_the_table(tmp_path: Path) -> None:
    write(tmp_path, "pyproject.toml", "[tool.pipekit]\nworkers = 0\n")
    with pytest.raises(ConfigError, match=r"pyproject\.toml \[tool\.pipekit\]\)"):
        load(tmp_path)


def test_tool_pipekit_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "pyproject.toml", "[tool]\npipekit = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load(tmp_path)


def test_explicit_pyproject_without_tool_table_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"has no \[tool\.pipekit\] table"):
        load(tmp_path, path=path)


def test_pipekit_table_in_pipekit_toml_gets_a_hint(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", "[pipekit]\nworkers = 2\n")
    with pytest.raises(ConfigError, match="top-level keys, so move them out of the"):
        load(tmp_path)


def test_path_argument_wins_over_the_environment_and_discovery(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", "workers = 2\n")
    write(tmp_path, "named.toml", "workers = 3\n")
    explicit = write(tmp_path, "explicit.toml", "workers = 4\n")
    config = load(tmp_path, {CONFIG_ENV_VAR: "named.toml"}, path=explicit)
    assert config.workers == 4
    assert config.source_of("workers") == f"file {explicit}"


def test_pipekit_config_names_the_file_relative_to_cwd(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", "workers = 2\n")
    (tmp_path / "conf").mkdir()
    named = write(tmp_path / "conf", "prod.toml", "workers = 3\n")
    config = load(tmp_path, {CONFIG_ENV_VAR: "conf/prod.toml"})
    assert config.workers == 3
    assert config.source_of("workers") == f"file {named}"


def test_pipekit_config_can_name_a_pyproject(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "pyproject.toml", "[tool.pipekit]\nbatch_size = 3\n")
    assert load(tmp_path, {CONFIG_ENV_VAR: "sub/pyproject.toml"}).batch_size == 3


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_missing_named_file_is_an_error(tmp_path: Path, how: str) -> None:
    if how == "argument":
        with pytest.raises(ConfigError, match="given as the path argument"):
            load(tmp_path, path="missing.toml")
    else:
        with pytest.raises(ConfigError, match="named by environment variable PIPEKIT_CONFIG"):
            load(tmp_path, {CONFIG_ENV_VAR: "missing.toml"})


def test_directory_as_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist or is not a file"):
        load(tmp_path, path=tmp_path)


def test_path_of_wrong_type_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"path must be a str or os\.PathLike"):
        load(tmp_path, path=3)


def test_malformed_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "pipekit.toml", "workers = = 2\n")
    with pytest.raises(ConfigError, match="is not valid toml: invalid value") as info:
        load(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text", ["workers = " + "9" * 5000, "workers = " + "[" * 5000 + "]" * 5000]
)
def test_toml_the_parser_cannot_handle_is_an_error(tmp_path: Path, text: str) -> None:
    write(tmp_path, "pipekit.toml", text)
    with pytest.raises(ConfigError, match="is not valid toml: "):
        load(tmp_path)


def test_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pipekit.toml").write_bytes(b"workers = 2 # \xff\n")
    with pytest.raises(ConfigError, match="not valid utf-8"):
        load(tmp_path)


def test_file_strings_are_parsed_like_the_environment(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", toml_doc({
        "workers": "4", "ordered": "yes", "profiling_kinds": "heap,cpu",
        "metrics_interval": "500ms", "max_memory_mb": "none", "profiling_signal": "usr2",
    }))
    config = load(tmp_path)
    assert config.workers == 4
    assert config.ordered is True
    assert config.profiling_kinds == ("cpu", "heap")
    assert config.metrics_interval == 0.5
    assert config.max_memory_mb is None
    assert config.profiling_signal == "SIGUSR2"


def test_file_native_values(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", toml_doc({
        "profiling_kinds": ["heap"], "max_memory_mb": 0, "max_cpu_percent": 50,
        "profiling_dir": "/tmp/p",
    }))
    config = load(tmp_path)
    assert config.profiling_kinds == ("heap",)
    assert config.max_memory_mb is None
    assert config.max_cpu_percent == 50.0
    assert isinstance(config.max_cpu_percent, float)
    assert config.profiling_dir == Path("/tmp/p")


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("name", NAMES)
def test_bad_value_from_environment_names_setting_value_and_variable(
    tmp_path: Path, name: str
) -> None:
    text, _ = BAD[name]
    var = BY_NAME[name].env_var
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {var: text})
    assert_names_bad_value(info.value, name, text, f"environment variable {var}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["text", "native"])
def test_bad_value_from_file_names_setting_value_and_file(
    tmp_path: Path, name: str, form: str
) -> None:
    text, native = BAD[name]
    value = text if form == "text" else native
    path = write(tmp_path, "pipekit.toml", toml_doc({name: value}))
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert_names_bad_value(info.value, name, value, str(path))


@pytest.mark.parametrize("name", NAMES)
def test_bad_value_as_argument_names_setting_and_value(tmp_path: Path, name: str) -> None:
    _, native = BAD[name]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **{name: native})
    assert_names_bad_value(info.value, name, native, "argument")
    with pytest.raises(ConfigError) as direct:
        Config(**{name: native})
    assert str(direct.value) == str(info.value)


def test_error_message_reads_as_documented(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"PIPEKIT_WORKERS": "zero"})
    assert str(info.value) == (
        "workers must be an integer >= 1 (got 'zero' from environment variable "
        "PIPEKIT_WORKERS); set it to a whole number such as 4"
    )
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"workers": "4"}, "'4'"),
        ({"workers": True}, "True"),
        ({"workers": 2.0}, "2.0"),
        ({"ordered": 1}, "1"),
        ({"shutdown_timeout": "30s"}, "'30s'"),
        ({"profiling_kinds": "cpu"}, "'cpu'"),
        ({"profiling_signal": 10}, "10"),
        ({"ops_port": None}, "None"),
        ({"shutdown_timeout": math.inf}, "inf"),
        ({"batch_linger": math.nan}, "nan"),
    ],
)
def test_direct_construction_is_strict_about_types(kwargs: dict[str, Any], shown: str) -> None:
    with pytest.raises(ConfigError, match=rf"\(got {shown} from argument\); pass "):
        Config(**kwargs)


def test_direct_construction_normalises_python_values() -> None:
    config = Config(
        shutdown_timeout=timedelta(minutes=1),  # type: ignore[arg-type]
        max_cpu_percent=90,
        max_memory_mb=0,
        profiling_kinds=["heap", "cpu", "heap"],  # type: ignore[arg-type]
        profiling_dir="out",  # type: ignore[arg-type]
        profiling_signal="usr1",
    )
    assert config.shutdown_timeout == 60.0
    assert isinstance(config.max_cpu_percent, float)
    assert config.max_memory_mb is None
    assert config.profiling_kinds == ("cpu", "heap")
    assert config.profiling_dir == Path("out")
    assert config.profiling_signal == "SIGUSR1"
    hash(config)  # every field is hashable


def test_ranges_at_their_edges() -> None:
    cpu_max = 100  # percent of all available CPUs
    Config(batch_linger=0, ops_port=0, ops_host="::1", max_cpu_percent=cpu_max,
           profiling_rate=1000, memory_resume_ratio=0.999)
    for bad in ({"batch_linger": 10.001}, {"ops_port": -1}, {"max_cpu_percent": cpu_max + 1},
                {"memory_resume_ratio": 0.0}, {"max_open_files": 0}, {"ops_host": ""},
                {"profiling_rate": 1001}):
        with pytest.raises(ConfigError):
            Config(**bad)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5),
     ("45", 45.0), (" 2 M ", 120.0), ("1e3ms", 1.0), ("0.25S", 0.25)],
)
def test_duration_strings(tmp_path: Path, text: str, seconds: float) -> None:
    config = load(tmp_path, {"PIPEKIT_SHUTDOWN_TIMEOUT": text})
    assert config.shutdown_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 parsecs", "ms", "inf", "nan", "1e999s", "s30", "", "--1s"])
def test_bad_duration_strings(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="duration such as '500ms', '30s' or '2m'"):
        load(tmp_path, {"PIPEKIT_SHUTDOWN_TIMEOUT": text})


def test_durations_apply_only_to_seconds_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_cpu_percent must be a number"):
        load(tmp_path, {"PIPEKIT_MAX_CPU_PERCENT": "50s"})


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("0", False), ("TRUE", True), ("false", False), ("Yes", True),
     ("no", False), ("on", True), ("OFF", False), (" true ", True)],
)
def test_bool_words(tmp_path: Path, text: str, value: bool) -> None:
    assert load(tmp_path, {"PIPEKIT_ORDERED": text}).ordered is value


@pytest.mark.parametrize(
    ("text", "kinds"),
    [("cpu", ("cpu",)), ("heap", ("heap",)), ("cpu,heap", ("cpu", "heap")),
     ("HEAP, cpu", ("cpu", "heap")), ("heap,heap,", ("heap",))],
)
def test_profiling_kinds_lists(tmp_path: Path, text: str, kinds: tuple[str, ...]) -> None:
    assert load(tmp_path, {"PIPEKIT_PROFILING_KINDS": text}).profiling_kinds == kinds


@pytest.mark.parametrize("text", ["", "0", "none", "OFF", " None "])
def test_memory_limit_can_be_disabled(tmp_path: Path, text: str) -> None:
    config = load(tmp_path, {"PIPEKIT_MAX_MEMORY_MB": text})
    assert config.max_memory_mb is None
    assert config.source_of("max_memory_mb") == "environment PIPEKIT_MAX_MEMORY_MB"


@pytest.mark.parametrize("name", ["max_open_files", "profiling_signal", "dask_address",
                                  "ops_token"])
@pytest.mark.parametrize("text", ["", "none", "off"])
def test_optional_settings_accept_none_words(tmp_path: Path, name: str, text: str) -> None:
    assert getattr(load(tmp_path, {BY_NAME[name].env_var: text}), name) is None


@pytest.mark.parametrize("text", ["", "none"])
def test_required_text_settings_reject_empty(tmp_path: Path, text: str) -> None:
    if text == "none":  # "none" is a (strange) host name, not a way to turn the server off
        assert load(tmp_path, {"PIPEKIT_OPS_HOST": text}).ops_host == "none"
        return
    with pytest.raises(ConfigError, match="ops_host must be a host name"):
        load(tmp_path, {"PIPEKIT_OPS_HOST": text})


@pytest.mark.parametrize(
    ("text", "name"),
    [("SIGUSR1", "SIGUSR1"), ("usr1", "SIGUSR1"), ("Usr2", "SIGUSR2"), ("SIGHUP", "SIGHUP"),
     ("SIGIOT", "SIGABRT")],
)
def test_profiling_signal_names_are_normalised(tmp_path: Path, text: str, name: str) -> None:
    assert load(tmp_path, {"PIPEKIT_PROFILING_SIGNAL": text}).profiling_signal == name


@pytest.mark.parametrize("text", ["TERM", "SIGINT", "kill", "SIGSTOP"])
def test_profiling_signal_rejects_signals_pipekit_cannot_take(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="use 'SIGUSR1' or 'SIGUSR2'"):
        load(tmp_path, {"PIPEKIT_PROFILING_SIGNAL": text})


def test_profiling_signal_suggests_a_near_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'SIGUSR1'\?"):
        load(tmp_path, {"PIPEKIT_PROFILING_SIGNAL": "SIGUSER1"})


def test_profiling_signal_accepts_names_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profiling_signal must be the name of a signal"):
        load(tmp_path, {"PIPEKIT_PROFILING_SIGNAL": "10"})


def test_setting_parse_and_check_are_public(tmp_path: Path) -> None:
    setting = BY_NAME["batch_linger"]
    assert isinstance(setting, Setting)
    assert setting.parse("5ms") == pytest.approx(0.005)
    assert setting.check(timedelta(milliseconds=5)) == pytest.approx(0.005)
    with pytest.raises(ConfigError, match=r"\(got 'x' from --set batch_linger\)"):
        setting.parse("x", origin="--set batch_linger")


# ---------------------------------------------------------------- unknown names


def test_unknown_file_key_suggests_nearest(tmp_path: Path) -> None:
    path = write(tmp_path, "pipekit.toml", "worker = 2\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert str(info.value) == f"unknown setting 'worker' in {path}; did you mean 'workers'?"


def test_unknown_pyproject_key_suggests_nearest(tmp_path: Path) -> None:
    write(tmp_path, "pyproject.toml", "[tool.pipekit]\nbuffersize = 2\n")
    with pytest.raises(ConfigError, match=r"\[tool\.pipekit\]; did you mean 'buffer_size'\?"):
        load(tmp_path)


def test_unknown_env_var_suggests_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"PIPEKIT_WORKER": "2"})
    assert str(info.value) == (
        "unknown environment variable PIPEKIT_WORKER; did you mean PIPEKIT_WORKERS?"
    )


def test_misspelt_config_variable_is_suggested(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean PIPEKIT_CONFIG\?"):
        load(tmp_path, {"PIPEKIT_CONFG": "x.toml"})


def test_unknown_name_without_a_near_match_lists_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PIPEKIT_<SETTING> with one of: workers, "):
        load(tmp_path, {"PIPEKIT_XYZZY": "1"})
    write(tmp_path, "pipekit.toml", "xyzzy = 1\n")
    with pytest.raises(ConfigError, match="use one of the settings: workers, buffer_size"):
        load(tmp_path)


def test_unknown_argument_suggests_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"given as an argument; did you mean 'batch_size'\?"):
        load(tmp_path, batch_sise=3)


def test_other_environment_variables_are_ignored(tmp_path: Path) -> None:
    assert load(tmp_path, {"PATH": "/bin", "pipekit_workers": "x", "PIPEKITWORKERS": "x"})


def test_source_of_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'workers'\?"):
        Config().source_of("worker")


# ---------------------------------------------------------------- the token


def test_token_is_masked_in_repr_str_and_describe(tmp_path: Path) -> None:
    config = load(tmp_path, {"PIPEKIT_OPS_TOKEN": TOKEN})
    assert config.ops_token == TOKEN
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)
    assert "ops_token='***'" in repr(config)
    rows = {name: (value, source) for name, value, source in config.describe()}
    assert rows["ops_token"] == ("***", "environment PIPEKIT_OPS_TOKEN")
    assert TOKEN not in repr(config.describe())
    assert "ops_token=None" in repr(Config())


@pytest.mark.parametrize("source", ["env", "file", "argument"])
def test_bad_token_is_never_echoed(tmp_path: Path, source: str) -> None:
    bad = TOKEN + "\n\tsecret"
    env = {"PIPEKIT_OPS_TOKEN": bad} if source == "env" else {}
    if source == "file":
        write(tmp_path, "pipekit.toml", toml_doc({"ops_token": bad}))
    kwargs = {"ops_token": bad} if source == "argument" else {}
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env, **kwargs)
    text = full_error_text(info.value)
    assert TOKEN not in text
    assert "got '***' from" in str(info.value)


def test_token_survives_other_errors_unechoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"PIPEKIT_OPS_TOKEN": TOKEN, "PIPEKIT_WORKERS": "-3"})
    assert TOKEN not in full_error_text(info.value)


# ---------------------------------------------------------------- replace, equality


def test_replace_validates(tmp_path: Path) -> None:
    config = load(tmp_path, {"PIPEKIT_WORKERS": "3"})
    with pytest.raises(ConfigError, match=r"workers must be an integer >= 1 \(got 0 from"):
        dataclasses.replace(config, workers=0)
    with pytest.raises(ConfigError, match="got '5' from argument"):
        dataclasses.replace(config, batch_size="5")  # type: ignore[arg-type]


def test_replace_marks_changed_fields_as_arguments(tmp_path: Path) -> None:
    write(tmp_path, "pipekit.toml", "batch_size = 5\n")
    config = load(tmp_path, {"PIPEKIT_WORKERS": "3", "PIPEKIT_OPS_TOKEN": TOKEN})
    changed = dataclasses.replace(config, workers=4, max_memory_mb=0)
    assert changed.workers == 4
    assert changed.max_memory_mb is None
    assert changed.source_of("workers") == "argument"
    assert changed.source_of("max_memory_mb") == "argument"
    assert changed.source_of("batch_size") == f"file {tmp_path / 'pipekit.toml'}"
    assert changed.source_of("ops_token") == "environment PIPEKIT_OPS_TOKEN"
    assert changed.source_of("ordered") == "default"
    assert config.source_of("workers") == "environment PIPEKIT_WORKERS"  # unchanged


def test_replace_method_checks_names(tmp_path: Path) -> None:
    config = load(tmp_path, {"PIPEKIT_WORKERS": "3"})
    changed = config.replace(batch_size=7)
    assert (changed.workers, changed.batch_size) == (3, 7)
    assert changed.source_of("batch_size") == "argument"
    assert changed.source_of("workers") == "environment PIPEKIT_WORKERS"
    with pytest.raises(ConfigError, match=r"unknown setting 'batchsize'.*'batch_size'\?"):
        config.replace(batchsize=7)
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        config.replace(batch_size=0)


def test_equality_and_hash_ignore_sources(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"PIPEKIT_WORKERS": "3"})
    direct = Config(workers=3)
    assert loaded == direct
    assert hash(loaded) == hash(direct)
    assert loaded.source_of("workers") != direct.source_of("workers")


def test_config_is_frozen_and_pickles_with_sources(tmp_path: Path) -> None:
    config = load(tmp_path, {"PIPEKIT_WORKERS": "3", "PIPEKIT_OPS_TOKEN": TOKEN})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 4  # type: ignore[misc]
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config
    assert copy.source_of("workers") == "environment PIPEKIT_WORKERS"


def test_describe_rows_round_trip_through_the_environment(tmp_path: Path) -> None:
    config = Config(workers=3, batch_linger=0.01, profiling_kinds=("cpu", "heap"),
                    profiling_signal="SIGUSR2", max_memory_mb=None, ordered=True,
                    profiling_dir=Path("/var/p"), dask_address="tcp://h:1")
    rows = config.describe()
    assert [row[0] for row in rows] == NAMES
    env = {BY_NAME[name].env_var: value for name, value, _ in rows}
    assert load(tmp_path, env) == config


# ---------------------------------------------------------------- property tests


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")



def _valid_value(setting: Setting) -> st.SearchStrategy[Any]:
    safe = string.ascii_letters + string.digits + "._-:/"
    name = setting.name
    special: dict[str, st.SearchStrategy[Any]] = {
        "profiling_kinds": st.sets(st.sampled_from(PROFILE_KINDS), min_size=1).map(tuple),
        "profiling_dir": st.text(safe, min_size=1, max_size=10).map(Path),
        "profiling_signal": st.sampled_from([None, "SIGUSR1", "SIGUSR2", "SIGHUP"]),
        "ops_host": st.text(safe, min_size=1, max_size=10),
        "ops_token": st.none() | st.text(safe, min_size=1, max_size=10),
        "dask_address": st.none() | st.text(safe, min_size=1, max_size=10),
        "memory_resume_ratio": st.floats(0.01, 0.99),
        "max_cpu_percent": st.floats(1.0, 100.0),
        "batch_linger": st.floats(0.0, 10.0),
        "profiling_rate": st.integers(1, 1000),
        "ops_port": st.integers(0, 65535),
        "max_memory_mb": st.none() | st.integers(1, 10**6),
        "max_open_files": st.none() | st.integers(1, 10**6),
    }
    if name in special:
        return special[name]
    if setting.type_name == "bool":
        return st.booleans()
    if setting.type_name == "int":
        return st.integers(1, 10**9)
    return st.floats(1e-6, 1e6)  # positive durations


@FUZZ
@given(st.fixed_dictionaries({s.name: _valid_value(s) for s in SETTINGS}))
def test_any_valid_config_round_trips_through_describe_and_env(
    fuzz_dir: Path, values: dict[str, Any]
) -> None:
    assume(all(str(values[n]).lower() not in ("none", "off", "")
               for n in ("ops_token", "dask_address") if values[n] is not None))
    config = Config(**values)
    env = {BY_NAME[name].env_var: text for name, text, _ in config.describe()}
    env["PIPEKIT_OPS_TOKEN"] = config.ops_token or ""
    loaded = Config.load(env=env, cwd=fuzz_dir)
    assert loaded == config
    assert {loaded.source_of(n) for n in NAMES} == {f"environment {s.env_var}" for s in SETTINGS}


_token = st.text(string.ascii_letters + string.digits, min_size=16, max_size=24).map(
    lambda s: "tok" + s
)
_interesting = st.sampled_from(
    ["30s", "500ms", "2m", "none", "off", "", "0", "-1", "1e999", "cpu,heap", "SIGUSR1",
     "true", "yes", "127.0.0.1", ".", "/", "pipekit.toml", "\x00", "nan"]
)
_env_keys = (
    st.sampled_from([s.env_var for s in SETTINGS] + [CONFIG_ENV_VAR])
    | st.text(string.ascii_uppercase + "_", max_size=12).map(lambda s: "PIPEKIT_" + s)
    | st.sampled_from(["HOME", "pipekit_workers"])
)


def _assert_token_hidden(outcome: Config | ConfigError, token: str) -> None:
    if isinstance(outcome, ConfigError):
        assert token not in full_error_text(outcome)
    else:
        assert token not in repr(outcome)
        assert token not in repr(outcome.describe())


def _attempt(**kwargs: Any) -> Config | ConfigError:
    try:
        return Config.load(**kwargs)
    except ConfigError as exc:
        return exc


@FUZZ
@given(env=st.dictionaries(_env_keys, st.text(max_size=20) | _interesting, max_size=6),
       token=_token, spoil=st.booleans())
def test_fuzzed_environment_raises_only_config_errors(
    fuzz_dir: Path, env: dict[str, str], token: str, spoil: bool
) -> None:
    assume(all(token not in v for v in env.values()))
    env = {**env, "PIPEKIT_OPS_TOKEN": token + (" \x01" if spoil else "")}
    _assert_token_hidden(_attempt(env=env, cwd=fuzz_dir), token)


_toml_leaf = (
    st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | _interesting
)
_toml_values = st.recursive(
    _toml_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=6,
)
_toml_keys = st.sampled_from([*NAMES, "worker", "pipekit", "tool"]) | st.text(max_size=10)


@FUZZ
@given(table=st.dictionaries(_toml_keys, _toml_values, max_size=6), token=_token,
       pyproject=st.booleans())
def test_fuzzed_toml_documents_raise_only_config_errors(
    fuzz_dir: Path, table: dict[str, Any], token: str, pyproject: bool
) -> None:
    assume(token not in repr(table))
    table = {**table, "ops_token": token}
    name = "pyproject.toml" if pyproject else "settings.toml"
    path = write(fuzz_dir, name, toml_doc(table, "tool.pipekit" if pyproject else None))
    _assert_token_hidden(_attempt(path=path, env={}, cwd=fuzz_dir), token)


@FUZZ
@given(text=st.text(max_size=80), token=_token)
def test_fuzzed_toml_text_raises_only_config_errors(
    fuzz_dir: Path, text: str, token: str
) -> None:
    assume(token not in text)
    path = write(fuzz_dir, "raw.toml", f"ops_token = {toml_string(token)}\n{text}")
    _assert_token_hidden(_attempt(path=path, env={}, cwd=fuzz_dir), token)
