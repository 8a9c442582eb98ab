"""Tests for pipekit.retry: the Retry policy and retry_call (with a fake sleep)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import threading
from datetime import timedelta
from typing import Any

import pytest
import tenacity

from pipekit.errors import ConfigError
from pipekit.retry import NO_RETRY, Retry, retry_call


class Failing:
    """Fails the first ``fails`` calls (with the given errors in turn), then succeeds."""

    def __init__(self, fails: int, *errors: BaseException) -> None:
        self.fails = fails
        self.errors = errors or (OSError("transient"),)
        self.calls = 0

    def __call__(self, x: Any) -> Any:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.errors[(self.calls - 1) % len(self.errors)]
        return ("ok", x)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, -1, 101, 2.0, True, "3", None])
def test_bad_attempts_are_refused_with_the_value_named(attempts: Any) -> None:
    with pytest.raises(ConfigError, match="attempts must be") as info:
        Retry(attempts=attempts)
    assert repr(attempts) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["backoff", "max_backoff", "jitter"])
@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, "1", True, None,
                                   timedelta(seconds=-1)])
def test_bad_durations_are_refused_with_the_name_and_value(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        Retry(**{name: value})
    shown = repr(value.total_seconds()) if isinstance(value, timedelta) else repr(value)
    assert shown in str(info.value)


def test_max_backoff_below_backoff_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"max_backoff=0\.5.*backoff=2\.0"):
        Retry(backoff=2, max_backoff=0.5)


@pytest.mark.parametrize("on", [(), int, (ValueError, "OSError"), "ValueError", ValueError()])
def test_on_must_be_exception_types(on: Any) -> None:
    with pytest.raises(ConfigError, match="on must be an exception type") as info:
        Retry(on=on)
    assert repr(on) in str(info.value)


def test_durations_are_normalised_to_float_seconds() -> None:
    policy = Retry(attempts=4, backoff=timedelta(milliseconds=250), max_backoff=2,
                   jitter=timedelta(0), on=OSError)
    assert policy.backoff == 0.25
    assert policy.max_backoff == 2.0
    assert isinstance(policy.max_backoff, float)
    assert policy.jitter == 0.0
    assert policy.on == (OSError,)


def test_policy_is_frozen_hashable_comparable_and_picklable() -> None:
    policy = Retry(attempts=5, backoff=0.01, on=(OSError, TimeoutError))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 9  # type: ignore[misc]
    twin = Retry(attempts=5, backoff=0.01, on=(OSError, TimeoutError))
    assert policy == twin
    assert hash(policy) == hash(twin)
    retry_call(policy, Failing(1), "x", sleep=lambda s: None)  # builds no shared state
    retry_call(policy, Failing(1), "x")  # caches tenacity's Retrying on the policy
    clone = pickle.loads(pickle.dumps(policy))
    assert clone == policy
    assert clone._retrying is None
    assert "attempts=5" in repr(policy)
    assert "_retrying" not in repr(policy)


def test_no_retry_policy_makes_one_attempt() -> None:
    assert NO_RETRY.attempts == 1
    assert not NO_RETRY.retries(OSError())


def test_retries_filters_on_the_exception_types() -> None:
    policy = Retry(attempts=3, on=(OSError,))
    assert policy.retries(OSError())
    assert policy.retries(ConnectionError())  # a subclass
    assert not policy.retries(ValueError())
    assert not Retry(attempts=1, on=OSError).retries(OSError())


def test_backoff_doubles_and_is_capped() -> None:
    policy = Retry(attempts=10, backoff=0.1, max_backoff=0.5)
    waits = [policy.wait_for(n) for n in range(1, 6)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


# -- retry_call ----------------------------------------------------------------------------


def test_retry_call_waits_before_every_retry_with_capped_backoff() -> None:
    sleeps: list[float] = []
    fn = Failing(100)
    policy = Retry(attempts=6, backoff=0.1, max_backoff=0.3)
    result, made, err = retry_call(policy, fn, 1, sleep=sleeps.append)
    assert result is None
    assert made == 5  # the first attempt happened before retry_call
    assert fn.calls == 5
    assert isinstance(err, OSError)
    # one wait before each retry, the first included
    assert sleeps == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert sleeps == pytest.approx([policy.wait_for(n) for n in range(1, 6)])


def test_retry_call_succeeds_once_the_function_recovers() -> None:
    sleeps: list[float] = []
    fn = Failing(2)
    result, made, err = retry_call(Retry(attempts=5, backoff=0.01), fn, "item",
                                   sleep=sleeps.append)
    assert (result, made, err) == (("ok", "item"), 3, None)
    assert len(sleeps) == 3


def test_jitter_adds_at_most_its_value_to_each_wait() -> None:
    sleeps: list[float] = []
    policy = Retry(attempts=30, backoff=0.01, max_backoff=0.01, jitter=0.5)
    retry_call(policy, Failing(100), 0, sleep=sleeps.append)
    assert len(sleeps) == 29
    assert all(0.01 <= s <= 0.51 for s in sleeps)
    assert len(set(sleeps)) > 1  # it is random


def test_an_error_outside_on_ends_the_retries_and_is_returned() -> None:
    fn = Failing(5, KeyError("not retried"))
    _, made, err = retry_call(Retry(attempts=5, on=OSError, backoff=0), fn, 0,
                              sleep=lambda s: None)
    assert made == 1
    assert isinstance(err, KeyError)


def test_the_last_error_is_returned_never_a_tenacity_error() -> None:
    # the item's first call (made by the stage) raised; these are its two retries
    fn = Failing(10, ConnectionError("retry 1"), TimeoutError("retry 2"))
    _, made, err = retry_call(Retry(attempts=3, backoff=0), fn, 0, sleep=lambda s: None)
    assert made == 2
    assert isinstance(err, TimeoutError)  # the error of the last call made
    assert not isinstance(err, tenacity.RetryError)
    assert str(err) == "retry 2"


def test_should_stop_ends_retries_before_the_next_call() -> None:
    fn = Failing(10)
    stop = iter([False, True])
    _, made, err = retry_call(Retry(attempts=10, backoff=0), fn, 0, sleep=lambda s: None,
                              should_stop=lambda: next(stop))
    assert made == 1
    assert fn.calls == 1
    assert err is not None
    assert not isinstance(err, OSError)  # an abandonment, not the item's own error


def test_keyboard_interrupt_is_not_swallowed() -> None:
    fn = Failing(10, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        retry_call(Retry(attempts=3, backoff=0, on=BaseException), fn, 0,
                   sleep=lambda s: None)


def test_a_shared_policy_counts_attempts_per_call_across_threads() -> None:
    policy = Retry(attempts=4, backoff=0)
    results: list[tuple[Any, int, Any]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for _ in range(50):
            out = retry_call(policy, Failing(k % 3), k)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 300
    for result, made, err in results:
        assert err is None
        assert made == result[1] % 3 + 1  # k % 3 failures, then the success

