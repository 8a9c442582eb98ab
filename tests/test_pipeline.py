"""Behaviour tests of pipekit.Pipeline and Run, against every executor kind that applies.

Every run's report is checked with ``assert_accounted``: each submitted item ends in
exactly one place (an output, a dead letter, or ``unprocessed``).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from _helpers import (
    HANG,
    POISON,
    Gate,
    TwoArgError,
    always_fail,
    assert_accounted,
    assert_stages_accounted,
    double,
    drop_odd,
    fail_on_multiple_of_5,
    fan_by_mod3,
    first_of,
    flaky_twice,
    inc,
    jittery_identity,
    keyed_interval,
    kill_on_poison,
    make_pipe,
    numbers,
    raise_two_arg_on_odd,
    sleep_on_hang,
    unpicklable_output_on_3,
    wait_until,
)

import pipekit
from pipekit import (
    DROP,
    ConfigError,
    ItemTimeoutError,
    NotPicklableError,
    PipelineClosedError,
    PipelineStateError,
    QueueFullError,
    Retry,
    SubmitTimeoutError,
    WorkerLostError,
)

# -- outputs -------------------------------------------------------------------------------


def test_outputs_are_correct_through_several_stages(executor: str) -> None:
    pipe = make_pipe()
    pipe.add_stage("double", double, executor=executor, workers=2, batch_size=7)
    pipe.add_stage("inc", inc, workers=3, batch_size=5)
    got: list[int] = []
    report = pipe.run(range(500), sink=got.append)
    assert sorted(got) == [2 * i + 1 for i in range(500)]
    assert report.reason == "completed"
    assert report.submitted == report.outputs == 500
    assert report.ok
    assert_accounted(report)
    assert_stages_accounted(report)
    assert report.stage("double").executor == executor


def test_the_decorator_registers_stages_and_returns_the_function() -> None:
    pipe = make_pipe()

    @pipe.stage
    def parse(x: str) -> int:
        return int(x)

    @pipe.stage(workers=2, batch_size=3, name="square")
    def sq(x: int) -> int:
        return x * x

    assert parse("4") == 4  # still a plain function
    assert [s.name for s in pipe.stages] == ["parse", "square"]
    assert pipe.stages[1].workers == 2
    assert pipe.stages[1].batch_size == 3
    assert sorted(pipe.map(["1", "2", "3"])) == [1, 4, 9]
    assert "square" in repr(pipe)


def test_add_stage_chains() -> None:
    pipe = make_pipe().add_stage("a", inc).add_stage("b", double)
    assert [s.name for s in pipe.stages] == ["a", "b"]


def test_drop_and_fanout(executor: str) -> None:
    pipe = make_pipe()
    pipe.add_stage("evens", drop_odd, executor=executor, batch_size=8)
    pipe.add_stage("fan", fan_by_mod3, executor=executor, fanout=True, batch_size=5)
    got: list[int] = []
    report = pipe.run(range(60), sink=got.append)
    expected = sorted(x for x in range(0, 60, 2) for _ in range(x % 3))
    assert sorted(got) == expected
    evens, fan = report.stages
    assert evens.dropped == 30
    assert evens.emitted == 30
    assert fan.dropped == 10  # even multiples of 3 fan out to nothing
    assert fan.emitted == len(expected)
    assert_stages_accounted(report)


def test_a_stage_may_return_drop_for_every_item() -> None:
    pipe = make_pipe().add_stage("nothing", lambda x: DROP)
    report = pipe.run(range(20))
    assert report.outputs == 0
    assert report.stage("nothing").dropped == 20
    assert report.ok


def test_ordered_stages_keep_input_order(executor: str) -> None:
    pipe = make_pipe(ordered=True)
    pipe.add_stage("jitter", jittery_identity, executor=executor, workers=3, batch_size=4)
    pipe.add_stage("jitter2", jittery_identity, workers=4, batch_size=3)
    assert all(s.ordered for s in pipe.stages)
    assert list(pipe.map(range(300))) == list(range(300))


def test_an_ordered_stage_keeps_order_despite_failures_and_drops() -> None:
    def fn(x: int) -> Any:
        if x % 7 == 0:
            raise ValueError(x)
        return DROP if x % 5 == 0 else jittery_identity(x)

    pipe = make_pipe().add_stage("s", fn, workers=4, batch_size=3, ordered=True)
    got: list[int] = []
    report = pipe.run(range(200), sink=got.append, keep_dead_letters=True)
    assert got == [x for x in range(200) if x % 7 and x % 5]
    assert sorted(d.item for d in report.dead_letters) == list(range(0, 200, 7))


def test_keyed_stage_runs_one_item_per_key_at_a_time_in_order(executor: str) -> None:
    items = [("abcd"[i % 4] if i % 5 else "hot", i) for i in range(120)]
    pipe = make_pipe()
    pipe.add_stage("keyed", keyed_interval, executor=executor, key=first_of, workers=3,
                   batch_size=2)
    got: list[tuple[str, int, float, float]] = []
    report = pipe.run(items, sink=got.append)
    assert_accounted(report)
    assert sorted((k, i) for k, i, _, _ in got) == sorted(items)  # each exactly once
    by_key: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for k, i, start, end in got:
        by_key[k].append((i, start, end))
    for k, calls in by_key.items():
        calls.sort(key=lambda c: c[1])  # by start time
        indexes = [c[0] for c in calls]
        assert indexes == sorted(indexes), f"key {k!r} ran out of order: {indexes}"
        for (_, _, end), (i, start, _) in itertools.pairwise(calls):
            assert end <= start, f"key {k!r}: item {i} started before the previous ended"


def test_an_ordered_keyed_stage_emits_in_arrival_order(executor: str) -> None:
    items = [("hot" if i % 3 == 0 else f"k{i % 7}", i) for i in range(90)]
    pipe = make_pipe()
    pipe.add_stage("keyed", keyed_interval, executor=executor, key=first_of, workers=3,
                   batch_size=2, ordered=True)
    got = [i for _, i, _, _ in pipe.map(items)]
    assert got == list(range(90))


def test_a_key_function_that_raises_dead_letters_only_that_item() -> None:
    def key(x: int) -> int:
        if x == 4:
            raise KeyError("no key")
        return x % 2

    pipe = make_pipe().add_stage("k", inc, key=key)
    report = pipe.run(range(10), keep_dead_letters=True)
    assert report.outputs == 9
    (letter,) = report.dead_letters
    assert (letter.stage, letter.item, type(letter.error)) == ("k", 4, KeyError)
    assert_accounted(report)


# -- failures, retries, dead letters -------------------------------------------------------


def test_an_item_that_raises_does_not_affect_the_others(executor: str) -> None:
    pipe = make_pipe()
    pipe.add_stage("check", fail_on_multiple_of_5, executor=executor, batch_size=10)
    got: list[int] = []
    report = pipe.run(range(50), sink=got.append, keep_dead_letters=True)
    assert sorted(got) == [x for x in range(50) if x % 5]
    letters = sorted(report.dead_letters, key=lambda d: d.item)
    assert [d.item for d in letters] == list(range(0, 50, 5))
    for d in letters:
        assert d.stage == "check"
        assert isinstance(d.error, ValueError)
        assert str(d.error) == f"bad item {d.item}"
        assert d.attempts == 1
    assert report.stage("check").failed == 10
    assert not report.ok
    assert_accounted(report)


def test_retries_then_dead_letters_with_stage_error_and_attempts(executor: str) -> None:
    pipe = make_pipe()
    pipe.add_stage("first", inc)
    pipe.add_stage("store", always_fail, executor=executor, batch_size=4,
                   retry=Retry(attempts=3, backoff=0, on=OSError))
    report = pipe.run(range(8), keep_dead_letters=True)
    assert report.outputs == 0
    assert report.dead_letter_count == 8
    assert sorted(d.item for d in report.dead_letters) == list(range(1, 9))  # as received
    for d in report.dead_letters:
        assert d.stage == "store"
        assert isinstance(d.error, OSError)
        assert d.attempts == 3
    assert report.stage("store").retried == 8 * 2
    assert report.stage("store").failed == 8
    assert_accounted(report)


def test_retries_recover_transient_failures(executor: str) -> None:
    items = [f"recover-{executor}-{i}" for i in range(10)]  # fresh per-item call counts
    pipe = make_pipe().add_stage("flaky", flaky_twice, executor=executor, batch_size=3,
                                 retry=Retry(attempts=3, backoff=0.001))
    got: list[str] = []
    report = pipe.run(items, sink=got.append)
    assert sorted(got) == sorted(items)
    assert report.stage("flaky").retried == 20
    assert report.ok


def test_errors_outside_retry_on_are_not_retried() -> None:
    pipe = make_pipe().add_stage("s", fail_on_multiple_of_5,
                                 retry=Retry(attempts=5, backoff=0, on=OSError))
    report = pipe.run(range(10), keep_dead_letters=True)
    assert [d.attempts for d in report.dead_letters] == [1, 1]
    assert report.stage("s").retried == 0


def test_dead_letter_callback_receives_each_letter_and_the_report_keeps_a_count() -> None:
    letters: list[pipekit.DeadLetter] = []
    pipe = make_pipe().add_stage("s", fail_on_multiple_of_5)
    report = pipe.run(range(20), dead_letter=letters.append)
    assert sorted(d.item for d in letters) == [0, 5, 10, 15]
    assert report.dead_letter_count == 4
    assert report.dead_letters == ()  # given to the callback, not kept twice
    kept = pipe.run(range(20), dead_letter=lambda d: None, keep_dead_letters=True)
    assert len(kept.dead_letters) == 4


def test_a_failing_dead_letter_callback_does_not_stop_the_run() -> None:
    def bad_handler(letter: pipekit.DeadLetter) -> None:
        raise RuntimeError("handler broke")

    pipe = make_pipe().add_stage("s", fail_on_multiple_of_5)
    report = pipe.run(range(20), dead_letter=bad_handler)
    assert report.outputs == 16
    assert report.dead_letter_count == 4
    assert_accounted(report)


def test_a_sink_that_raises_dead_letters_the_output() -> None:
    def sink(x: int) -> None:
        if x == 6:
            raise OSError("disk full")

    report = make_pipe().add_stage("d", double).run(range(5), sink=sink,
                                                    keep_dead_letters=True)
    (letter,) = report.dead_letters
    assert (letter.stage, letter.item, type(letter.error)) == ("sink", 6, OSError)
    assert report.outputs == 4
    assert_accounted(report)


# -- timeouts and lost workers --------------------------------------------------------------


@pytest.mark.timeout(20)  # a run that waited for the hung call would take 30 s
def test_a_hung_call_times_out_and_the_rest_flow_on_threads() -> None:
    release = threading.Event()

    def fn(x: int) -> int:
        if x == 5:
            release.wait()  # hangs until the test ends
        return x

    pipe = make_pipe().add_stage("slow", fn, workers=2, batch_size=4, timeout=0.5,
                                 ordered=True)
    got: list[int] = []
    try:
        report = pipe.run(range(12), sink=got.append, keep_dead_letters=True)
    finally:
        release.set()
    assert got == [x for x in range(12) if x != 5]  # in order, around the hole
    (letter,) = report.dead_letters
    assert letter.item == 5
    assert isinstance(letter.error, ItemTimeoutError)
    assert "'slow'" in str(letter.error)
    assert "0.5" in str(letter.error)
    assert letter.attempts == 1
    stats = report.stage("slow")
    assert stats.timed_out == 1
    assert stats.stuck_workers == 1  # the hung call was still running at the end
    assert_accounted(report)


@pytest.mark.timeout(20)
def test_a_timed_out_call_is_retried_and_its_attempts_counted() -> None:
    release = threading.Event()
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        if x == 7:
            release.wait()
        return x

    pipe = make_pipe().add_stage(
        "slow", fn, workers=2, batch_size=20, timeout=0.5,
        retry=Retry(attempts=2, backoff=0, on=ItemTimeoutError))
    try:
        report = pipe.run(range(20), keep_dead_letters=True)
    finally:
        release.set()
    (letter,) = report.dead_letters
    assert letter.item == 7
    assert letter.attempts == 2  # this item's attempts, not the batch's calls so far
    assert calls.count(7) == 2
    assert report.outputs == 19
    assert report.stage("slow").timed_out == 2
    assert_accounted(report)


def test_a_hung_call_times_out_on_processes() -> None:
    pipe = make_pipe().add_stage("slow", sleep_on_hang, executor="process", workers=1,
                                 batch_size=4, timeout=0.5)
    got: list[int] = []
    report = pipe.run(range(8), sink=got.append, keep_dead_letters=True)
    assert sorted(got) == [x for x in range(8) if x != HANG]
    (letter,) = report.dead_letters
    assert letter.item == HANG
    assert isinstance(letter.error, ItemTimeoutError)
    assert report.stage("slow").timed_out == 1
    assert_accounted(report)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_process_dead_letters_only_the_poison_item(workers: int) -> None:
    pipe = make_pipe().add_stage("risky", kill_on_poison, executor="process",
                                 workers=workers, batch_size=4, ordered=True)
    got: list[int] = []
    report = pipe.run(range(20), sink=got.append, keep_dead_letters=True)
    assert got == [x for x in range(20) if x != POISON]  # in order, despite the retries
    (letter,) = report.dead_letters
    assert letter.item == POISON
    assert letter.stage == "risky"
    assert isinstance(letter.error, WorkerLostError)
    assert letter.attempts == 2
    assert report.stage("risky").workers_lost >= 2
    assert report.reason == "completed"
    assert_accounted(report)


def test_an_error_that_does_not_unpickle_keeps_its_type_and_breaks_nothing() -> None:
    pipe = make_pipe().add_stage("s", raise_two_arg_on_odd, executor="process", workers=2,
                                 batch_size=4)
    report = pipe.run(range(12), keep_dead_letters=True)
    assert report.outputs == 6
    letters = sorted(report.dead_letters, key=lambda d: d.item)
    assert [d.item for d in letters] == [1, 3, 5, 7, 9, 11]
    for d in letters:
        assert type(d.error) is TwoArgError
        assert str(d.error) == f"500: item {d.item}"
        assert d.error.status == 500
        assert d.attempts == 1
    assert report.stage("s").workers_lost == 0  # no worker was blamed
    assert_accounted(report)


def test_an_output_that_does_not_pickle_dead_letters_only_its_item() -> None:
    pipe = make_pipe().add_stage("s", unpicklable_output_on_3, executor="process",
                                 workers=1, batch_size=8)
    got: list[int] = []
    report = pipe.run(range(8), sink=got.append, keep_dead_letters=True)
    assert sorted(got) == [0, 1, 2, 4, 5, 6, 7]
    (letter,) = report.dead_letters
    assert letter.item == 3
    assert isinstance(letter.error, NotPicklableError)
    assert "output" in str(letter.error)
    assert_accounted(report)


# -- pickling for process stages --------------------------------------------------------------


def test_an_unpicklable_process_stage_function_is_refused_at_add_stage() -> None:
    pipe = make_pipe()
    with pytest.raises(NotPicklableError, match=r"stage 'score'.*executor='thread'"):
        pipe.add_stage("score", lambda x: x, executor="process")

    def closure(x: int) -> int:
        return x

    with pytest.raises(NotPicklableError, match="'local'"):
        pipe.add_stage("local", closure, executor="process")
    with pytest.raises(NotPicklableError, match="key"):
        pipe.add_stage("keyed", double, executor="process", key=lambda x: x)
    assert pipe.stages == ()  # nothing half-added


def test_an_unpicklable_item_is_refused_by_a_process_first_stage() -> None:
    pipe = make_pipe().add_stage("p", double, executor="process", workers=1)
    got: list[int] = []
    with pipe.start(sink=got.append) as run:
        run.submit(1)
        with pytest.raises(NotPicklableError, match=r"stage 'p'.*lock"):
            run.submit(threading.Lock())
        with pytest.raises(NotPicklableError):
            run.submit_nowait(lambda: None)
        run.submit(2)
    report = run.report
    assert report is not None
    assert sorted(got) == [2, 4]
    assert report.submitted == 2
    assert_accounted(report)


def test_unpicklable_items_from_the_input_become_dead_letters() -> None:
    pipe = make_pipe().add_stage("p", double, executor="process", workers=1)
    report = pipe.run([1, threading.Lock(), 3], keep_dead_letters=True)
    assert report.outputs == 2
    (letter,) = report.dead_letters
    assert isinstance(letter.error, NotPicklableError)
    assert_accounted(report)


# -- backpressure and intake ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_full_pipeline_blocks_the_producer_and_holds_a_bounded_number() -> None:
    gate = threading.Event()

    def slow_sink(x: int) -> None:
        gate.wait(20)

    pipe = make_pipe(buffer_size=2, batch_size=1)
    pipe.add_stage("a", inc, workers=1)
    pipe.add_stage("b", inc, workers=1)
    run = pipe.start(sink=slow_sink)
    accepted = 0

    def fill() -> None:
        nonlocal accepted
        for i in range(10_000):
            run.submit(i, timeout=0.05)
            accepted += 1

    def top_up() -> None:  # whatever moved on since then, until intake refuses at once
        nonlocal accepted
        for i in range(10_000):
            run.submit_nowait(-i)
            accepted += 1

    try:
        with pytest.raises(SubmitTimeoutError, match=r"pipeline 't'.*stage 'a'.*0\.05"):
            fill()
        with pytest.raises(QueueFullError, match="'a'"):
            top_up()
        stats = run.stats()
        for s in stats.stages:
            assert s.queue_depth <= s.queue_capacity == 2
        # two channels of 2, an output channel of 2, a batch in flight or waiting to be
        # handed on per stage, and what the sink holds: bounded, whatever was offered
        assert accepted <= 2 + 2 + 2 + 2 * 2 + 2
        assert run.pending() == accepted
    finally:
        gate.set()
    report = run.shutdown(timeout=10)
    assert report.outputs == report.submitted == accepted
    assert_accounted(report)


def test_submit_after_shutdown_is_refused() -> None:
    pipe = make_pipe().add_stage("a", inc)
    run = pipe.start()
    run.submit(1)
    report = run.shutdown()
    with pytest.raises(PipelineClosedError, match="'t'"):
        run.submit(2)
    with pytest.raises(PipelineClosedError):
        run.submit_nowait(2)
    assert run.shutdown() is report  # later calls return the same report
    assert run.state == "stopped"


def test_the_context_manager_drains_on_exit() -> None:
    got: list[int] = []
    pipe = make_pipe().add_stage("a", inc, workers=2)
    with pipe.start(sink=got.append) as run:
        for i in range(100):
            run.submit(i)
        assert run.state == "running"
    assert sorted(got) == list(range(1, 101))
    assert run.report is not None
    assert run.report.outputs == 100
    assert_accounted(run.report)


def test_results_yields_every_output_and_ends_after_shutdown() -> None:
    pipe = make_pipe().add_stage("a", double, workers=2, batch_size=3)
    run = pipe.start()
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(run.results()), name="reader")
    reader.start()
    for i in range(200):
        run.submit(i)
    wait_until(lambda: run.stats().outputs == 200)  # all read before the shutdown
    report = run.shutdown(timeout=10)
    reader.join(10)
    assert not reader.is_alive()  # results() ended once the run stopped
    assert sorted(got) == [2 * i for i in range(200)]
    assert report.outputs == 200
    assert_accounted(report)


@pytest.mark.timeout(30)
def test_shutdown_lets_a_results_reader_take_the_outputs_already_made() -> None:
    pipe = make_pipe().add_stage("a", double, workers=2, batch_size=10)
    run = pipe.start()
    got: list[int] = []

    def slow_reader() -> None:
        for x in run.results():
            got.append(x)
            time.sleep(0.001)

    reader = threading.Thread(target=slow_reader, name="reader")
    reader.start()
    for i in range(300):
        run.submit(i)
    report = run.shutdown(timeout=20)  # ample time for the reader to take them all
    reader.join(10)
    assert sorted(got) == [2 * i for i in range(300)]
    assert report.outputs == 300
    assert not report.unprocessed
    assert_accounted(report)


def test_results_with_a_timeout_stops_waiting() -> None:
    pipe = make_pipe().add_stage("a", inc)
    with pipe.start() as run:
        run.submit(1)
        assert list(itertools.islice(run.results(timeout=5), 1)) == [2]
        assert list(run.results(timeout=0.01)) == []  # nothing more came in time


def test_results_is_refused_when_the_run_has_a_sink() -> None:
    with make_pipe().add_stage("a", inc).start(sink=lambda x: None) as run, \
            pytest.raises(PipelineStateError, match="sink"):
        next(run.results())


def test_map_early_break_shuts_the_run_down() -> None:
    pipe = make_pipe(buffer_size=10).add_stage("a", inc, workers=2, batch_size=4)
    got: list[int] = []
    for x in pipe.map(itertools.count()):  # an endless input
        got.append(x)
        if len(got) == 25:
            break  # the generator is closed here, and its finally shuts the run down
    assert len(got) == 25
    # the fixture checks that no pipekit thread outlives the loop


def test_map_yields_every_output() -> None:
    pipe = make_pipe().add_stage("a", double).add_stage("b", inc)
    assert sorted(pipe.map(range(100))) == [2 * i + 1 for i in range(100)]


def test_a_timed_run_stops_intake_and_accounts_for_everything() -> None:
    pipe = make_pipe(buffer_size=50).add_stage("a", inc, workers=2)
    report = pipe.run(itertools.count(), duration=0.2)
    assert report.reason == "duration"
    assert report.submitted > 0
    assert_accounted(report)


# -- shutdown -------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_shutdown_with_a_stuck_stage_returns_with_the_stuck_items_unprocessed() -> None:
    gate = Gate()  # every call blocks until released
    pipe = make_pipe()
    pipe.add_stage("stuck", gate, workers=1, batch_size=2)
    pipe.add_stage("after", inc)
    run = pipe.start()
    for i in range(6):
        run.submit(i)
    assert gate.arrived.wait(5)
    try:
        report = run.shutdown(timeout=0.3)
    finally:
        gate.release()
    assert report.reason == "deadline"
    assert sorted(u.item for u in report.unprocessed) == list(range(6))
    in_flight = sorted(u.item for u in report.unprocessed if u.where == "in_flight")
    assert in_flight == [0, 1]
    assert {u.stage for u in report.unprocessed} == {"stuck"}
    assert report.outputs == 0
    assert_accounted(report)


@pytest.mark.timeout(30)
def test_shutdown_with_a_stuck_process_stage_returns_and_kills_the_worker() -> None:
    pipe = make_pipe().add_stage("stuck", sleep_on_hang, executor="process", workers=1,
                                 batch_size=1)
    got: list[int] = []
    run = pipe.start(sink=got.append)
    for i in range(6):
        run.submit(i)
    wait_until(lambda: len(got) == HANG)  # items before the hung one came out
    report = run.shutdown(timeout=0.5)
    assert report.reason == "deadline"
    assert HANG in {u.item for u in report.unprocessed if u.where == "in_flight"}
    assert_accounted(report)


def test_on_shutdown_hooks_run_once_in_reverse_stage_order() -> None:
    order: list[str] = []
    pipe = make_pipe()
    for name in ("a", "b", "c"):
        pipe.add_stage(name, inc, on_shutdown=functools.partial(order.append, name))
    report = pipe.run(range(10))
    assert order == ["c", "b", "a"]
    assert report.hook_errors == ()


@pytest.mark.timeout(20)
def test_a_hook_that_raises_or_hangs_is_reported_and_does_not_block() -> None:
    order: list[str] = []
    release = threading.Event()

    def boom() -> None:
        order.append("b")
        raise RuntimeError("boom")

    def hang() -> None:
        order.append("a")
        release.wait()

    pipe = make_pipe()
    pipe.add_stage("a", inc, on_shutdown=hang)  # hooks run in reverse: this one last
    pipe.add_stage("b", inc, on_shutdown=boom)
    pipe.add_stage("c", inc, on_shutdown=lambda: order.append("c"))
    try:
        report = pipe.run(range(10), shutdown_timeout=1.0)
    finally:
        release.set()
    assert order == ["c", "b", "a"]  # a hook that raised did not stop the next one
    errors = dict(report.hook_errors)
    assert set(errors) == {"a", "b"}
    assert errors["b"] == "RuntimeError: boom"
    assert "did not finish" in errors["a"]
    assert report.outputs == 10
    assert_accounted(report)


# -- sources and states --------------------------------------------------------------------


def test_a_generator_function_source_gives_each_run_a_fresh_input() -> None:
    pipe = make_pipe().add_stage("a", double)
    pipe.source(lambda: numbers(30))
    first = pipe.run()
    second = pipe.run()
    assert first.outputs == second.outputs == 30
    assert sorted(pipe.map()) == [2 * i for i in range(30)]


def test_an_iterable_source_is_used_by_run() -> None:
    pipe = make_pipe().add_stage("a", inc).source([1, 2, 3])
    got: list[int] = []
    pipe.run(sink=got.append)
    assert sorted(got) == [2, 3, 4]


def test_run_without_a_source_is_refused() -> None:
    pipe = make_pipe("nosource").add_stage("a", inc)
    with pytest.raises(PipelineStateError, match=r"'nosource' has no source"):
        pipe.run()
    with pytest.raises(PipelineStateError):
        list(pipe.map())


def test_a_pipeline_without_stages_cannot_run() -> None:
    pipe = make_pipe("empty")
    with pytest.raises(PipelineStateError, match=r"'empty' has no stages"):
        pipe.run([1])
    with pytest.raises(PipelineStateError):
        pipe.start()


def test_a_finished_run_reports_completed_and_a_stopped_one_shutdown() -> None:
    pipe = make_pipe().add_stage("a", inc)
    assert pipe.run(range(5)).reason == "completed"
    run = pipe.start()
    run.submit(1)
    assert run.shutdown().reason == "shutdown"


# -- stats ---------------------------------------------------------------------------------


def _depth_and_flight(stage: pipekit.StageStats) -> tuple[int, int]:
    return stage.queue_depth, stage.in_flight


@pytest.mark.timeout(20)
def test_stats_fields_move_while_running_and_after() -> None:
    gate = Gate(0)  # only item 0 blocks
    pipe = make_pipe(buffer_size=100)
    pipe.add_stage("gate", gate, workers=1, batch_size=5)
    pipe.add_stage("after", inc, workers=2)
    got: list[int] = []
    run = pipe.start(sink=got.append)
    try:
        before = run.stats()
        assert before.pipeline == "t"
        assert before.state == "running"
        assert before.stage("gate").received == 0
        for i in range(20):
            run.submit(i)
        assert gate.arrived.wait(5)
        # the first batch (item 0 and whatever came with it) is stuck; the rest wait
        wait_until(lambda: sum(_depth_and_flight(run.stats().stage("gate"))) == 20)
        mid = run.stats()
        stage = mid.stage("gate")
        assert 1 <= stage.in_flight <= 5
        assert stage.received == stage.in_flight
        assert stage.queue_depth == 20 - stage.in_flight
        assert stage.workers == stage.min_workers == stage.max_workers == 1
        assert stage.queue_capacity == 100
        assert mid.submitted == 20
        assert mid.outputs == 0
        with pytest.raises(KeyError, match="nope"):
            mid.stage("nope")
    finally:
        gate.release()
    report = run.shutdown(timeout=10)
    final = report.stage("gate")
    assert final.received == final.succeeded == final.emitted == 20
    assert final.in_flight == 0
    assert final.queue_depth == 0
    assert final.queue_peak >= 15
    assert final.batches >= 4
    assert final.busy_seconds > 0
    assert final.latency.count == 20
    assert final.latency.max >= final.latency.mean > 0
    assert final.state == "stopped"
    assert report.outputs == 20
    assert report.duration > 0
    assert report.to_dict()["stages"][0]["name"] == "gate"
    assert_accounted(report)


def test_thread_workers_are_named_after_their_stage() -> None:
    names: set[str] = set()
    pipe = make_pipe().add_stage("parse", lambda x: names.add(threading.current_thread().name))
    pipe.run(range(10))
    assert names
    assert all(n.startswith("pipekit-parse-") for n in names)


def test_default_settings_run_and_leave_nothing_behind(executor: str) -> None:
    # defaults: telemetry on (no SDK installed globally), a memory limit, a monitor
    pipe = pipekit.Pipeline("defaults").add_stage("a", double, executor=executor)
    report = pipe.run(range(50))
    assert report.outputs == 50
    assert_accounted(report)


# -- bad input -------------------------------------------------------------------------------


_BAD_STAGE_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"workers": 0}, "0"),
    ({"workers": -2}, "-2"),
    ({"workers": 1.5}, "1.5"),
    ({"workers": "4"}, "'4'"),
    ({"workers": True}, "True"),
    ({"workers": (4, 2)}, "max_workers=2"),
    ({"workers": (0, 2)}, "(0, 2)"),
    ({"workers": (1, 2, 3)}, "(1, 2, 3)"),
    ({"batch_size": 0}, "0"),
    ({"batch_size": "10"}, "'10'"),
    ({"batch_size": True}, "True"),
    ({"executor": "gpu"}, "'gpu'"),
    ({"mp_context": "threads"}, "'threads'"),
    ({"key": "user_id"}, "'user_id'"),
    ({"retry": 3}, "3"),
    ({"retry": {"attempts": 3}}, "{'attempts': 3}"),
    ({"timeout": 0}, "0"),
    ({"timeout": -1.0}, "-1.0"),
    ({"timeout": "2s"}, "'2s'"),
    ({"timeout": math.nan}, "nan"),
    ({"timeout": math.inf}, "inf"),
    ({"timeout": timedelta(0)}, "0.0"),
    ({"on_shutdown": "close"}, "'close'"),
]


@pytest.mark.parametrize(("options", "shown"), _BAD_STAGE_OPTIONS,
                         ids=[f"{next(iter(o))}={o[next(iter(o))]!r}"
                              for o, _ in _BAD_STAGE_OPTIONS])
def test_bad_stage_options_are_refused_naming_the_value(options: dict[str, Any],
                                                        shown: str) -> None:
    pipe = make_pipe()
    with pytest.raises(ConfigError) as info:
        pipe.add_stage("s", inc, **options)
    assert shown in str(info.value)
    assert pipe.stages == ()


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "slash/y", 7, None])
def test_bad_stage_names_are_refused(name: Any) -> None:
    with pytest.raises(ConfigError, match="stage name") as info:
        make_pipe().add_stage(name, inc)
    assert repr(name) in str(info.value)


def test_duplicate_stage_names_and_non_callables_are_refused() -> None:
    pipe = make_pipe().add_stage("a", inc)
    with pytest.raises(ConfigError, match="'a' already exists"):
        pipe.add_stage("a", double)
    with pytest.raises(ConfigError, match=r"fn must be callable.*42"):
        pipe.add_stage("b", 42)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "shown"), [
    ({"name": "bad name"}, "'bad name'"),
    ({"name": ""}, "''"),
    ({"name": "ok", "buffer_size": 0}, "0"),
    ({"name": "ok", "batch_size": -1}, "-1"),
    ({"name": "ok", "bufer_size": 3}, "bufer_size"),
    ({"name": "ok", "config": "pipekit.toml"}, "str"),
    ({"name": "ok", "shutdown_timeout": -1}, "-1"),
])
def test_bad_pipeline_arguments_are_refused_naming_the_value(kwargs: dict[str, Any],
                                                             shown: str) -> None:
    kwargs.setdefault("telemetry", False)
    with pytest.raises(ConfigError) as info:
        pipekit.Pipeline(**kwargs)
    assert shown in str(info.value)


def test_bad_items_and_sources_are_refused() -> None:
    pipe = make_pipe().add_stage("a", inc)
    with pytest.raises(ConfigError, match=r"items must be iterable \(got int\)"):
        pipe.run(5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"source must be .*\(got int\)"):
        pipe.source(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", ["soon", -1.0, math.nan])
def test_a_bad_submit_timeout_is_refused_naming_the_value(timeout: Any) -> None:
    with make_pipe().add_stage("a", inc).start() as run:
        with pytest.raises(ConfigError) as info:
            run.submit(1, timeout=timeout)
        assert repr(timeout) in str(info.value)


@pytest.mark.parametrize("kwargs", [{"shutdown_timeout": "30"}, {"shutdown_timeout": -1.0},
                                    {"duration": "10"}, {"duration": -1.0}])
def test_bad_run_arguments_are_refused_before_the_run_starts(kwargs: dict[str, Any]) -> None:
    pipe = make_pipe().add_stage("a", inc)
    with pytest.raises(ConfigError) as info:
        pipe.run([1, 2], **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


@pytest.mark.parametrize("where", ["pipeline-ordered", "stage-ordered", "stage-fanout"])
def test_non_bool_flags_are_refused(where: str) -> None:
    def build() -> None:
        if where == "pipeline-ordered":
            pipekit.Pipeline("x", telemetry=False, ordered="no")  # type: ignore[arg-type]
        elif where == "stage-ordered":
            make_pipe().add_stage("a", inc, ordered="no")  # type: ignore[arg-type]
        else:
            make_pipe().add_stage("a", inc, fanout="no")  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="'no'"):
        build()


def test_a_failing_source_keeps_what_it_yielded_and_says_so() -> None:
    def source() -> Any:
        yield 1
        yield 2
        raise RuntimeError("source broke")

    pipe = make_pipe().add_stage("a", inc)
    report = pipe.run(source())
    assert report.submitted == 2
    assert report.outputs == 2
    assert report.reason != "completed"
